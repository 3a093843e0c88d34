"""Lightning callbacks that change the model while it trains: pruning (and, later, quantization
and clustering). Each ``conf/prune/*.yaml`` builds one of these."""

from callbacks.base import SELECTION_KEY, PruningCallback
from callbacks.lottery import LotteryTicket
from callbacks.magnitude import MagnitudePruning
from callbacks.schedule import SparsitySchedule
from callbacks.structured import StructuredPruning

__all__ = ["SELECTION_KEY", "LotteryTicket", "MagnitudePruning", "PruningCallback", "SparsitySchedule", "StructuredPruning"]

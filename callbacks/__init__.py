"""Lightning callbacks that change the model while it trains: pruning, quantization
(int8, binary, logarithmic) and weight clustering. Each ``conf/prune/*.yaml`` and
``conf/quantize/*.yaml`` builds one of these."""

from callbacks.base import SELECTION_KEY, PruningCallback
from callbacks.clustering import WeightClustering
from callbacks.lottery import LotteryTicket
from callbacks.magnitude import MagnitudePruning
from callbacks.quantization import PostTrainingQuantization, QuantizationAwareTraining, QuantizationCallback
from callbacks.schedule import SparsitySchedule
from callbacks.structured import StructuredPruning
from callbacks.weight_quant import WeightQuantization

__all__ = ["SELECTION_KEY", "LotteryTicket", "MagnitudePruning", "PostTrainingQuantization", "PruningCallback", "QuantizationAwareTraining", "QuantizationCallback", "SparsitySchedule", "StructuredPruning", "WeightClustering", "WeightQuantization"]

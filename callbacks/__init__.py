"""The compression stages (``callbacks/stage.py``: the contract) and the Lightning callbacks that
change the model while it trains: pruning, quantization (int8, binary, logarithmic), weight
clustering, and low-rank factorisation after training. Each ``conf/prune/*.yaml``,
``conf/quantize/*.yaml`` and ``conf/factorize/*.yaml`` builds one of these."""

from callbacks.base import PruningCallback
from callbacks.clustering import WeightClustering
from callbacks.factorize import LowRankFactorization
from callbacks.lottery import LotteryTicket
from callbacks.magnitude import MagnitudePruning
from callbacks.nm import NMPruning
from callbacks.qat import QuantizationAwareTraining
from callbacks.quantization import PostTrainingQuantization, QuantizationCallback
from callbacks.schedule import SparsitySchedule
from callbacks.stage import REFUSED, SELECTION_KEY, CompressionStage, StageContext, StageResult, check_combination, in_order
from callbacks.structured import StructuredPruning
from callbacks.weight_quant import WeightQuantization

__all__ = [
    "REFUSED",
    "SELECTION_KEY",
    "CompressionStage",
    "LotteryTicket",
    "LowRankFactorization",
    "MagnitudePruning",
    "NMPruning",
    "PostTrainingQuantization",
    "PruningCallback",
    "QuantizationAwareTraining",
    "QuantizationCallback",
    "SparsitySchedule",
    "StageContext",
    "StageResult",
    "StructuredPruning",
    "WeightClustering",
    "WeightQuantization",
    "check_combination",
    "in_order",
]

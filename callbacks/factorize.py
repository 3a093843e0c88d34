"""Low-rank factorisation as a compression stage (``factorize=svd``), at one of two moments:

- ``at=end`` (the default): after training, the validation-selected model is tested, measured
  (``dense/*``), factorised by truncated SVD (``kd.compression.factorize.LowRank``: the linear
  algebra and the model surgery), fine-tuned for ``finetune_epochs`` at ``lr_scale`` times the
  learning rate with the run's objective, and tested again;
- ``at=start``: before training, the student (``student.init_checkpoint``: a trained one; else
  the SVD of its initial weights) is measured and factorised, and the factorised model is what
  trains, so a pruner then prunes the factors and a quantizer quantizes them (factorise, prune,
  quantize in one run).

``factorization.csv`` lists every layer and ``student.pt`` stores the ranks beside the weights
(``kd.train.checkpoint.load_weights`` rebuilds the factorised architecture from them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback
from torch import nn

from callbacks.stage import StageContext, StageResult
from kd.compression.factorize import FACTORIZED_KEY, LowRank
from kd.tracking import keys

AT = ("end", "start")


class LowRankFactorization(LowRank):
    """``kd.compression.factorize.LowRank`` with the ``CompressionStage`` contract (same arguments,
    and ``at``: ``end`` after training, or ``start`` before it)."""

    group = "factorize"
    prepares_graph = False

    def __init__(self, *args: Any, at: str = "end", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if at not in AT:
            raise ValueError(f"factorize.at must be one of {AT}, got {at!r}")
        self.at = at
        self._rows: list[dict[str, Any]] = []
        self._dense: dict[str, float] = {}

    @property
    def kind(self) -> str:
        return "svd" if self.at == "end" else "svd@start"

    def describe(self) -> str:
        return super().describe() + (" at start" if self.at == "start" else "")

    def check(self, model: nn.Module, context: StageContext) -> None:
        if context.objective is not None and context.objective.needs_features:
            raise ValueError("factorize with feature distillation is not supported: the feature hooks may point at "
                             "layers the factorisation replaces (use a logit objective: kd, dkd, dist, ctkd, mlkd, or none)")  # fmt: skip
        self.apply(copy.deepcopy(model))  # bad layer patterns, or nothing to factorise, fail now

    def prepare(self, model: nn.Module, context: StageContext) -> nn.Module:
        if self.at == "start":  # the factorised model is what trains (and what a pruner prunes)
            assert context.measure is not None
            self._dense = keys.prefixed(keys.DENSE, context.measure(model))
            self._rows = self.apply(model)
        return model

    def callbacks(self) -> list[Callback]:
        return []  # acts before or after training only

    def selectable(self, epoch: int) -> bool:
        return True

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        if self.at == "start":
            report = self.write_report(self._rows, Path(context.run_dir) / "factorization.csv")
            metrics = self._dense | {keys.key(keys.FACTORIZE, "layers"): float(sum(r["factorized"] for r in self._rows))}
            return StageResult(model, metrics, [report], {FACTORIZED_KEY: self.ranks(self._rows)})
        assert context.measure is not None and context.test_accuracy is not None
        metrics = keys.prefixed(keys.DENSE, context.measure(model))
        metrics[keys.key(keys.FACTORIZE, "test_acc_before")] = context.test_accuracy(model)
        rows = self.apply(model)
        metrics[keys.key(keys.FACTORIZE, "test_acc_truncated")] = context.test_accuracy(model)
        metrics[keys.key(keys.FACTORIZE, "layers")] = float(sum(r["factorized"] for r in rows))
        report = self.write_report(rows, Path(context.run_dir) / "factorization.csv")
        if self.finetune_epochs and context.finetune is not None:
            context.finetune(self.finetune_epochs, self.lr_scale)
        return StageResult(model, metrics, [report], {FACTORIZED_KEY: self.ranks(rows)}, test_acc=context.test_accuracy(model))

"""Low-rank factorisation as a compression stage (``factorize=svd``): after training, the
validation-selected model is tested, measured (``dense/*``), factorised by truncated SVD
(``kd.compression.factorize.LowRank``: the linear algebra and the model surgery), fine-tuned for
``finetune_epochs`` at ``lr_scale`` times the learning rate with the run's objective, and tested
again; ``factorization.csv`` lists every layer and ``student.pt`` stores the ranks beside the
weights (``kd.train.checkpoint.load_weights`` rebuilds the factorised architecture from them).
"""

from __future__ import annotations

import copy
from pathlib import Path

from pytorch_lightning.callbacks import Callback
from torch import nn

from callbacks.stage import StageContext, StageResult
from kd.compression.factorize import FACTORIZED_KEY, LowRank


class LowRankFactorization(LowRank):
    """``kd.compression.factorize.LowRank`` with the ``CompressionStage`` contract (same arguments)."""

    group = "factorize"
    kind = "svd"
    prepares_graph = False

    def check(self, model: nn.Module, context: StageContext) -> None:
        if context.objective is not None and context.objective.needs_features:
            raise ValueError("factorize with feature distillation is not supported: the feature hooks may point at "
                             "layers the factorisation replaces (use a logit objective: kd, dkd, dist, ctkd, mlkd, or none)")  # fmt: skip
        self.apply(copy.deepcopy(model))  # bad layer patterns, or nothing to factorise, fail now

    def callbacks(self) -> list[Callback]:
        return []  # acts after training only

    def selectable(self, epoch: int) -> bool:
        return True

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        assert context.measure is not None and context.test_accuracy is not None
        metrics = {f"dense/{k}": v for k, v in context.measure(model).items()}
        metrics["factorize/test_acc_before"] = context.test_accuracy(model)
        rows = self.apply(model)
        metrics["factorize/test_acc_truncated"] = context.test_accuracy(model)
        metrics["factorize/layers"] = float(sum(r["factorized"] for r in rows))
        report = self.write_report(rows, Path(context.run_dir) / "factorization.csv")
        if self.finetune_epochs and context.finetune is not None:
            context.finetune(self.finetune_epochs, self.lr_scale)
        return StageResult(model, metrics, [report], {FACTORIZED_KEY: self.ranks(rows)}, test_acc=context.test_accuracy(model))

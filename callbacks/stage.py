"""The compression-stage contract: what every pruning, factorisation and quantization method
declares, and the one model-selection rule that asks all of them.

A run may configure one stage of each group (``prune``, ``factorize``, ``quantize``). The
orchestrator (``kd.run.experiment``) only speaks this protocol:

1. before anything trains: ``check_combination`` on the stages together (the table below), then,
   stage by stage in order, ``check(model, context)`` (layer names, schedules that fit the epochs,
   bits) and ``prepare(model, context)``, the model the later stages and the training see
   (factorisation at ``at=start`` reshapes it here; the others return it unchanged);
2. the stages' ``callbacks()`` join the trainer, those with ``prepares_graph`` first (QAT's
   fake-quant graph is built before a pruner masks its modules);
3. while training, the checkpoint callback selects among the epochs that every stage counts
   (``selectable(epoch)``: at the final sparsity, in the quantized form), through
   :data:`SELECTION_KEY`, written by :func:`write_selection`;
4. after the test, ``finalize(model, context)`` of each stage in order (:func:`in_order`: a stage
   that reshapes before training first, then prune, factorize, quantize) returns a :class:`StageResult`: the model the next stage and the
   measurement see, its metrics, artifacts, what ``student.pt`` stores beside the weights, and
   optionally a separate deployable form (the int8 model), which the orchestrator measures
   against the float one.

Which stages combine is data, :data:`REFUSED`: (earlier kind, later kind) -> why not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch import nn

from kd.tracking import keys

# ModelCheckpoint monitors this key while a stage runs: val/acc in epochs every stage counts, 0 in
# the others, so the selected epoch is never one of a denser or still-float model.
SELECTION_KEY = keys.SELECTION

KINDS = ("magnitude", "structured", "lottery", "svd", "svd@start", "ptq", "dynamic", "qat", "cluster", "binary", "log")
PRUNERS = ("magnitude", "structured", "lottery")
QUANTIZERS = ("ptq", "dynamic", "qat", "cluster", "binary", "log")
BEFORE_TRAINING = ("svd@start",)  # kinds that reshape the student before it trains: they come first
THINNING = ("structured",)  # stages that remove channels when they finalise: a later QAT fine-tunes the thinned model

_PRUNE_THEN_LOW_BIT = ("binary weights have no zeros and the pruning masks act on the latent weights; "
                       "use quantize=cluster after pruning")  # fmt: skip
_QAT_AFTER = ("every round rewinds the weights, and a QAT fine-tune after the last one would regrow the pruned "
              "ones; use quantize=ptq on the ticket")  # fmt: skip
_SVD_PRUNE = ("factorising after pruning would fill the pruned weights back in; factorise first and prune the "
              "factors: factorize.at=start")  # fmt: skip
_SVD_QUANT = "only post-training quantization (quantize=ptq or dynamic) of the fine-tuned factorised model"

# (earlier stage's kind, later stage's kind) -> the reason the pair is refused before training.
# Every pair not listed works (docs/compression.md has the whole table).
REFUSED: dict[tuple[str, str], str] = {
    ("lottery", "qat"): f"quantize=qat with LotteryTicket is not supported: {_QAT_AFTER}",
    ("lottery", "cluster"): ("quantize=cluster with LotteryTicket is not supported: every round rewinds the weights, and with "
                             "them the cluster assignment; cluster the ticket in a second run: quantize=cluster "
                             "student.init_checkpoint=<the ticket's student.pt> (its zeros stay a cluster of their own)"),
    **{(p, q): f"quantize={q} with pruning is not supported: {_PRUNE_THEN_LOW_BIT}" for p in PRUNERS for q in ("binary", "log")},
    **{(p, "svd"): f"factorize with prune is not supported: {_SVD_PRUNE}" for p in PRUNERS},
    **{(f, q): f"factorize with quantize={q} is not supported: {_SVD_QUANT}" for f in ("svd", "svd@start") for q in ("qat", "cluster", "binary", "log")},
    ("svd@start", "lottery"): ("prune=lottery with factorize.at=start is not supported: every round re-initialises the "
                               "dense architecture, not the factorised one (use prune=magnitude or structured)"),
}


@dataclass
class StageContext:
    """What a stage may read when it checks and when it finalises (built by the orchestrator).

    Attributes:
        data: the run's data module (splits, ``input_shape``, calibration batches).
        objective: the run's objective (declared needs: features, teacher logits).
        max_epochs: the student's training epochs.
        run_dir: the run's folder, for the stage's artifacts.
        stages: every configured stage, in finalisation order.
        measure: the run's measurement of a model (``model/*`` keys without the prefix).
        test_accuracy: test accuracy of a model on the CPU.
        finetune: ``finetune(epochs, lr_scale, callbacks=())`` fine-tunes the student for
            ``epochs`` at ``lr_scale`` times the rate with the run's objective and the stage's own
            callbacks, and returns the trained model (factorisation; QAT after thinning); None
            before training.
    """

    data: Any
    objective: Any
    max_epochs: int
    run_dir: Path
    stages: Sequence[CompressionStage] = ()
    measure: Callable[[nn.Module], dict[str, float]] | None = None
    test_accuracy: Callable[[nn.Module], float] | None = None
    finetune: Callable[..., nn.Module] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)


@dataclass
class StageResult:
    """What a stage's ``finalize`` hands on."""

    model: nn.Module  # what the next stage, the measurement and student.pt see
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # stored beside the weights in student.pt
    tags: dict[str, str] = field(default_factory=dict)
    deployed: nn.Module | None = None  # a separate deployable form (int8), saved as its own file
    deployed_extras: dict[str, Any] = field(default_factory=dict)
    test_acc: float | None = None  # the model's test accuracy, when finalising changed it (factorisation)


@runtime_checkable
class CompressionStage(Protocol):
    """A compression method. Pruning and quantization stages are Lightning callbacks themselves;
    factorisation acts after training only."""

    group: str  # its config group: "prune", "factorize" or "quantize"
    prepares_graph: bool  # rewrites the network when fit starts (its callbacks go first)

    @property
    def kind(self) -> str: ...  # one of KINDS: what the combination table names

    def describe(self) -> str: ...

    def check(self, model: nn.Module, context: StageContext) -> None: ...

    def prepare(self, model: nn.Module, context: StageContext) -> nn.Module: ...  # before training; most: model

    def callbacks(self) -> list[pl.Callback]: ...

    def selectable(self, epoch: int) -> bool: ...

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult: ...


def check_combination(stages: Sequence[CompressionStage]) -> None:
    """Refuse, before training, a pair of configured stages that does not combine."""
    for i, earlier in enumerate(stages):
        for later in stages[i + 1 :]:
            reason = REFUSED.get((earlier.kind, later.kind))
            if reason is not None:
                raise ValueError(reason)


def write_selection(trainer: pl.Trainer) -> None:
    """The one model-selection rule: :data:`SELECTION_KEY` is ``val/acc`` in an epoch every stage
    among the trainer's callbacks counts, 0 in the others. Each stage calls it at validation end
    (the value does not depend on which calls it, or in which order)."""
    acc = trainer.callback_metrics.get(keys.VAL_ACC)
    if acc is None or trainer.sanity_checking:
        return
    stages = [c for c in trainer.callbacks if isinstance(c, CompressionStage)]
    counts = all(stage.selectable(trainer.current_epoch) for stage in stages)
    trainer.callback_metrics[SELECTION_KEY] = acc.clone() if counts else torch.zeros_like(acc)


GROUPS = {"prune": PRUNERS, "factorize": ("svd", "svd@start"), "quantize": QUANTIZERS}
# every (earlier, later) pair a run can configure, by table: (earlier group, its kinds, later group, its kinds)
SECTIONS = (
    ("prune", PRUNERS, "quantize", QUANTIZERS),
    ("prune", PRUNERS, "factorize", ("svd",)),
    ("factorize", ("svd@start",), "prune", PRUNERS),
    ("factorize", ("svd", "svd@start"), "quantize", QUANTIZERS),
)
PAIRS = [(a, b) for _, earlier, _, later in SECTIONS for a in earlier for b in later]


def in_order(stages: Sequence[CompressionStage]) -> list[CompressionStage]:
    """The order stages check, prepare and finalise in: a stage that reshapes the student before
    training (:data:`BEFORE_TRAINING`) first, then prune, factorize, quantize."""
    rank = {"prune": 1, "factorize": 2, "quantize": 3}
    return sorted(stages, key=lambda s: 0 if s.kind in BEFORE_TRAINING else rank[s.group])


def combination_table() -> str:
    """Markdown: every pair of stages a run can configure (one per group, in :func:`in_order`),
    and whether it works or why it is refused (from :data:`REFUSED`)."""

    def cell(earlier: str, later: str) -> str:
        reason = REFUSED.get((earlier, later))
        return "works" if reason is None else "refused: " + reason.split(": ", 1)[1].replace("|", "\\|")

    lines = []
    for first, earlier, second, later in SECTIONS:
        lines += [f"| {first} \\ {second} | " + " | ".join(later) + " |", "|---" * (len(later) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(a, b) for b in later) + " |" for a in earlier]
        lines.append("")
    return "\n".join(lines)

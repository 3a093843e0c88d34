"""Lightning modules: a classifier (baselines and teachers) and a distillation student.

The training step never synchronises with the host and makes no ``self.log`` call: each loss
term and the count of correct predictions are summed into tensors on the device and logged
once, at the end of the epoch: a key logged per step costs Lightning's bookkeeping, comparable
to a whole step of a small student, and a torchmetrics ``update`` per step more than the sums it
replaces (``benchmarks/overhead.py`` and ``benchmarks/speed.py`` measure both). Validation and
test use torchmetrics.

With ``compile_model=True`` the training step's forward (student, teacher lookup or online
teacher, loss terms and these sums) runs as one ``torch.compile``d function: CUDA graphs on a
GPU (``mode="reduce-overhead"``: small students are launch-bound, and a graph replays a whole
forward or backward as one launch), inductor's kernels on the CPU. Evaluation stays eager. A
compiler that fails on the first step is logged and the run goes on eagerly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd.train.dynamic import dynamic_terms, is_dynamic, validate_widths, width_metrics
from kd.train.epoch_sums import EpochSums
from kd.models.features import FeatureHooks
from kd.losses import CrossEntropy, Objective

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Batch = tuple[Tensor, Tensor, Tensor]  # inputs, labels, sample indices
StepOutputs = tuple[Tensor, dict[str, Tensor], Tensor]  # loss, {term: batch size * term}, correct count


class ClassifierModule(pl.LightningModule):
    """Supervised training of one network with an objective from ``kd.losses``.

    Args:
        model: the network being trained (teacher, baseline or student).
        num_classes: number of classes, from the data module.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_`` of a torch optimiser);
            None for a module that is only evaluated.
        scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or None.
        objective: maps logits and labels (and teacher logits) to named loss terms;
            default plain cross-entropy.
        compile_model: compile the training forward with ``torch.compile`` (see the module
            docstring); the training batches must then have one shape (``data.drop_last``).
        log_steps: also log ``train/<term>_step``, the mean over the steps since the last such
            log, every ``trainer.log_every_n_steps`` steps: one device-to-host copy then, none
            in between. Off: the terms reach the logger once per epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None = None,
        objective: Objective | None = None,
        compile_model: bool = False,
        log_steps: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective if objective is not None else CrossEntropy()
        self._make_optimizer = optimizer
        self._make_scheduler = scheduler
        self.compile_model = compile_model
        self.log_steps = log_steps
        # the compiled step, a function: outside the module tree, so saved state keeps its keys
        self._compiled_step: Callable[[Tensor, Tensor, Tensor], StepOutputs] | None = None
        self._compile_checked = False
        self._epoch = EpochSums()  # this epoch's training terms and correct predictions, on the device
        self._window = EpochSums()  # the same since the last step-level log (log_steps)
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # a slimmable student: each narrower width validated too (width/<w>/val_acc); val/acc is the widest's
        self.width_val = nn.ModuleList(width_metrics(model, lambda: MulticlassAccuracy(num_classes=num_classes, average="micro")))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        self.objective.start_epoch(self.current_epoch, self.trainer.max_epochs)

    @property
    def compile_mode(self) -> str:
        """CUDA graphs where there is a GPU; inductor's default kernels elsewhere."""
        return "reduce-overhead" if self.device.type == "cuda" else "default"

    def on_fit_start(self) -> None:
        if self.compile_model and self._compiled_step is None:
            self._compiled_step = torch.compile(self.step_outputs, mode=self.compile_mode, dynamic=False)
            self._compile_checked = False
            log.info("compile: the training step's forward with torch.compile(mode=%r)", self.compile_mode)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._compiled_step = None  # evaluation, pruning and quantization see the plain network

    def replace_model(self, model: nn.Module, feature_aliases: dict[str, str] | None = None) -> None:
        """Train ``model`` from now on (a stage's rewrite of the network, e.g. QAT's prepared
        graph); ``feature_aliases`` re-point the feature hooks where modules were merged."""
        self.model = model

    def compute_terms(self, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and the objective's named loss terms for one training batch."""
        if is_dynamic(self.model):  # early exits, slimmable widths: kd.train.dynamic
            return dynamic_terms(self.model, self.objective, x, y, None, index)
        logits = self.model(x)
        return logits, self.objective(logits, y)

    def step_outputs(self, x: Tensor, y: Tensor, index: Tensor) -> StepOutputs:
        """One training batch's forward and its bookkeeping, tensors only: the loss, each term
        times the batch size, and the count of correct predictions. This is what
        ``compile_model`` compiles whole (forward, teacher lookup or forward, loss, sums)."""
        logits, terms = self.compute_terms(x, y, index)
        n = y.shape[0]
        return terms["loss"], {k: v.detach() * n for k, v in terms.items()}, (logits.detach().argmax(-1) == y).sum()

    def _step(self, x: Tensor, y: Tensor, index: Tensor) -> StepOutputs:
        """``step_outputs``, compiled when compiling. A compiler that fails on the first call
        is logged and the run goes on eagerly (a broken model then fails in the eager call)."""
        if self._compiled_step is None:
            return self.step_outputs(x, y, index)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # this step's graph outputs may overwrite the last one's
        if self._compile_checked:
            return self._compiled_step(x, y, index)
        try:
            out = self._compiled_step(x, y, index)
        except Exception as err:  # noqa: BLE001  (whatever the compiler raised, eager is the fallback)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("compile failed (%s: %s); training eagerly", type(err).__name__, first)
            self._compiled_step = None
            return self.step_outputs(x, y, index)
        self._compile_checked = True
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y, index = batch
        loss, sums, correct = self._step(x, y, index)
        n = len(y)
        self._epoch.add(sums, correct, n)
        if self.log_steps:
            self._window.add(sums, correct, n)
            if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning hands logs over
                means = self._window.means(None)
                self.log_dict({f"{k}_step": v for k, v in means.items()}, on_step=True, on_epoch=False)
                self._window = EpochSums()
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch.count:
            means = self._epoch.means(self.trainer.strategy)  # exact over all ranks, one all-reduce
            diverged = sorted(k for k, v in means.items() if not math.isfinite(v))
            if diverged:  # stop here (the run is marked FAILED) rather than finish at chance accuracy
                raise FloatingPointError(
                    f"training diverged in epoch {self.current_epoch}: {', '.join(diverged)} not finite; "
                    "lower the learning rate or set trainer.gradient_clip_val"
                )
            self.log_dict(means)
        self._epoch = EpochSums()

    def _evaluate(self, batch: Batch, stage: str, metrics: MetricCollection) -> None:
        x, y, _ = batch
        logits = self.model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)
        x, y, _ = batch
        validate_widths(self.model, list(self.width_val), x, y, lambda name, m: self.log(name, m, on_step=False, on_epoch=True))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """What the optimiser updates: the trained network, and whatever the objective learns
        beside it (FitNets regressors), never the teacher."""
        return [*self.model.parameters(), *self.objective.parameters()]

    def configure_optimizers(self) -> Any:
        if self._make_optimizer is None:
            raise RuntimeError(f"{type(self).__name__} was built without an optimizer: evaluation only")
        optimizer = self._make_optimizer(self.trainable_parameters())
        if self._make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._make_scheduler(optimizer), "interval": "epoch"}}


class DistillationModule(ClassifierModule):
    """A student trained against a frozen teacher.

    The teacher is frozen explicitly (``requires_grad_(False)``, kept in eval mode through
    ``train()`` calls) and never enters the optimiser or the saved checkpoints. When
    ``teacher_inputs`` is given (the training inputs are deterministic and the objective needs
    only the teacher's logits), the teacher runs once over them at fit start on the training
    device and each step looks its logits up by sample index; otherwise it runs online.

    Feature terms name layers of both models (or take their declared stages); hooks capture them
    in training steps only (``kd.models.features``). A run prepares the objective (``Objective.prepare``)
    before this module exists, so a wrong layer fails before the teacher trains; a module built
    directly prepares it here. Terms' own parameters (FitNets regressors, CRD's heads and banks)
    are part of this module: in the optimiser and the Lightning checkpoint, never the student.

    Args:
        model: the student.
        teacher: a trained network with the same number of outputs.
        objective: an objective that needs a teacher (``SoftTargetKD``, DKD, CRD, feature terms).
        input_shape: ``(C, H, W)`` of one sample, for the dry forward of feature shapes.
        teacher_inputs: the whole training split, in sample-index order, to cache the
            teacher's logits from; None to run the teacher online.
        num_samples: training-set size, for terms sized by it (CRD); defaults to the cache's.
        Others: see ``ClassifierModule``.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        objective: Objective,
        input_shape: tuple[int, ...],
        scheduler: SchedulerFactory | None = None,
        teacher_inputs: Tensor | None = None,
        compile_model: bool = False,
        log_steps: bool = False,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(model, num_classes, optimizer, scheduler, objective, compile_model, log_steps)
        if teacher_inputs is not None and objective.needs_teacher_features:
            raise ValueError("teacher logits cannot be cached when the objective needs teacher features")
        self.teacher = teacher.requires_grad_(False).eval()
        self._teacher_inputs = teacher_inputs
        self.register_buffer("cached_teacher_logits", None, persistent=False)
        samples = num_samples if num_samples is not None else (len(teacher_inputs) if teacher_inputs is not None else 0)
        objective.prepare(model, teacher, input_shape, num_classes, samples)
        self.student_hooks = FeatureHooks(model, objective.layers("student"), "student")
        self.teacher_hooks = FeatureHooks(teacher, objective.layers("teacher"), "teacher")

    def replace_model(self, model: nn.Module, feature_aliases: dict[str, str] | None = None) -> None:
        super().replace_model(model)
        self.student_hooks.remove()  # the hooks follow the student into its new form
        self.student_hooks = FeatureHooks(model, self.objective.layers("student"), "student", feature_aliases)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()  # dropout and batch-norm statistics of the teacher stay frozen
        return self

    @torch.no_grad()
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.student_hooks.attach()
        self.teacher_hooks.attach()
        if self._teacher_inputs is None or self.cached_teacher_logits is not None:
            return
        chunks = [self.teacher(x.to(self.device)) for x in self._teacher_inputs.split(1024)]
        self.cached_teacher_logits = torch.cat(chunks)  # (N_train, K), on the training device

    def teacher_logits(self, x: Tensor, index: Tensor) -> Tensor:
        """The teacher's logits for a batch: looked up in the cache, or computed online."""
        if self.cached_teacher_logits is not None:
            return self.cached_teacher_logits[index]
        with torch.no_grad():
            return self.teacher(x)

    def compute_terms(self, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if is_dynamic(self.model):  # logit objectives only (checked before training)
            teacher = self.teacher_logits(x, index) if self.objective.needs_teacher_logits else None
            return dynamic_terms(self.model, self.objective, x, y, teacher, index)
        if not self.objective.needs_features:  # logits only: no hooks (and a graph the compiler takes whole)
            logits = self.model(x)
            return logits, self.objective(logits, y, self.teacher_logits(x, index), index=index)
        with self.student_hooks.capture() as student, self.teacher_hooks.capture() as teacher:
            logits = self.model(x)
            teacher_logits = self.teacher_logits(x, index)
        return logits, self.objective(logits, y, teacher_logits, student, teacher, index=index)

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if stage == "fit":
            self.student_hooks.remove()  # released after training; attached again by a later fit
            self.teacher_hooks.remove()
            self._teacher_inputs = None  # the cache is built; do not keep the inputs alive

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the teacher is obtained from its own config on resume; do not copy it into every checkpoint
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # put the (frozen, unchanged) teacher back so the student keys still load strictly
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

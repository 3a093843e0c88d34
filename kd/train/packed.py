"""N students of one architecture trained together: one Lightning loop, one data pipeline, one
teacher forward (or one cached-logit lookup) per step for all of them, the N forward and
backward passes one stacked computation (``torch.func.functional_call`` under ``vmap``).

Each student keeps what it would have alone: its own initial weights and data order (its seed:
the order is ``EpochShuffleSampler``'s for that seed, epoch by epoch), its own objective (its
temperature, alpha, term weights), its own optimiser parameter group (its learning rate), its
own per-epoch training and validation numbers and its own best-validation weights. The students
are plain modules whose parameters are the optimiser's leaves: each step stacks them (one copy,
differentiable), so every student's gradient and update is the one it would get alone, up to
the float reordering of batched matrix products.

Batch norm works: each student's running statistics are stacked with its parameters, updated
under ``vmap`` and written back after every training step. What a pack does not cover yet
(``unpackable_reason`` and ``kd.run.pack.alone_reason`` say which, and the launcher then runs the
job alone): feature terms (hooks), dropout (the pack's random masks would differ from a lone
run's), random augmentation, and compression stages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, Sampler

from kd.data.base import Split
from kd.data.batches import IndexedTensorDataset, _already_batched
from kd.losses.objective import Objective
from kd.train.epoch_sums import EpochSums


def unpackable_reason(model: nn.Module, objective: Objective) -> str | None:
    """Why ``model`` trained on ``objective`` cannot join a pack, or None when it can."""
    if objective.needs_features:
        return f"the objective {objective.describe()!r} reads features (hooks)"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"the student has dropout ({name})"
    return None


class PackBatches(Sampler):
    """Each step's indices for every student, ``(N, B)``: student ``i``'s epoch order is the
    permutation ``EpochShuffleSampler`` draws for seed ``seeds[i]`` (the order it sees alone)."""

    def __init__(self, seeds: Sequence[int], num_samples: int, batch_size: int, device: torch.device | None = None) -> None:
        self.seeds, self.num_samples, self.batch_size, self.device = list(seeds), num_samples, batch_size, device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        orders = torch.stack([
            torch.randperm(self.num_samples, generator=torch.Generator().manual_seed((seed * 100_003 + self.epoch) % (2**63 - 1)))
            for seed in self.seeds
        ])  # fmt: skip
        if self.device is not None:
            orders = orders.to(self.device)
        yield from orders.split(self.batch_size, dim=1)


class _EpochAware(pl.Callback):
    """Hands the epoch to the pack's sampler (Lightning does so only for samplers it knows)."""

    def __init__(self, sampler: PackBatches) -> None:
        self.sampler = sampler

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sampler.set_epoch(trainer.current_epoch)


class PackedStudents(pl.LightningModule):
    """The pack's Lightning module.

    Args:
        students: N modules of one architecture (their own initial weights).
        objectives: each student's objective (logits only).
        optimizers: each student's ``params -> Optimizer`` (one class; their own arguments).
        scheduler: ``optimizer -> LRScheduler`` for the shared optimiser (per-group base rates), or None.
        teacher: the frozen teacher, or None for baselines.
        teacher_inputs: the training inputs in sample order to cache the teacher's logits from
            once, or None to run the teacher online each step (on all N batches in one call).
        report: called after each validation with ``(epoch, step, [metrics of student i])``.
    """

    def __init__(
        self, students: Sequence[nn.Module], objectives: Sequence[Objective], optimizers: Sequence[Callable[..., torch.optim.Optimizer]],
        scheduler: Callable[..., Any] | None, teacher: nn.Module | None, teacher_inputs: Tensor | None,
        report: Callable[[int, int, list[dict[str, float]]], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not students or len({type(s) for s in students}) != 1 or len(objectives) != len(students):
            raise ValueError("a pack needs students of one architecture, one objective each")
        self.students = nn.ModuleList(students)
        self.objectives = list(objectives)
        self._make_optimizers = list(optimizers)
        self._make_scheduler = scheduler
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self._teacher_inputs = teacher_inputs
        self.cached_teacher_logits: Tensor | None = None
        self.report = report
        # the architecture for functional_call, outside the module tree (no weights of its own)
        self._architecture = (copy.deepcopy(students[0]).to("meta"),)
        self._epoch = [EpochSums() for _ in students]
        self._val: list[list[Tensor]] = []
        self.best_acc = [-math.inf] * len(students)
        self.best_epoch = [-1] * len(students)
        self.best_state: list[dict[str, Tensor]] = [{} for _ in students]
        self.history: list[list[dict[str, float]]] = []

    # -- the stacked forward ---------------------------------------------------------------------
    def stacked_logits(self, x: Tensor, shared: bool = False) -> Tensor:
        """``(N, B, K)`` logits of every student: ``x`` is ``(N, B, ...)``, each its own batch,
        or with ``shared`` ``(B, ...)``, one batch for all."""
        names = [n for n, _ in self.students[0].named_parameters()]
        params = {n: torch.stack([dict(s.named_parameters())[n] for s in self.students]) for n in names}
        buffers = {n: torch.stack([dict(s.named_buffers())[n] for s in self.students]) for n, _ in self.students[0].named_buffers()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self._architecture[0], (p, b), (xi,))

        logits = vmap(one, in_dims=(0, 0, None if shared else 0))(params, buffers, x)
        if buffers and self.training:  # batch norm updated the stacked running statistics: each student keeps its own
            with torch.no_grad():
                for name, stacked in buffers.items():
                    for student, value in zip(self.students, stacked):
                        student.get_buffer(name).copy_(value)
        return logits

    def teacher_logits(self, x: Tensor, index: Tensor) -> Tensor:
        if self.cached_teacher_logits is not None:
            return self.cached_teacher_logits[index]  # (N, B, K)
        assert self.teacher is not None
        with torch.no_grad():
            return self.teacher(x.flatten(0, 1)).unflatten(0, index.shape)  # all N batches in one call

    # -- Lightning hooks -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PackedStudents:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if self._teacher_inputs is not None and self.cached_teacher_logits is None:
            assert self.teacher is not None
            self.cached_teacher_logits = torch.cat([self.teacher(x.to(self.device)) for x in self._teacher_inputs.split(1024)])
            self._teacher_inputs = None

    def on_train_epoch_start(self) -> None:
        for objective in self.objectives:
            objective.start_epoch(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, index = batch  # (N, B, ...), (N, B), (N, B)
        logits = self.stacked_logits(x)
        teacher = self.teacher_logits(x, index) if self.teacher is not None else None
        total = logits.new_zeros(())
        n = y.shape[1]
        for i, objective in enumerate(self.objectives):  # small ops per student; the networks are stacked
            terms = objective(logits[i], y[i], None if teacher is None else teacher[i], index=index[i])
            total = total + terms["loss"]
            self._epoch[i].add({k: v.detach() * n for k, v in terms.items()}, (logits[i].detach().argmax(-1) == y[i]).sum(), n)
        return total

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        logits = self.stacked_logits(x, shared=True)  # (N, B, K): one batch for all
        losses = torch.stack([F.cross_entropy(logits[i], y, reduction="sum") for i in range(len(self.students))])
        correct = (logits.argmax(-1) == y).sum(-1)
        self._val.append(torch.stack([losses, correct.to(losses.dtype), losses.new_full(losses.shape, float(len(y)))]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        loss, correct, count = torch.stack(self._val).sum(0).tolist()
        self._val = []
        if self.trainer.sanity_checking:
            return
        # Lightning validates at the end of each training epoch, before on_train_epoch_end: the
        # epoch's training sums are complete here
        train = [sums.means(None) if sums.count else {} for sums in self._epoch]
        self._epoch = [EpochSums() for _ in self.students]
        epoch, metrics = self.current_epoch, []
        for i, student in enumerate(self.students):
            acc = correct[i] / count[i]
            found = {**train[i], "val/loss": loss[i] / count[i], "val/acc": acc}
            if not all(math.isfinite(v) for v in found.values()):
                found["diverged"] = 1.0
            elif acc > self.best_acc[i]:  # strictly better: the first best epoch, as ModelCheckpoint keeps it
                self.best_acc[i], self.best_epoch[i] = acc, epoch
                self.best_state[i] = {k: v.detach().clone() for k, v in student.state_dict().items()}
            metrics.append(found)
        self.history.append(metrics)
        if self.report is not None:  # at the step a lone run's logger uses: the last optimiser step's index
            self.report(epoch, self.global_step - 1, metrics)

    def configure_optimizers(self) -> Any:
        optimizers = [make(list(s.parameters())) for make, s in zip(self._make_optimizers, self.students)]
        kinds = {type(o) for o in optimizers}
        if len(kinds) != 1:
            raise ValueError(f"a pack's students share one optimiser class, got {sorted(k.__name__ for k in kinds)}")
        merged = optimizers[0]
        for other in optimizers[1:]:  # each student a parameter group with its own arguments
            for group in other.param_groups:
                merged.add_param_group(group)
        if self._make_scheduler is None:
            return merged
        return {"optimizer": merged, "lr_scheduler": {"scheduler": self._make_scheduler(merged), "interval": "epoch"}}


def pack_loader(train: Split, seeds: Sequence[int], batch_size: int) -> tuple[DataLoader, PackBatches]:
    """The pack's training loader (each student's batch order from its seed) and its sampler."""
    sampler = PackBatches(seeds, len(train.y), batch_size)
    loader = DataLoader(IndexedTensorDataset(train.x, train.y), sampler=sampler, batch_size=None, collate_fn=_already_batched)
    return loader, sampler


def epoch_callback(sampler: PackBatches) -> pl.Callback:
    return _EpochAware(sampler)

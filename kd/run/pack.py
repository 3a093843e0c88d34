"""Several jobs of a multirun as one training (``hydra/launcher=packed``): the jobs that share
everything that shapes the computation and differ only in what each student can carry alone
(``seed``, ``distill.*``, ``student.optimizer.*`` but its class) train as one pack
(``kd.train.packed``); each keeps its own MLflow run (a child of the sweep's), its per-epoch
metrics, its best-validation weights, test, measurement and ``student.pt`` in its own folder.

``pack_key`` groups jobs; ``run_pack`` runs one group and returns, per job, its metrics or the
exception that failed it (one student diverging fails its own run, not the others').
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd.data import TensorDataModule
from kd.run.config import check_counts, check_keys, check_optimizers, check_switches, experiment_name
from kd.run.identity import run_identity
from kd.run.known_warnings import ignore_known_warnings
from kd.run.progress import phase
from kd.run.signals import sigterm_ends_the_run
from kd.run.teacher_step import obtain as obtain_teacher
from kd.run.summary import summary_metrics
from kd.tracking import keys
from kd.tracking.keys import flatten
from kd.tracking.measure import Measurement, accuracy
from kd.tracking.store import resolve_uri
from kd.tracking.tracker import Tracker
from kd.train.checkpoint import save_weights
from kd.train.packed import PackedStudents, epoch_callback, pack_loader, unpackable_reason
from kd.train.teacher import seeded
from kd.train.trainer import Trainers

log = logging.getLogger(__name__)

# What each student of a pack carries alone; everything else must be equal across the pack.
CARRIED = ("seed", "distill.", "student.optimizer.")
# ... but these shape the computation or the pack's optimiser: equal across the pack
SHARED_INSIDE = ("student.optimizer._target_", "student.optimizer._partial_")
# Config groups a pack does not cover yet: a job that sets one runs alone.
ALONE_GROUPS = ("prune", "quantize", "factorize")


class NotPackable(ValueError):
    """The jobs' students cannot train together (found once they are built, before anything
    opens or trains): the launcher runs each alone."""


@dataclass
class Job:
    """One job of a pack: its task config (``paths.run_dir`` its own folder) and what Hydra knows
    of it (``kd.run.tracker.hydra_context``: choices and the sweep's tags)."""

    cfg: DictConfig
    context: dict[str, Any]


def _carried(key: str) -> bool:
    return key.startswith(CARRIED) and key not in SHARED_INSIDE or key == "seed"


def pack_key(cfg: DictConfig) -> str | None:
    """Equal for jobs that can train in one pack; None for a job that must run alone (with the
    reason logged by ``alone_reason``)."""
    if alone_reason(cfg) is not None:
        return None
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    shared = {k: v for k, v in flat.items() if not _carried(k) and not k.startswith(("paths", "tracking", "resume", "hydra"))}
    needs_teacher = get_needs_teacher(cfg)
    return hashlib.sha256(json.dumps([shared, needs_teacher], sort_keys=True, default=str).encode()).hexdigest()[:16]


def get_needs_teacher(cfg: DictConfig) -> bool:
    return not str(cfg.distill.get("_target_", "")).endswith("CrossEntropy") or bool(cfg.distill.get("terms"))


def alone_reason(cfg: DictConfig) -> str | None:
    """Why the job cannot join a pack, read from its config (the students' modules are checked
    again when the pack is built), or None."""
    for group in ALONE_GROUPS:
        if cfg.get(group) and "_target_" in cfg[group]:
            return f"{group}={cfg[group]._target_.rsplit('.', 1)[-1]} (compression stages train alone for now)"
    if cfg.get("compile"):
        return "compile=true"
    if cfg.data.get("augment") or cfg.teacher.get("augment"):
        return "random augmentation (each student's augmented batch would differ from its lone run)"
    if cfg.student.get("init_checkpoint") or cfg.student.get("omit_classes"):
        return "student.init_checkpoint / student.omit_classes"
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer.get("gradient_clip_val"):
        return "trainer.gradient_clip_val (a norm over the pack would mix the students)"
    if trainer.get("strategy") not in (None, "auto") or trainer.get("devices") not in (1, "1", None):
        return "more than one device (DDP packs are not built yet)"
    if trainer.get("accumulate_grad_batches", 1) != 1:
        return "trainer.accumulate_grad_batches"
    return None


def run_pack(jobs: Sequence[Job]) -> list[dict[str, float] | BaseException]:
    """Train ``jobs`` (one ``pack_key``) as one pack; per job its metrics or what failed it.
    SIGTERM ends it as it ends a lone run: every open run FAILED, exit status 143."""
    with sigterm_ends_the_run():
        return _run_pack(jobs)


def _run_pack(jobs: Sequence[Job]) -> list[dict[str, float] | BaseException]:
    ignore_known_warnings()  # in the launching process, where no lone run has applied them
    cfgs = [job.cfg for job in jobs]
    first = cfgs[0]
    for cfg in cfgs:  # every value checked before anything opens, as a lone run checks it
        check_counts(cfg)
        check_switches(cfg)
        check_keys(cfg.trainer)
    objectives = [instantiate(cfg.distill) for cfg in cfgs]
    data: TensorDataModule = instantiate(first.data)
    data.prepare_data()
    data.setup("fit")
    model_args = {"num_classes": data.num_classes, "input_shape": data.input_shape}
    build_student = partial(instantiate(first.student.model), **model_args)
    needs_teacher = objectives[0].needs_teacher
    build_teacher = partial(instantiate(first.teacher.model), **model_args) if needs_teacher else None
    for cfg in cfgs:
        check_optimizers(cfg, ("student", "teacher") if needs_teacher and not cfg.teacher.checkpoint else ("student",))
    students = [seeded(cfg.seed, build_student)() for cfg in cfgs]  # each its own seed's initial weights
    for student, objective in zip(students, objectives):
        if (reason := unpackable_reason(student, objective)) is not None:
            raise NotPackable(f"these jobs cannot train as a pack: {reason}")
        if objective.needs_teacher != needs_teacher:
            raise NotPackable("a pack's students all distil from the teacher or none does")
        if build_teacher is not None:
            objective.prepare(student, build_teacher(), data.input_shape, data.num_classes, len(data.train.y))
    # the callbacks without their checkpoint (trainers.callbacks(checkpoints=False)): each student keeps its best weights itself
    trainers = Trainers(OmegaConf.to_container(first.trainer, resolve=True), {n: instantiate(c) for n, c in first.callbacks.items() if c is not None})
    trainers.check()
    measurement = Measurement(first.measure.large_batch, first.measure.latency, first.measure.get("threads", 1))
    output_root = Path(first.paths.output_root)
    tracker = Tracker(resolve_uri(first.tracking.uri, output_root), experiment_name(first), output_root / "mlartifacts")

    identities = [run_identity(cfg, objective, (), job.context, tracker.experiment_name) for cfg, objective, job in zip(cfgs, objectives, jobs)]
    results: list[dict[str, float] | BaseException] = [RuntimeError("not run")] * len(jobs)
    todo = []
    for i, (cfg, (name, tags)) in enumerate(zip(cfgs, identities)):
        if cfg.resume and (done := tracker.finished_run(tags["kd.config_hash"])) is not None:
            log.info("resume: skipping '%s', FINISHED as run %s", name, done.pop("run_id"))
            results[i] = done
        else:
            todo.append(i)
    if not todo:
        return results
    if len(todo) < len(jobs):  # the pack shrinks to the jobs still to run
        pick = lambda values: [values[i] for i in todo]  # noqa: E731
        jobs, cfgs, objectives, students, identities = pick(jobs), pick(cfgs), pick(objectives), pick(students), pick(identities)
    trained = _train(jobs, cfgs, objectives, students, identities, data, build_teacher, trainers, measurement, tracker)
    for i, result in zip(todo, trained):
        results[i] = result
    return results


def _train(
    jobs: Sequence[Job], cfgs: list[DictConfig], objectives: list[Any], students: list[Any], identities: list[tuple[str, dict[str, str]]],
    data: TensorDataModule, build_teacher: Any, trainers: Trainers, measurement: Measurement, tracker: Tracker,
) -> list[dict[str, float] | BaseException]:  # fmt: skip
    first = cfgs[0]
    results: list[dict[str, float] | BaseException] = [RuntimeError("not run")] * len(jobs)
    with contextlib.ExitStack() as stack:
        run_ids = []
        for (name, tags), job in zip(identities, jobs):
            run_id = stack.enter_context(tracker.open_run(name, tags | job.context["tags"] | {"kd.packed": str(len(jobs))}))
            tracker.log_config(run_id, OmegaConf.to_container(job.cfg, resolve=True))
            run_ids.append(run_id)
        teacher = None
        if build_teacher is not None:
            teacher = obtain_teacher(first, trainers, measurement, data, build_teacher, tracker, jobs[0].context)
            for run_id in run_ids:
                tracker.set_tags(run_id, {"kd.teacher_fingerprint": teacher.fingerprint, "kd.teacher_source": teacher.source,
                                          **({"kd.teacher_run_id": teacher.run_id} if teacher.run_id else {})})  # fmt: skip
        cache = teacher is not None and all(cfg.distill_cache for cfg in cfgs) and objectives[0].needs_teacher_logits
        for run_id in run_ids:
            if teacher is not None:
                tracker.set_tags(run_id, {"kd.teacher_logits": "cached" if cache else "online"})

        def report(epoch: int, step: int, metrics: list[dict[str, float]]) -> None:
            for run_id, found in zip(run_ids, metrics):
                tracker.log_metrics(run_id, {k: v for k, v in found.items() if k != "diverged" and math.isfinite(v)} | {"epoch": epoch}, step=step)

        pl.seed_everything(first.seed, workers=True, verbose=False)
        module = PackedStudents(
            students, objectives, [instantiate(cfg.student.optimizer) for cfg in cfgs],
            instantiate(first.student.scheduler) if first.student.scheduler else None,
            teacher.model if teacher is not None else None, data.train.x if cache else None, report,
        )  # fmt: skip
        loader, sampler = pack_loader(data.train, [cfg.seed for cfg in cfgs], data.batch_size)
        trainer = trainers.build([*trainers.callbacks(checkpoints=False).values(), epoch_callback(sampler)], False,
                                 first.trainer.max_epochs, enable_checkpointing=False)  # fmt: skip
        log.info("pack: %d students trained together (%s)", len(jobs), ", ".join(name for name, _ in identities))
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=data.val_dataloader())

        with phase(f"pack: testing, measuring and saving {len(jobs)} students"):
            teacher_acc = accuracy(teacher.model.cpu().eval(), data.test.x, data.test.y) if teacher is not None else None
            teacher_metrics = keys.prefixed(keys.TEACHER, measurement(teacher.model, data.input_shape)) if teacher is not None else {}
            latency: dict[str, float] = {}
            for i, (cfg, student, run_id) in enumerate(zip(cfgs, students, run_ids)):
                try:
                    results[i] = _finish(i, cfg, module, student, data, measurement, latency, teacher_acc, teacher_metrics,
                                         tracker, run_id, trainer.global_step)  # fmt: skip
                except Exception as err:  # noqa: BLE001  (this student's run fails; the others go on)
                    tracker.fail(run_id, err)
                    results[i] = err
    return results


def _finish(
    i: int, cfg: DictConfig, module: PackedStudents, student: Any, data: TensorDataModule, measurement: Measurement,
    latency: dict[str, float], teacher_acc: float | None, teacher_metrics: dict[str, float], tracker: Tracker, run_id: str, step: int,
) -> dict[str, float]:  # fmt: skip
    """Student ``i`` after the pack's fit: its validation-selected weights tested, measured, saved, logged."""
    diverged = [e for e, epoch in enumerate(module.history) if "diverged" in epoch[i]]
    if diverged:
        raise FloatingPointError(f"training diverged in epoch {diverged[0]}: loss not finite; lower the learning rate "
                                 "or set trainer.gradient_clip_val")  # fmt: skip
    student.load_state_dict(module.best_state[i])
    student = student.cpu().eval()
    final = {keys.VAL_ACC_BEST: module.best_acc[i], keys.TEST_ACC: accuracy(student, data.test.x, data.test.y)}
    measured = measurement(student, data.input_shape) if not latency else Measurement(measurement.large_batch, False)(student, data.input_shape)
    if not latency:  # one architecture: its latency timed once for the pack
        latency.update({k: v for k, v in measured.items() if k.startswith(("latency_ms_b", "latency_spread_b"))})
    final.update(keys.prefixed(keys.MODEL, measured | latency))
    if teacher_acc is not None:
        final[keys.TEACHER_TEST_ACC] = teacher_acc
        final.update(teacher_metrics)
    final.update(summary_metrics(final, None))
    tracker.log_metrics(run_id, final, step=step)
    tracker.set_tags(run_id, {"kd.best_epoch": str(module.best_epoch[i])})
    path = save_weights(student, Path(cfg.paths.run_dir) / "student.pt")
    tracker.log_artifact(run_id, path)
    tracker.log_text(run_id, OmegaConf.to_yaml({k: float(v) for k, v in final.items()}), "summary.yaml")
    return final


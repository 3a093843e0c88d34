"""One run, as a readable list of steps: data, teacher, student, fit, test, measure, log.

``run(cfg)`` is a plain function of a composed config (tests call it directly; ``run.py`` is
only the Hydra shim) and returns the metrics, ``val/acc_best`` being what a sweeper optimises.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from callbacks import CompressionStage, PruningCallback, StageContext, check_combination, in_order
from kd.data import TensorDataModule
from callbacks.quant_engine import RECIPE_KEY, lowering
from kd.run.compress import finetune, quantized_metrics
from kd.models.slimmable import Slimmable
from kd.run import exits, slimmable
from kd.run.export import export_student, export_widths
from kd.run.config import check_counts, check_keys, check_optimizers, check_switches, experiment_name
from kd.run.identity import run_identity
from kd.run.known_warnings import ignore_known_warnings  # noqa: F401  (re-exported: tests re-apply the filters)
from kd.run.omitted import bias_correction, drop_classes, omitted_classes
from kd.run.progress import phase
from kd.run.signals import sigterm_ends_the_run
from kd.run.summary import print_summary, summary_metrics
from kd.tracking import keys
from kd.tracking.measure import NOISY, Measurement, accuracy, noisy_latencies
from kd.tracking.store import resolve_uri
from kd.tracking.tracker import Tracker, hydra_context
from kd.train.checkpoint import load_weights, save_weights
from kd.train.modules import ClassifierModule, DistillationModule
from kd.run.teacher_step import obtain as obtain_teacher
from kd.train.teacher import Teacher, seeded
from kd.train.trainer import Trainers, compile_choice

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Distil (or train a baseline) as ``cfg`` says; every number lands in MLflow. SIGTERM ends
    it like Ctrl-C: its MLflow runs close FAILED and the process exits 143."""
    with sigterm_ends_the_run():
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, float]:
    # 1. Build and check everything that can fail on bad input, before any training.
    check_counts(cfg)
    check_switches(cfg)
    objective = instantiate(cfg.distill)
    data: TensorDataModule = instantiate(cfg.data)
    data.prepare_data()  # missing data fails here, with how to get it
    data.setup("fit")
    model_args = {"num_classes": data.num_classes, "input_shape": data.input_shape}
    build_student = partial(instantiate(cfg.student.model), **model_args)
    build_teacher = partial(instantiate(cfg.teacher.model), **model_args) if objective.needs_teacher else None
    check_keys(cfg.trainer)
    teacher_trains = build_teacher is not None and not cfg.teacher.checkpoint
    check_optimizers(cfg, ("student", "teacher") if teacher_trains else ("student",))
    student = seeded(cfg.seed, build_student)()
    if cfg.student.init_checkpoint:
        try:
            load_weights(student, cfg.student.init_checkpoint, cfg.student.allow_pickle, data.input_shape)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"student.init_checkpoint: {err}") from err
    policy: exits.ExitPolicy | None = None
    if cfg.student.get("exits") is not None:  # student=multi_exit: heads on named stages, checked now
        student, policy = seeded(cfg.seed, partial(exits.build, cfg.student.exits, student, data.num_classes, data.input_shape, objective))()
    elif cfg.student.get("widths") is not None:  # student=slimmable: every width checked now
        student = slimmable.build(cfg.student, student, data.num_classes, data.input_shape, objective)
    dynamic = "student=multi_exit" if policy is not None else "student=slimmable" if isinstance(student, Slimmable) else None
    omit = omitted_classes(cfg.student.get("omit_classes"), data.num_classes)
    if build_teacher is not None:  # architecture, layer names and feature shapes checked now, not after a teacher trained
        train_size = len(drop_classes(data.train, omit).y) if omit else len(data.train.y)
        probe = build_teacher()
        if cfg.teacher.checkpoint:  # the given weights must fit the architecture (loaded again in step 2)
            try:
                load_weights(probe, cfg.teacher.checkpoint, cfg.teacher.allow_pickle, data.input_shape)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"teacher.checkpoint: {err}") from err
        prepare = partial(objective.prepare, student, probe, data.input_shape, data.num_classes, train_size)
        seeded(cfg.seed, prepare)()  # the terms' own parameters (regressors, heads) from the run's seed
    trainers = Trainers(
        OmegaConf.to_container(cfg.trainer, resolve=True),
        {name: instantiate(c) for name, c in cfg.callbacks.items() if c is not None},  # the one instantiation
    )
    trainers.check()
    measurement = Measurement(cfg.measure.large_batch, cfg.measure.latency, cfg.measure.get("threads", 1))
    callbacks = trainers.callbacks()
    pruner: PruningCallback | None = _optional(cfg, "prune")
    if pruner is not None:
        pruner.build_model = build_student  # lottery tickets' random re-initialisation
    stages: list[CompressionStage] = in_order([s for s in (pruner, _optional(cfg, "factorize"), _optional(cfg, "quantize")) if s])
    check_combination(stages)  # pairs that do not combine, before any training
    if dynamic is not None and stages:
        raise ValueError(f"{dynamic} with {', '.join(f'{s.group}={s.describe()}' for s in stages)} is not supported: "
                         "the stages would rewrite its layers (heads, widths) with the backbone; compress a width in its own run")  # fmt: skip
    checks = StageContext(data, objective, cfg.trainer.max_epochs, Path(cfg.paths.run_dir), stages,
                          measure=lambda model: measurement(model, data.input_shape))  # fmt: skip
    for stage in stages:  # layer names, amounts, schedules, bits, before any training, on the model each will see
        stage.check(student, checks)
        student = stage.prepare(student, checks)
    first = [s for s in stages if s.prepares_graph]  # QAT's graph first, a pruner's masks on it
    training = {stage.group: stage.callbacks() for stage in first + [s for s in stages if not s.prepares_graph]}
    for group, added in training.items():
        callbacks |= {f"{group}{'' if i == 0 else i}": c for i, c in enumerate(added)}
    if dynamic is not None and cfg.get("compile", False):
        log.warning("compile=true ignored for the student: %s changes its computation per step; training eagerly", dynamic)
    compiled = compile_choice(bool(cfg.get("compile", False)) and dynamic is None, objective, data, *stages)
    if any(training.values()):  # stages that train: they write the selection key
        for c in callbacks.values():
            if isinstance(c, ModelCheckpoint) and c.monitor == keys.VAL_ACC:
                c.monitor = keys.SELECTION  # select among the epochs every stage counts (final sparsity, quantized form)

    output_root = Path(cfg.paths.output_root)
    tracker = Tracker(
        resolve_uri(cfg.tracking.uri, output_root),
        experiment_name(cfg),  # <experiment>-debug for a smoke test (trainer=debug)
        artifact_root=output_root / "mlartifacts",
        enabled=rank_zero_only.rank == 0,
    )
    context = hydra_context()
    name, tags = run_identity(cfg, objective, tuple(stages), context, tracker.experiment_name)
    fingerprint_cfg = tags["kd.config_hash"]
    if cfg.resume and (done := tracker.finished_run(fingerprint_cfg)) is not None:
        log.info("resume: skipping '%s', FINISHED as run %s", name, done.pop("run_id"))
        return done
    with tracker.open_run(name, tags | context["tags"]) as run_id:
        tracker.log_config(run_id, OmegaConf.to_container(cfg, resolve=True))

        # 2. The teacher: loaded, reused by fingerprint, or trained once here.
        teacher = None
        if build_teacher is not None:
            teacher = obtain_teacher(cfg, trainers, measurement, data, build_teacher, tracker, context)
            tracker.set_tags(run_id, {
                "kd.teacher_fingerprint": teacher.fingerprint,
                "kd.teacher_source": teacher.source,
                **({"kd.teacher_run_id": teacher.run_id} if teacher.run_id else {}),
            })  # fmt: skip

        if omit:  # the student's transfer set lacks these classes; the teacher saw them
            data.train = drop_classes(data.train, omit)
            tracker.set_tags(run_id, {"kd.omit_classes": ",".join(map(str, omit))})

        # 3. The student's module and trainer; same seed whether or not a teacher was trained.
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = _student_module(cfg, objective, student, teacher, data, tracker, run_id, compiled)
        trainer = trainers.build(list(callbacks.values()), tracker.lightning_logger(run_id), cfg.trainer.max_epochs)
        trainer.fit(module, datamodule=data)
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        final = {keys.VAL_ACC_BEST: float(checkpoint.best_model_score if best_path else trainer.callback_metrics[keys.VAL_ACC])}

        # 4. Test the validation-selected epoch (Lightning logs test/acc into the run).
        with phase("testing the validation-selected epoch" + (" and the teacher" if teacher is not None else "")):
            tested = trainer.test(module, datamodule=data, ckpt_path=best_path or None, verbose=False)[0]
            teacher_acc = trainers.test_accuracy(teacher.model, data) if teacher is not None else None
        if rank_zero_only.rank != 0:
            return final  # under DDP, rank zero alone measures and logs
        if omit:
            final.update(bias_correction(module.model, data, omit))

        # 5. Each stage finalises in order (fold masks and thin, factorise, convert); measure; log, save.
        extras: dict[str, Any] = {}
        deployed = None
        finishing = StageContext(
            data, objective, cfg.trainer.max_epochs, Path(cfg.paths.run_dir), stages,
            measure=lambda model: measurement(model, data.input_shape),
            test_accuracy=lambda model: accuracy(model.cpu().eval(), data.test.x, data.test.y),
            finetune=lambda epochs, lr_scale, extra=(): finetune(trainers, module, data, epochs, lr_scale, extra),
        )  # fmt: skip
        reshaped_by = None  # the first stage that measured the student before changing it (dense/*)
        saved: list[Path] = []  # what the summary names: student.pt and the other artifacts
        found, files, narrower = {}, [], {}  # a dynamic student's report; a slimmable one's narrower widths as plain models
        if policy is not None:
            with phase("early exits: the thresholds on validation, the chosen one on test"):
                found, files = exits.report(module.model, policy, data, Path(cfg.paths.run_dir))
        elif isinstance(module.model, Slimmable):
            with phase(f"slimmable: testing and measuring widths {', '.join(f'{w:g}' for w in module.model.widths)}"):
                found, files, narrower = slimmable.report(module.model, data, lambda m: measurement(m, data.input_shape),
                                                          Path(cfg.paths.run_dir))  # fmt: skip
        final.update(found)
        for path in files:
            tracker.log_artifact(run_id, path)
        saved += files
        for stage in stages:
            with phase(f"{stage.group}: finalising {stage.describe()}"):
                result = stage.finalize(module.model, finishing)
            module.model = result.model
            dense = {k: v for k, v in result.metrics.items() if k.startswith(keys.DENSE + "/")}
            if dense and reshaped_by is None:
                reshaped_by = stage.group
                final.update(dense)
            final.update({k: v for k, v in result.metrics.items() if k not in dense})
            extras.update(result.extras)
            for path in result.artifacts:
                tracker.log_artifact(run_id, path)
            saved += result.artifacts
            if result.tags:
                tracker.set_tags(run_id, result.tags)
            if result.test_acc is not None:  # the stage changed the tested model (factorisation)
                tested[keys.TEST_ACC] = final[keys.TEST_ACC] = result.test_acc
            if result.deployed is not None:
                deployed = result
        measured = ["the student"] + (["its int8 form"] if deployed is not None else []) + (["the teacher"] if teacher else [])
        timing = {True: " (latency: quick)", "quick": " (latency: quick)", "full": " (latency: full benchmark)"}.get(measurement.latency, "")
        with phase("measuring " + ", ".join(measured) + timing):
            final.update(keys.prefixed(keys.MODEL, measurement(module.model, data.input_shape)))
            if deployed is not None:  # the int8 model: tested on the CPU, measured, saved beside the float one
                lower = lowering(deployed.deployed_extras.get(RECIPE_KEY))  # PT2E: timed compiled, beside float compiled
                final.update(quantized_metrics(measurement, module.model, deployed.deployed, data, final, float(tested[keys.TEST_ACC]), lower))
            if teacher is not None:
                final[keys.TEACHER_TEST_ACC] = teacher_acc
                final.update(keys.prefixed(keys.TEACHER, measurement(teacher.model, data.input_shape)))
        if cfg.get("export", "none") == "onnx":
            with phase("exporting to ONNX and checking it in onnxruntime"):
                int8, engine = (deployed.deployed, deployed.deployed_extras[RECIPE_KEY].get("engine", "fx")) if deployed else (None, None)
                exported, export_tags, files = export_student(module.model, int8, engine, data, measurement, Path(cfg.paths.run_dir), final)
                if narrower:
                    more = export_widths(narrower, data, measurement, Path(cfg.paths.run_dir))
                    exported, export_tags, files = exported | more[0], export_tags | more[1], files + more[2]
            final.update(exported)
            tracker.set_tags(run_id, export_tags)
            for path in files:
                tracker.log_artifact(run_id, path)
            saved += files
        if noisy := noisy_latencies(final):  # a busy machine: the medians are less trustworthy than they look
            log.warning("latency spread above %d%% of the median for %s: the machine was busy while timing", NOISY * 100, ", ".join(noisy))
            tracker.set_tags(run_id, {"kd.latency_noisy": ",".join(noisy)})
        final.update(summary_metrics(final, reshaped_by))
        metrics = {keys.TEST_ACC: float(tested[keys.TEST_ACC]), **final}
        with phase("saving the student and logging to MLflow"):
            tracker.log_metrics(run_id, final, step=trainer.global_step)
            student_pt = save_weights(module.model, Path(cfg.paths.run_dir) / "student.pt", extras)
            saved.insert(0, student_pt)
            tracker.log_artifact(run_id, student_pt)
            if deployed is not None:
                int8_extras = extras | deployed.deployed_extras  # the reshaping (channels, factors) and the recipe
                saved.insert(1, save_weights(deployed.deployed, Path(cfg.paths.run_dir) / "student_int8.pt", int8_extras))
                tracker.log_artifact(run_id, saved[1])
            tracker.log_text(run_id, OmegaConf.to_yaml({k: float(v) for k, v in metrics.items()}), "summary.yaml")
        print_summary(name, metrics, teacher, tracker, Path(cfg.paths.run_dir), saved, run_id)
    return metrics


def _student_module(
    cfg: DictConfig, objective: Any, student: nn.Module, teacher: Teacher | None,
    data: TensorDataModule, tracker: Tracker, run_id: str, compiled: bool,
) -> ClassifierModule:  # fmt: skip
    scfg = cfg.student
    common = {
        "num_classes": data.num_classes,
        "optimizer": instantiate(scfg.optimizer),
        "scheduler": instantiate(scfg.scheduler) if scfg.scheduler else None,
        "objective": objective,
        "compile_model": compiled,
        "log_steps": bool(cfg.log_steps),
    }
    if teacher is None:
        return ClassifierModule(student, **common)
    if not cfg.distill_cache:
        cache, why = False, "distill_cache=false"
    elif objective.needs_teacher_features:
        cache, why = False, "the objective needs teacher features every step"
    elif not objective.needs_teacher_logits:
        cache, why = False, "the objective reads no teacher logits"
    elif not data.deterministic_inputs:
        cache, why = False, "random augmentation changes the inputs every epoch"
    else:
        cache, why = True, "inputs are deterministic"
    mode = "cached" if cache else "online"
    if rank_zero_only.rank == 0:
        log.info("teacher logits: %s (%s)", mode, why)
    tracker.set_tags(run_id, {"kd.teacher_logits": mode})
    return DistillationModule(
        student, teacher.model, input_shape=data.input_shape, teacher_inputs=data.train.x if cache else None,
        num_samples=len(data.train.y), **common,
    )


def _optional(cfg: DictConfig, group: str) -> Any:
    """The object of an optional group (``prune``, ``quantize``, ``factorize``), or None for its
    ``none`` option. An experiment that sets keys of the group and a command line that picks
    ``none`` (a baseline of the experiment: ``experiment=... prune=none``) leave keys without a
    ``_target_``: they are ignored, and the log says which."""
    node = cfg.get(group)
    if not node:
        return None
    if "_target_" not in node:
        log.warning("%s=none: ignoring %s", group, ", ".join(f"{group}.{k}" for k in node))
        return None
    return instantiate(node)

"""The run's teacher step: its recipe (everything that changes its weights, fingerprinted), and
how it trains when no cached or given teacher matches (its own MLflow run, the run's trainer
settings and callbacks but no checkpoint: it keeps its last weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.data import TensorDataModule
from kd.tracking import keys
from kd.tracking.keys import flatten
from kd.tracking.measure import Measurement
from kd.tracking.tracker import Tracker
from kd.train.modules import ClassifierModule
from kd.train.teacher import Teacher, fingerprint, obtain_teacher, seeded
from kd.train.trainer import Trainers


# Trainer arguments that change what is shown, not what is trained (max_epochs: the teacher's own).
_DISPLAY_ONLY = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "num_sanity_val_steps", "max_epochs"}


def obtain(
    cfg: DictConfig, trainers: Trainers, measurement: Measurement, data: TensorDataModule, build: Any, tracker: Tracker,
    context: dict[str, Any],
) -> Teacher:  # fmt: skip
    tcfg = cfg.teacher
    augment = data.augment if tcfg.get("augment") is None else bool(tcfg.augment)  # the teacher's own, if set
    recipe = {
        "model": OmegaConf.to_container(tcfg.model, resolve=True),
        "data": _with_augment(data, augment, data.fingerprint) | {"batch_size": data.batch_size},
        "seed": tcfg.seed,
        "max_epochs": tcfg.max_epochs,
        "optimizer": OmegaConf.to_container(tcfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(tcfg.scheduler, resolve=True) if tcfg.scheduler else None,
        # everything in the trainer that changes the weights (limit_train_batches under
        # trainer=debug, precision, devices and strategy: DDP changes the effective batch)
        "trainer": {k: v for k, v in trainers.settings.items() if k not in _DISPLAY_ONLY},
    }

    def make_module(model: nn.Module) -> ClassifierModule:
        scheduler = instantiate(tcfg.scheduler) if tcfg.scheduler else None
        return ClassifierModule(model, data.num_classes, instantiate(tcfg.optimizer), scheduler, compile_model=bool(cfg.compile))

    def train(module: ClassifierModule) -> tuple[dict[str, float], str | None]:
        arch = context["choices"].get("model@teacher.model", type(module.model).__name__)
        tags = {"kd.role": "teacher", "kd.fingerprint": recipe_fp, **context["tags"]}
        with tracker.open_run(f"teacher {arch}", tags) as run_id:
            tracker.log_params(run_id, {"teacher.fingerprint": recipe_fp} | {f"teacher.{k}": v for k, v in flatten(recipe).items()})
            own = list(trainers.callbacks(checkpoints=False).values())  # the teacher keeps its last weights
            trainer = trainers.build(own, tracker.lightning_logger(run_id), tcfg.max_epochs, enable_checkpointing=False)
            _with_augment(data, augment, lambda: trainer.fit(module, datamodule=data))
            metrics = {keys.VAL_ACC: float(trainer.callback_metrics[keys.VAL_ACC])}
            metrics[keys.TEST_ACC] = float(trainer.test(module, datamodule=data, verbose=False)[0][keys.TEST_ACC])
            tracker.log_metrics(run_id, keys.prefixed(keys.MODEL, measurement(module.model, data.input_shape)))
            return metrics, run_id or None

    recipe_fp = fingerprint(recipe)
    return obtain_teacher(
        build=seeded(tcfg.seed, build),
        recipe=recipe,
        data=data,
        cache_dir=Path(cfg.paths.teacher_cache),
        checkpoint=tcfg.checkpoint,
        allow_pickle=tcfg.allow_pickle,
        train=train,
        make_module=make_module,
    )


def _with_augment(data: TensorDataModule, augment: bool, call: Any) -> Any:
    """``call()`` with the data's random augmentation switched to ``augment`` (the teacher's
    ``teacher.augment``: Hinton et al.'s teacher trains on jittered images, the student not)."""
    saved, data.augment = data.augment, augment
    try:
        return call()
    finally:
        data.augment = saved

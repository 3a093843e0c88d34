"""The config tree's OmegaConf resolvers (registered when ``kd`` is imported), and the checks of
config values that no class owns (seeds, epoch counts, a trainer's keys), run before anything is built."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from kd.tracking.keys import flatten


def _epoch(total: int, fraction: float) -> int:
    """``${kd.epoch:${trainer.max_epochs},0.5}``: an epoch as a fraction of the run, at least 1
    (schedules follow ``trainer.max_epochs`` without the user recomputing them)."""
    return max(1, int(int(total) * float(fraction)))


def _launch_id() -> str:
    """``${kd.launch:}``: the id of the process that launched this run or sweep, so folders started
    in the same second differ. Kept in ``$KD_LAUNCH_ID`` once set, so the processes a launch
    starts (joblib and submitit workers, DDP ranks), which resolve the folder again, agree on it."""
    return os.environ.setdefault("KD_LAUNCH_ID", str(os.getpid()))


def _layers(width: int, depth: int) -> list[int]:
    """``${kd.layers:${search.width},${search.depth}}``: ``depth`` hidden layers of ``width``
    units (a searched MLP's ``hidden``)."""
    width, depth = int(width), int(depth)
    if width < 1 or depth < 1:
        raise ValueError(f"kd.layers needs a width and a depth >= 1, got {width}, {depth}")
    return [width] * depth


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("kd.epoch", _epoch, replace=True)
    OmegaConf.register_new_resolver("kd.layers", _layers, replace=True)
    OmegaConf.register_new_resolver("kd.launch", _launch_id, replace=True)


register_resolvers()


def check_counts(cfg: DictConfig) -> None:
    """Seeds and epoch counts, before anything is built: Lightning reads ``max_epochs=-1`` as
    "forever" and 0 trains nothing (the run then fails after MLflow runs opened), and a seed that
    is not an integer fails inside Lightning without naming the key (or trains another seed)."""
    for key, low in (("seed", 0), ("teacher.seed", 0), ("data.split_seed", 0), ("trainer.max_epochs", 1), ("teacher.max_epochs", 1)):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


# Switches that are true or false: a string such as `compile=maybe` is truthy in Python and would
# silently switch the feature on.
_SWITCHES = ("resume", "distill_cache", "compile", "log_steps", "data.augment", "data.augment_flip",
             "student.allow_pickle", "teacher.allow_pickle")  # fmt: skip


def check_switches(cfg: DictConfig) -> None:
    """The run's on/off keys are booleans, ``teacher.augment`` a boolean or null and ``export``
    none or onnx (``measure.*``: checked by ``Measurement``)."""
    for key in (*_SWITCHES, "teacher.augment"):
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool) and not (value is None and key == "teacher.augment"):
            allowed = "true, false or null" if key == "teacher.augment" else "true or false"
            raise ValueError(f"{key} must be {allowed}, got {value!r}")
    export = cfg.get("export", "none")
    if export not in ("none", "onnx"):
        raise ValueError(f"export must be one of ('none', 'onnx'), got {export!r}")
    every = OmegaConf.select(cfg, "trainer.log_every_n_steps", default=50)
    if cfg.get("log_steps") and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"log_steps=true logs every trainer.log_every_n_steps steps, which must be an integer >= 1, got {every!r}")


def check_optimizers(cfg: DictConfig, roles: tuple[str, ...]) -> None:
    """Build each role's optimiser and scheduler on a stand-in parameter, so a negative learning
    rate or a misspelled argument is refused with its key before a teacher trains (torch checks
    its own arguments; the momentum check is kd's: SGD with momentum >= 1 never settles)."""
    import torch
    from hydra.utils import instantiate

    for role in roles:
        node = cfg[role]
        momentum = node.optimizer.get("momentum")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1):
            raise ValueError(f"{role}.optimizer.momentum must be a number in [0, 1), got {momentum!r}")
        try:
            optimizer = instantiate(node.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        except Exception as err:  # torch's own checks: lr, weight_decay, betas, eps
            raise ValueError(f"{role}.optimizer ({node.optimizer._target_}) refuses its arguments: {_reason(err)}") from err
        if node.get("scheduler"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's "optimizer.step() before lr_scheduler.step()"
                    optimizer.step()  # no gradient: nothing changes
                    instantiate(node.scheduler)(optimizer).step()  # one step reads every argument (T_max=abc fails here)
            except Exception as err:
                raise ValueError(f"{role}.scheduler ({node.scheduler._target_}) refuses its arguments: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """The innermost message of a Hydra instantiation error (the wrapper repeats the target)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def check_keys(node: DictConfig) -> None:
    """Fail on a misspelled key of ``node`` before anything trains (the class is built later)."""
    cls = get_class(node._target_)
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(node) - set(params) - {"_target_", "_partial_", "_convert_", "_recursive_"})
    if unknown:
        raise TypeError(f"{node._target_} has no argument(s) {unknown}; valid: {sorted(params)}")


# Config keys that decide where and how visibly a job runs, not what it computes.
_NOT_RESULTS = ("paths", "tracking", "resume", "callbacks.progress", "trainer.enable_progress_bar")


def config_hash(cfg: DictConfig, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the resolved config without output locations and display switches (and the keys
    ``ignore``): two jobs with equal hashes compute the same thing (what ``resume=true`` skips on);
    with ``ignore=SEED`` they differ at most in the seed (``kd.group``: what a report pools)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    kept = {k: v for k, v in flat.items() if not k.startswith(_NOT_RESULTS) and k not in ignore}
    if ignore:  # a group: 4 and 4.0 (a default and the same value typed) are one configuration
        kept = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in kept.items()}
    # (the resume hash keeps the types as written: stores made before this would otherwise re-run)
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:20]


SEED = ("seed",)  # the student's seed: runs equal but for it are repeats of one configuration

# trainer arguments that make a run a smoke test (a part of each epoch, or one batch)
_SMOKE = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "fast_dev_run", "overfit_batches")


def smoke_test(trainer: dict) -> bool:
    """Whether these trainer settings see only part of the data (``trainer=debug``)."""
    def partial(key: str, value: object) -> bool:
        if value is None or value is False:
            return False
        if key in ("fast_dev_run", "overfit_batches"):
            return bool(value)
        return not (isinstance(value, float) and value == 1.0)  # an int is a number of batches, a float a fraction

    return any(partial(k, trainer.get(k)) for k in _SMOKE)


def experiment_name(cfg: DictConfig) -> str:
    """``tracking.experiment``, or ``<it>-debug`` for a smoke test: its runs never mix with real ones
    in a report, a comparison in the UI or the registry."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return f"{cfg.tracking.experiment}-debug" if smoke_test(trainer) else str(cfg.tracking.experiment)


def objectives(optimized_metric: str | Sequence[str]) -> list[str]:
    """The metric names of ``optimized_metric`` (one name or a list)."""
    names = [optimized_metric] if isinstance(optimized_metric, str) else [str(n) for n in optimized_metric]
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"optimized_metric must be a metric name or a list of distinct names, got {optimized_metric!r}")
    return names


def job_result(metrics: Mapping[str, float], optimized_metric: str | Sequence[str], budget: Mapping[str, float] | None = None) -> Any:
    """What a job returns to its sweeper: the value of a single ``optimized_metric`` (what every
    Hydra sweeper reads), or, with several objectives or a budget, those metrics by name."""
    names = objectives(optimized_metric)
    wanted = list(dict.fromkeys([*names, *(budget or {})]))
    missing = [n for n in wanted if n not in metrics]
    if missing:
        logged = ", ".join(sorted(k for k in metrics if not k.startswith(("train/", "quant/layer_bits/"))))
        raise KeyError(f"the run logged no {missing} for the sweeper (optimized_metric / hydra.sweeper.budget); it logged: {logged}")
    if len(wanted) == 1 and isinstance(optimized_metric, str):
        return float(metrics[names[0]])
    return {n: float(metrics[n]) for n in wanted}

"""OmegaConf resolvers the config tree uses (registered when ``kd`` is imported)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def _epoch(total: int, fraction: float) -> int:
    """``${kd.epoch:${trainer.max_epochs},0.5}``: an epoch as a fraction of the run, at least 1
    (schedules follow ``trainer.max_epochs`` without the user recomputing them)."""
    return max(1, int(int(total) * float(fraction)))


def _launch_id() -> str:
    """``${kd.launch:}``: the id of the process that launched this run or sweep, so folders started
    in the same second differ. Kept in ``$KD_LAUNCH_ID`` once set, so the processes a launch
    starts (joblib and submitit workers, DDP ranks), which resolve the folder again, agree on it."""
    return os.environ.setdefault("KD_LAUNCH_ID", str(os.getpid()))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("kd.epoch", _epoch, replace=True)
    OmegaConf.register_new_resolver("kd.launch", _launch_id, replace=True)


register_resolvers()

"""OmegaConf resolvers the config tree uses (registered when ``kd`` is imported)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def _epoch(total: int, fraction: float) -> int:
    """``${kd.epoch:${trainer.max_epochs},0.5}``: an epoch as a fraction of the run, at least 1
    (schedules follow ``trainer.max_epochs`` without the user recomputing them)."""
    return max(1, int(int(total) * float(fraction)))


def _pid() -> str:
    """``${kd.pid:}``: this process's id, so run folders started in the same second differ."""
    return str(os.getpid())


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("kd.epoch", _epoch, replace=True)
    OmegaConf.register_new_resolver("kd.pid", _pid, replace=True)


register_resolvers()

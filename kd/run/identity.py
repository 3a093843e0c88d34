"""How a student run names and tags itself (alone or in a pack): the name the UI shows, led by
the swept values in a sweep, and the tags a report groups and resumes by."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd.run.config import SEED, config_hash
from kd.run.sweep import SWEPT_ENV, short_name


def run_identity(cfg: DictConfig, objective: Any, stages: tuple[Any, ...], context: dict[str, Any], experiment: str) -> tuple[str, dict[str, str]]:
    """``(run name, tags)`` of the student run of ``cfg`` (``experiment``: the one it lands in,
    ``<name>-debug`` for a smoke test)."""
    name = cfg.tracking.run_name or run_name(cfg, objective, context, *stages)
    tags = {
        "kd.role": "student",
        "kd.objective": objective.describe(),
        "kd.compression": " + ".join(stage.describe() for stage in stages) or "none",
        "kd.config_hash": config_hash(cfg),
        "kd.group": config_hash(cfg, SEED),  # what a report pools: equal but for the seed
        **({"kd.debug": "true"} if experiment != cfg.tracking.experiment else {}),
        **({"kd.paper": str(cfg.reproduce.paper), "kd.setting": str(cfg.reproduce.setting)} if cfg.get("reproduce", {}).get("paper") else {}),
    }
    return name, tags


def run_name(cfg: DictConfig, objective: Any, context: dict[str, Any], *compression: Any) -> str:
    """``mlp_small<-mlp kd T=4 a=0.9 seed=0``; in a sweep the swept values lead, so the UI's cut
    name column still shows them: ``T=4 a=0.9 seed=1 · mlp_small<-mlp kd``."""
    choices = context["choices"]
    student = choices.get("model@student.model", "student")
    what = " + ".join([objective.describe(), *(c.describe() for c in compression if c is not None)])
    teacher = f"<-{choices.get('model@teacher.model', 'teacher')}" if objective.needs_teacher else ""
    name = f"{student}{teacher} {what} seed={cfg.seed}"
    swept = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    if not swept:
        return name
    lead = [f"{short_name(k)}={_value(OmegaConf.select(cfg, k, default='?'))}" for k in swept]
    rest = [token for token in name.split(" ") if token not in lead]
    return " ".join(lead) + " · " + " ".join(rest)


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

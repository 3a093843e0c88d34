"""A hint after Hydra refuses an override of a key that does not exist: the closest valid key
(``distill.temprature=4`` -> ``distill.temperature``). Composed again only when Hydra has already
failed, so a run that starts pays nothing for it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd.tracking.keys import flatten

_MISSING = object()


def typo_hints(args: Sequence[str], conf: Path) -> list[str]:
    """For each ``key=value`` in ``args`` whose key the composed config lacks, a line naming the
    closest keys; [] when every key exists or the config cannot be composed at all."""
    overrides = [a for a in args if "=" in a and not a.startswith(("-", "+", "~", "hydra"))]
    groups = [a for a in overrides if (conf / a.split("=", 1)[0].split("@", 1)[0].replace(".", "/")).is_dir()]
    try:
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            cfg = compose("config", overrides=groups)
    except Exception:  # the group choices themselves are wrong: Hydra's message already says which
        return []
    known = [k for k in flatten(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra")]
    hints = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if override in groups or OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        hints.append(f"kd: there is no config key '{key}'" + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close
                     else f" (python run.py --cfg job lists them; a new key needs a leading +: +{override})"))  # fmt: skip
    return hints

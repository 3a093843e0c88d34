"""Obtaining the teacher: load it from a checkpoint, reuse a cached one, or train it here.

A trained teacher is stored under ``<cache_dir>/<fingerprint>/`` where the fingerprint hashes
everything that determines it (architecture, data source and split, seed, epochs, batch
size, optimiser, scheduler, precision). Every later job, of this sweep or any other, with the
same teacher config loads it instead of training. A file lock makes parallel jobs (Hydra's
joblib launcher) wait for the one that trains, and the weights are written atomically, so no
job ever reads a half-written teacher; the entry's ``meta.json`` (written last) holds the
weights' sha256, and an entry that fails it, or fails to load, is moved aside, named in the log,
and trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from filelock import FileLock
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from kd.train.checkpoint import load_weights, save_weights
from kd.data import TensorDataModule
from kd.train.modules import ClassifierModule

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1  # bump when training code changes what a given config produces


@dataclass
class Teacher:
    """A ready teacher and where it came from (``source``: checkpoint, cache or trained)."""

    model: nn.Module
    source: str
    fingerprint: str
    path: Path | None
    metrics: dict[str, float]
    run_id: str | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(recipe: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``recipe``: equal configs give equal fingerprints."""
    blob = json.dumps({"version": FINGERPRINT_VERSION, **recipe}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def obtain_teacher(
    build: Callable[[], nn.Module],
    recipe: dict[str, Any],
    data: TensorDataModule,
    cache_dir: Path,
    checkpoint: str | None,
    allow_pickle: bool,
    train: Callable[[ClassifierModule], tuple[dict[str, float], str | None]],
    make_module: Callable[[nn.Module], ClassifierModule],
) -> Teacher:
    """Return the teacher for this run.

    Args:
        build: makes the (untrained) teacher architecture, seeded by the caller.
        recipe: everything that determines the trained teacher, hashed into the fingerprint.
        data: the data module (set up).
        cache_dir: where trained teachers are kept.
        checkpoint: a weights file to load instead of training; None to reuse or train.
        allow_pickle: let ``checkpoint`` need arbitrary unpickling (only for trusted files).
        train: fits a module; returns its final metrics and the id of the run that tracked it.
        make_module: wraps the teacher network in a trainable ``ClassifierModule``.
    """
    fp = fingerprint(recipe)
    if checkpoint:
        model = load_weights(build(), checkpoint, allow_pickle, data.input_shape)
        log.info("teacher loaded from %s", checkpoint)
        return Teacher(model, "checkpoint", fp, Path(checkpoint), {})

    folder = cache_dir / fp
    weights, meta_file = folder / "teacher.pt", folder / "meta.json"
    if rank_zero_only.rank != 0:
        # Under DDP the non-zero ranks must join the training rank zero starts; they may not
        # wait on the lock that rank zero holds while it trains.
        return _load_or_train(build, fp, weights, meta_file, recipe, train, make_module, save=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{fp}.lock")):
        return _load_or_train(build, fp, weights, meta_file, recipe, train, make_module, save=True)


def _load_or_train(
    build: Callable[[], nn.Module],
    fp: str,
    weights: Path,
    meta_file: Path,
    recipe: dict[str, Any],
    train: Callable[[ClassifierModule], tuple[dict[str, float], str | None]],
    make_module: Callable[[nn.Module], ClassifierModule],
    save: bool,
) -> Teacher:
    if weights.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("sha256") not in (None, _sha256(weights)):
                raise ValueError(f"its checksum does not match {meta_file.name}")
            model = load_weights(build(), weights)
        except Exception as err:  # noqa: BLE001  (any damage: a truncated file, a bad zip, a wrong checksum)
            aside = weights.parent.with_name(f"{weights.parent.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("cached teacher %s is damaged (%s: %s); moved aside to %s, training it again",
                        weights, type(err).__name__, err, aside)  # fmt: skip
            if save:  # rank zero, holding the lock
                weights.parent.rename(aside)
        else:
            log.info("teacher %s reused from %s (trained %s)", fp, weights.parent, meta.get("created"))
            return Teacher(model, "cache", fp, weights, meta.get("metrics", {}), meta.get("run_id"))
    log.info("teacher %s not cached: training it", fp)
    module = make_module(build())
    metrics, run_id = train(module)
    model = module.model.cpu()
    if save:
        save_weights(model, weights)
        created = time.strftime("%Y-%m-%d %H:%M:%S")
        meta = {"fingerprint": fp, "recipe": recipe, "metrics": metrics, "run_id": run_id, "created": created,
                "sha256": _sha256(weights)}  # fmt: skip
        tmp = meta_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(meta_file)  # written last: its presence means the entry is complete, its checksum what to expect
    return Teacher(model, "trained", fp, weights if save else None, metrics, run_id)


def seeded(seed: int, build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` with the global RNGs seeded first, so the initial weights depend on ``seed`` only."""

    def make() -> nn.Module:
        pl.seed_everything(seed, workers=True, verbose=False)
        return build()

    return make

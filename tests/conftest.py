"""Shared fixtures: compose the real config tree with overrides that keep runs tiny and put
every output (MLflow store, teachers, checkpoints) in a per-test folder."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small and quick, but real: digits, a real teacher and student, every pipeline step.
FAST = [
    "trainer.max_epochs=2",
    "teacher.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "callbacks.progress=null",
    "measure.latency=false",
]


@pytest.fixture(autouse=True)
def _known_warnings() -> None:
    """kd's narrow filters for warnings a correct run triggers, inside pytest's per-test capture."""
    from kd.run.experiment import ignore_known_warnings

    ignore_known_warnings()


@pytest.fixture
def make_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., DictConfig]:
    """``make_cfg("distill.alpha=0.5", fast=True)`` -> a composed config writing under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(*overrides: str, fast: bool = True) -> DictConfig:
        paths = [f"paths.output_root={tmp_path / 'outputs'}", f"paths.run_dir={tmp_path / 'run'}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[*(FAST if fast else []), *paths, *overrides])

    return make


@pytest.fixture
def run_py(tmp_path: Path) -> Callable[..., list[str]]:
    """The argv of ``python run.py`` writing under tmp_path, for the Hydra CLI itself."""

    def argv(*overrides: str, multirun: bool = False) -> list[str]:
        flags = ["--multirun"] if multirun else []
        return [sys.executable, str(ROOT / "run.py"), *flags, *FAST, f"paths.output_root={tmp_path / 'outputs'}", *overrides]

    return argv

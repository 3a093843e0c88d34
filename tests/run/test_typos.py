"""A typo'd key names the closest valid key, after Hydra's own refusal (and before anything runs)."""

from __future__ import annotations

import subprocess

import pytest

from kd.run.typos import typo_hints
from tests.conftest import CONF

TYPOS = [  # (the command line, the words the hint must hold)
    (["distill.temprature=4"], "did you mean 'distill.temperature'?"),
    (["trainer.max_epoch=3"], "'trainer.max_epochs'"),
    (["prune=magnitude", "prune.sparsty=0.5"], "'prune.sparsity'"),  # a key of the group the command line chose
    (["quantize=qat", "quantize.bit=4"], "'quantize.bits'"),
    (["student.optimizer.learning_rate=0.1"], "there is no config key 'student.optimizer.learning_rate'"),
    (["foo.bar=1"], "a new key needs a leading +: +foo.bar=1"),
]


@pytest.mark.parametrize(("args", "words"), TYPOS, ids=[a[-1] for a, _ in TYPOS])
def test_a_typod_key_is_named_with_the_closest_valid_one(args, words):
    hints = typo_hints(args, CONF)
    assert len(hints) == 1 and words in hints[0], hints


def test_valid_keys_and_group_choices_give_no_hint():
    assert typo_hints(["distill.temperature=2", "prune=agp", "prune.sparsity=0.8", "+trainer.fast_dev_run=1", "seed=3"], CONF) == []


def test_the_cli_prints_the_hint_and_fails_before_anything_is_written(run_py, tmp_path):
    done = subprocess.run(run_py("distill.temprature=4"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "did you mean 'distill.temperature'?" in done.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()

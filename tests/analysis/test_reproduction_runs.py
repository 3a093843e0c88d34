"""Reduced versions of three reproductions (slow: run with -m slow; CI does not): the direction of
each paper's effect must hold with a margin over the noise across seeds."""

import math
import statistics

import pytest

from kd.run.experiment import run

QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress=null", "measure.latency=false"]


def _mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="does not reproduce here: on Fashion-MNIST the dropout-0.5 1200-1200 teacher "
                   "is barely better than the 800-800 student on hard labels (90.4% vs 90.1% at full budget; "
                   "REPRODUCTIONS.md, hinton2015_mlp), so its soft targets have little to transfer")
def test_hinton_soft_targets_beat_hard_labels_reduced(make_cfg):
    """Experiment 1 (hinton2015_mlp) on 10,000 Fashion-MNIST images, 8 epochs, 3 seeds."""
    _soft_beats_hard(make_cfg, "hinton2015_mlp")


@pytest.mark.slow
def test_hinton_soft_targets_from_a_cnn_teacher_beat_hard_labels_reduced(make_cfg):
    """The same students with a ResNet-8 teacher (hinton2015_cnn_teacher) on the same 10,000
    images, teacher and students 20 epochs. Measured: at 8 and 8 epochs the teacher (87.5%) was
    one point above the hard-label student and soft targets cost 1.1 points (85.5% vs 86.6%);
    at 20 and 20 the teacher reaches 88.5% and soft targets win, 87.0% vs 86.7%."""
    _soft_beats_hard(make_cfg, "hinton2015_cnn_teacher", epochs=20)


def _soft_beats_hard(make_cfg, experiment: str, epochs: int = 8) -> None:
    reduced = [f"experiment={experiment}", "data.limit_train=10000", f"teacher.max_epochs={epochs}",
               f"trainer.max_epochs={epochs}", *QUIET]  # fmt: skip
    acc = {setting: [run(make_cfg(*reduced, *extra, f"seed={seed}", fast=False))["test/acc"] for seed in range(3)]
           for setting, extra in (("hard", ["distill=none", "~distill.temperature", "~distill.alpha"]), ("soft", []))}  # fmt: skip
    (soft, se_soft), (hard, se_hard) = _mean_se(acc["soft"]), _mean_se(acc["hard"])
    margin = 2 * math.hypot(se_soft, se_hard)
    assert soft - hard > margin, f"soft {acc['soft']} vs hard {acc['hard']}: {soft - hard:+.4f} <= {margin:.4f}"


@pytest.mark.slow
def test_han_pruning_keeps_accuracy_at_12x_fewer_weights_reduced(make_cfg):
    """Experiment 3 (han2015_lenet300) on 12,000 Fashion-MNIST images, 16 epochs, 3 seeds; four
    pruning events (epochs 3-9) without the learning-rate drop, which the 16-epoch cosine
    schedule makes redundant (with it: -1.7 points at this budget)."""
    reduced = ["experiment=han2015_lenet300", "data.limit_train=12000", "trainer.max_epochs=16",
               "prune.start=3", "prune.end=9", "prune.every=2", "prune.lr_scale=1.0", *QUIET]  # fmt: skip
    dense = [run(make_cfg(*reduced, "prune=none", f"seed={s}", fast=False)) for s in range(3)]
    pruned = [run(make_cfg(*reduced, f"seed={s}", fast=False)) for s in range(3)]
    assert min(m["prune/nonzero_reduction"] for m in pruned) > 11.5
    (p, se_p), (d, se_d) = _mean_se([m["test/acc"] for m in pruned]), _mean_se([m["test/acc"] for m in dense])
    margin = 2 * math.hypot(se_p, se_d) + 0.005  # iso-accuracy: no loss beyond the noise and half a point
    assert p - d > -margin, f"pruned {p:.4f} vs dense {d:.4f}"

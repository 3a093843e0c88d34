"""Hinton et al.'s omitted class: the student's transfer set lacks a class, the output bias of
that class is raised by the shift that is best on validation data."""

from pathlib import Path

import pytest
import torch
from torch import nn

from kd.data import Split
from kd.run.experiment import run
from kd.run.omitted import bias_correction, drop_classes


def test_drop_classes_removes_exactly_those_samples():
    split = Split(torch.arange(6.0).view(6, 1, 1, 1), torch.tensor([0, 3, 1, 3, 2, 0]))
    kept = drop_classes(split, [3])
    assert kept.y.tolist() == [0, 1, 2, 0] and kept.x.flatten().tolist() == [0.0, 2.0, 4.0, 5.0]


class _Data:
    """Just what bias_correction reads: validation and test splits, and the input shape."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.val = self.test = Split(x, y)
        self.input_shape = (1, 1, 2)


def test_the_shift_raises_a_too_low_bias_and_recovers_the_class():
    # two classes on a line; the model's class-1 bias is 2 too low, so x in (0, 2) is misread as 0
    x = torch.linspace(-3, 3, 61).view(-1, 1, 1, 1).repeat(1, 1, 1, 2) * torch.tensor([1.0, 0.0])
    y = (x[:, 0, 0, 0] > 0).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))  # logit_1 - logit_0 = 2x - 2
        model[1].bias.copy_(torch.tensor([1.0, -1.0]))
    metrics = bias_correction(model, _Data(x, y), [1])
    assert metrics["omit/bias"] == 2.0  # the smallest shift that makes 2x - 2 + s > 0 for every x > 0
    assert metrics["omit/class_acc"] == pytest.approx(20 / 30)  # x in (0, 1] lost: 10 of 30 positives
    assert metrics["omit/test_acc_corrected"] == 1.0 and metrics["omit/class_acc_corrected"] == 1.0
    assert model[1].bias.tolist() == [1.0, -1.0]  # evaluated with the shift, not changed


def test_a_run_without_a_class_reports_it_raw_and_corrected(make_cfg):
    cfg = make_cfg("student.omit_classes=[3]", "trainer.max_epochs=4")
    metrics = run(cfg)
    assert metrics["omit/test_acc"] == pytest.approx(metrics["test/acc"])  # the same tested model
    assert metrics["omit/class_acc_corrected"] >= metrics["omit/class_acc"]  # a higher bias only adds 3s
    assert metrics["omit/bias"] >= 0


def test_an_unknown_class_fails_before_anything_is_written(make_cfg):
    cfg = make_cfg("student.omit_classes=[10]")
    with pytest.raises(ValueError, match="student.omit_classes must be some of the classes 0..9"):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()

"""Lightning modules: the teacher stays frozen, the logit cache agrees with the teacher,
only the student is optimised and saved."""

import pytest
import torch
from torch import nn

from kd.losses import SoftTargetKD
from kd.models import MLP
from kd.train.modules import ClassifierModule, DistillationModule


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = MLP(num_classes=4, input_shape=(1, 2, 2), hidden=[16], dropout=0.5)
    student = MLP(num_classes=4, input_shape=(1, 2, 2), hidden=[8])
    return student, teacher


def _module(teacher_inputs: torch.Tensor | None = None) -> DistillationModule:
    student, teacher = _pair()
    return DistillationModule(
        student, teacher, num_classes=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        objective=SoftTargetKD(4.0, 0.9), input_shape=(1, 2, 2), teacher_inputs=teacher_inputs,
    )  # fmt: skip


def test_teacher_is_frozen_and_stays_in_eval_mode():
    module = _module()
    module.train()
    assert not module.teacher.training and module.model.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    # dropout in the teacher is off: two forwards agree
    x = torch.randn(5, 1, 2, 2)
    assert torch.equal(module.teacher_logits(x, torch.arange(5)), module.teacher_logits(x, torch.arange(5)))


def test_only_the_student_is_optimised():
    module = _module()
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.model.parameters()}


def test_cached_logits_are_the_teachers_logits_looked_up_by_index():
    inputs = torch.randn(10, 1, 2, 2)
    module = _module(teacher_inputs=inputs)
    module.on_fit_start()
    index = torch.tensor([7, 2, 2, 9])
    with torch.no_grad():
        expected = module.teacher(inputs[index])
    assert torch.allclose(module.teacher_logits(inputs[index], index), expected, atol=1e-6)


def test_training_step_gradients_reach_the_student_only():
    module = _module()
    x, y = torch.randn(6, 1, 2, 2), torch.randint(0, 4, (6,))
    module.training_step((x, y, torch.arange(6)), 0).backward()
    assert all(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_checkpoints_hold_the_student_only_and_load_back_strictly():
    module = _module()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    fresh = _module()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for a, b in zip(module.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def test_evaluation_only_module_refuses_to_train():
    student, _ = _pair()
    with pytest.raises(RuntimeError, match="evaluation only"):
        ClassifierModule(student, 4, optimizer=None).configure_optimizers()

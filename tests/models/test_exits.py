"""Early exits: the heads read the named stages, each exit's cost is the backbone up to its stage
plus its head, an input leaves at the first confident exit, and the training loss is the weighted
sum of the exits' terms, an early exit's distillation targets cut from the final exit's graph."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import CrossEntropy, SoftTargetKD
from kd.losses.exits import exit_terms
from kd.models import MLP, LeNet5
from kd.models.exits import MultiExit
from kd.run import exits

SHAPE = (1, 8, 8)


def _mlp(hidden=(32, 32), **kwargs) -> MultiExit:
    torch.manual_seed(0)
    return MultiExit(MLP(num_classes=10, input_shape=SHAPE, hidden=list(hidden)), kwargs.pop("stages", None), 10, SHAPE, **kwargs)


def test_each_exit_is_a_head_on_its_stage_and_the_final_exit_is_the_plain_student():
    model = _mlp().eval()
    x = torch.randn(5, *SHAPE)
    first, second, final = model.exits(x)
    layers = model.backbone.layers
    h1 = F.relu(layers[0](x.flatten(1)))
    h2 = F.relu(layers[2](h1))
    torch.testing.assert_close(first, model.heads[0](h1))
    torch.testing.assert_close(second, model.heads[1](h2))
    torch.testing.assert_close(final, model.backbone(x))
    torch.testing.assert_close(model(x), final)  # what the run tests, measures and exports
    assert model.exit_names == ["hidden1", "hidden2", "final"]


def test_an_exit_costs_the_backbone_up_to_its_stage_and_its_head():
    mlp = _mlp()  # 64 inputs -> 32 -> 32 -> 10
    assert mlp.exit_macs() == [64 * 32 + 32 * 10, 64 * 32 + 32 * 32 + 32 * 10, 64 * 32 + 32 * 32 + 32 * 10]
    lenet = MultiExit(LeNet5(num_classes=10, input_shape=SHAPE), None, 10, SHAPE)
    conv1 = 6 * 1 * 25 * 8 * 8  # 5x5 convolution, padding 2: an 8x8 map per channel
    conv2 = 16 * 6 * 25 * 4 * 4  # after 2x2 pooling
    fcs = 16 * 2 * 2 * 120 + 120 * 84 + 84 * 10
    assert lenet.exit_macs() == [conv1 + 6 * 10, conv1 + conv2 + 16 * 10, conv1 + conv2 + fcs]  # pooled heads: one linear layer


@pytest.mark.parametrize("criterion", exits.CRITERIA)
def test_threshold_zero_leaves_at_the_first_exit_and_threshold_one_at_the_last(criterion):
    torch.manual_seed(1)
    logits = [torch.randn(200, 10) * s for s in (1.0, 3.0, 5.0)]
    y = torch.randint(0, 10, (200,))
    macs = [100, 300, 1000]
    at_zero = exits.evaluate(logits, y, macs, 0.0, criterion)
    assert at_zero["share"] == [1.0, 0.0, 0.0] and at_zero["macs"] == 100
    assert at_zero["acc"] == pytest.approx(float((logits[0].argmax(1) == y).float().mean()))
    at_one = exits.evaluate(logits, y, macs, 1.0, criterion)
    assert at_one["share"] == [0.0, 0.0, 1.0] and at_one["macs"] == 1000
    assert at_one["acc"] == pytest.approx(float((logits[2].argmax(1) == y).float().mean()))


def test_an_input_leaves_at_the_first_exit_confident_enough():
    sure = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # softmax max: ~1, 0.5, 0.5
    later = torch.tensor([[0.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    final = torch.zeros(3, 2)
    assert exits.leave([sure, later, final], 0.9, "max_softmax").tolist() == [0, 1, 2]
    p = torch.tensor([0.7, 0.2, 0.1])
    entropy = -(p * p.log()).sum()
    assert float(exits.confidence(p.log()[None], "entropy")) == pytest.approx(float(1 - entropy / math.log(3)))


def test_the_loss_is_the_weighted_sum_of_the_exits_terms():
    torch.manual_seed(2)
    z = [torch.randn(8, 10) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    terms = exit_terms(CrossEntropy(), ["a", "b", "final"], [0.2, 0.3, 0.5], "teacher", z, y)
    expected = [F.cross_entropy(zi, y) for zi in z]
    torch.testing.assert_close(terms["loss"], 0.2 * expected[0] + 0.3 * expected[1] + 0.5 * expected[2])
    torch.testing.assert_close(terms["exit/b/loss"], expected[1])


def test_distilling_from_the_final_exit_stops_the_gradient_at_its_targets():
    torch.manual_seed(3)
    early, final = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    teacher, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    objective = SoftTargetKD(temperature=4.0, alpha=0.9)
    terms = exit_terms(objective, ["a", "final"], [0.5, 0.5], "final", [early, final], y, teacher)
    (grad_final,) = torch.autograd.grad(terms["exit/a/loss"], [final], allow_unused=True)
    assert grad_final is None  # the early exit's term does not train the final exit
    # ... and its target is the final exit's prediction, not the teacher's
    torch.testing.assert_close(terms["exit/a/loss"], objective(early, y, final.detach())["loss"])
    torch.testing.assert_close(terms["exit/final/loss"], objective(final, y, teacher)["loss"])
    from_teacher = exit_terms(objective, ["a", "final"], [0.5, 0.5], "teacher", [early, final], y, teacher)
    torch.testing.assert_close(from_teacher["exit/a/loss"], objective(early, y, teacher)["loss"])

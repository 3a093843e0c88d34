"""Slimmable students: one set of weights at several widths, each width the same function as a
plain model with its channels and its own BatchNorm statistics; the sandwich rule; in-place
distillation's targets cut from the widest's graph; every width's statistics saved and restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd.losses import CrossEntropy
from kd.losses.slimmable import inplace_distillation, slimmable_terms
from kd.models import MLP, CIFARResNet
from kd.models.slimmable import Slimmable, check_widths

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _resnet() -> Slimmable:
    torch.manual_seed(0)
    net = Slimmable(CIFARResNet(num_classes=10, input_shape=(3, 16, 16), depth=8, width=[8, 16, 32]), WIDTHS, 10, (3, 16, 16))
    net.train()
    with torch.no_grad():  # each width's BatchNorm sees its own batches, so their statistics differ
        for w in WIDTHS:
            net.set_width(w)
            for _ in range(3):
                net(torch.randn(16, 3, 16, 16) * (1 + w))
    return net.eval()


def _plain_at(net: Slimmable, width: float, plain: torch.nn.Module) -> torch.nn.Module:
    """``plain`` (built with the width's channels) filled by the formula: every weight the leading
    slice of the slimmable one, every BatchNorm the width's own."""
    i = net.widths.index(width)
    source = net.backbone.state_dict()
    state = {}
    for key, value in plain.state_dict().items():
        layer, _, name = key.rpartition(".")
        switchable = f"{layer}.bns.{i}.{name}"
        full = source[switchable] if switchable in source else source[key]
        state[key] = full[tuple(slice(0, s) for s in value.shape)] if value.dim() else full
    plain.load_state_dict(state)
    return plain.eval()


@pytest.mark.parametrize("width", WIDTHS)
def test_each_width_is_a_plain_network_with_its_channels_and_its_own_batchnorm(width):
    net = _resnet()
    x = torch.randn(4, 3, 16, 16)
    net.set_width(width)
    channels = [int(width * c) for c in (8, 16, 32)]
    plain = _plain_at(net, width, CIFARResNet(num_classes=10, input_shape=(3, 16, 16), depth=8, width=channels))
    torch.testing.assert_close(net(x), plain(x))
    materialized, _ = net.materialize(width)  # the physically thinned copy the run saves
    torch.testing.assert_close(net(x), materialized.eval()(x))
    assert sum(p.numel() for p in materialized.parameters()) == sum(p.numel() for p in plain.parameters())


def test_an_mlp_width_keeps_the_leading_units_of_each_layer():
    torch.manual_seed(0)
    net = Slimmable(MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32, 32]), WIDTHS, 10, (1, 8, 8)).eval()
    net.set_width(0.25)
    x = torch.randn(3, 1, 8, 8)
    a, b, head = net.backbone.layers[0], net.backbone.layers[2], net.backbone.head
    h = F.relu(F.linear(x.flatten(1), a.weight[:8], a.bias[:8]))
    h = F.relu(F.linear(h, b.weight[:8, :8], b.bias[:8]))
    torch.testing.assert_close(net(x), F.linear(h, head.weight[:, :8], head.bias))


def test_every_widths_statistics_are_saved_and_restored():
    net = _resnet()
    state = net.state_dict()
    assert all(f"backbone.bn1.bns.{i}.running_mean" in state for i in range(len(WIDTHS)))
    torch.manual_seed(1)
    fresh = Slimmable(CIFARResNet(num_classes=10, input_shape=(3, 16, 16), depth=8, width=[8, 16, 32]), WIDTHS, 10, (3, 16, 16))
    fresh.load_state_dict(state)
    fresh.eval()
    x = torch.randn(4, 3, 16, 16)
    for w in WIDTHS:
        net.set_width(w)
        fresh.set_width(w)
        torch.testing.assert_close(fresh(x), net(x))


def test_the_sandwich_holds_the_widest_and_the_narrowest_every_step_and_reaches_every_width():
    net = Slimmable(MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32]), [0.25, 0.5, 0.625, 0.75, 1.0], 10, (1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    steps = [net.sandwich(2, generator) for _ in range(40)]
    assert all(s[:2] == [1.0, 0.25] and len(s) == 4 and len(set(s)) == 4 for s in steps)
    assert {w for s in steps for w in s} == {0.25, 0.5, 0.625, 0.75, 1.0}
    assert net.sandwich(0) == [1.0, 0.25]


def test_inplace_distillation_learns_the_widests_predictions_without_training_the_widest_through_them():
    torch.manual_seed(2)
    outputs = {1.0: torch.randn(8, 10, requires_grad=True), 0.5: torch.randn(8, 10, requires_grad=True)}
    y = torch.randint(0, 10, (8,))
    widest, terms = slimmable_terms(CrossEntropy(), outputs.__getitem__, [1.0, 0.5], y, None, None)
    (grad,) = torch.autograd.grad(terms["width/0.5/loss"], [outputs[1.0]], allow_unused=True)
    assert grad is None
    p = outputs[1.0].detach().softmax(-1)
    expected = -(p * outputs[0.5].log_softmax(-1)).sum(-1).mean()  # the soft cross-entropy of Yu & Huang (2019)
    torch.testing.assert_close(terms["width/0.5/loss"], expected)
    torch.testing.assert_close(inplace_distillation(outputs[0.5], outputs[1.0]), expected)
    torch.testing.assert_close(terms["width/1/loss"], F.cross_entropy(outputs[1.0], y))
    torch.testing.assert_close(terms["loss"], (terms["width/1/loss"] + terms["width/0.5/loss"]) / 2)


@pytest.mark.parametrize(("widths", "message"), [
    ([0.0, 1.0], r"must lie in \(0, 1\]"), ([0.5, 1.5], r"must lie in \(0, 1\]"), ([1.0, 0.5], "distinct and increasing"),
    ([1.0], "at least two widths"), ([0.5, 0.5, 1.0], "distinct and increasing"),
])  # fmt: skip
def test_bad_widths_are_refused(widths, message):
    with pytest.raises(ValueError, match=message):
        check_widths(widths)


def test_a_width_that_leaves_a_layer_without_channels_is_refused_with_the_layer_named():
    with pytest.raises(ValueError, match=r"student.widths \[0.1\] leave layers.0 with no channels"):
        Slimmable(MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[8]), [0.1, 1.0], 10, (1, 8, 8))

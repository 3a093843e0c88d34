"""The pruning callbacks' hooks driven directly, without a Lightning fit: each event's exact
counts, layer choice, names, the schedule checks on both sides of their boundaries, and the
state a checkpoint carries. Fast enough for mutation testing (``.ci/mutation``); the fits in
``test_pruning.py``, ``test_structured.py`` and ``test_lottery.py`` test the same callbacks in
training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks import MagnitudePruning
from callbacks.magnitude import _keep_largest


class Net(nn.Module):
    """Two hidden linear layers (the second without a bias) and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(16, 12), nn.Linear(12, 8, bias=False), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def stub(model: nn.Module, max_epochs: int = 6, steps: int = 60, lr: float = 0.1, root=None, data=None):
    """A stand-in for Lightning's trainer and module: what the callbacks read and call."""
    logged: dict[str, float] = {}
    trainer = SimpleNamespace(
        max_epochs=max_epochs, current_epoch=0, global_step=0, estimated_stepping_batches=steps,
        optimizers=[torch.optim.SGD(model.parameters(), lr=lr)], lr_scheduler_configs=[],
        default_root_dir=str(root), datamodule=data,
    )  # fmt: skip
    module = SimpleNamespace(model=model, device=torch.device("cpu"), logged=logged,
                             log_dict=lambda values, **_: logged.update(values), log=lambda k, v, **_: logged.update({k: v}))  # fmt: skip
    return trainer, module


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def epochs(cb, trainer, module, upto: int) -> None:
    for epoch in range(upto + 1):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, module)


# ---- magnitude -------------------------------------------------------------------------
def test_each_agp_event_removes_exactly_its_count_of_the_original_weights():
    net = Net()
    cb = MagnitudePruning(0.75, schedule="agp", start=1, end=3)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    for epoch in range(5):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, module)
        cubic = 0.0 if epoch < 1 else 0.75 * (1 - (1 - (min(epoch, 3) - 1) / 2) ** 3)
        for layer in (net.fc1, net.fc2, net.head):
            assert zeros(layer.weight) == round(cubic * layer.weight.numel()), (epoch, layer)
        assert cb.at_target == (epoch >= 3)
    assert cb._done == [1, 2, 3]
    assert zeros(net.fc1.bias) == 0


def test_the_smallest_surviving_weights_go_and_none_comes_back():
    net = Net()
    with torch.no_grad():
        net.fc1.weight.copy_(torch.arange(1, 193, dtype=torch.float).view(12, 16) * torch.tensor([1.0, -1.0]).repeat(96).view(12, 16))
    cb = MagnitudePruning(0.5, schedule="agp", start=0, end=1, layers=["fc1"])
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)  # epoch 0: the initial sparsity, 0
    with torch.no_grad():
        net.fc1.weight[0, :4] = 1000.0  # the smallest weights grow large before the next event
        net.fc1.weight[11, :] = 0.001  # the largest shrink
    trainer.current_epoch = 1
    cb.on_train_epoch_start(trainer, module)
    mask = cb.masks()["fc1"]
    assert int((~mask).sum()) == 96 and not mask[11].any() and mask[0, :4].all()
    cb.masks()["fc1"][0, 0] = False  # a removed weight ...
    kept = _keep_largest(net.fc1.weight.detach().flatten(), mask.flatten(), 0.5)
    assert not kept.view(12, 16)[0, 0] and int((~kept).sum()) == 97  # ... stays removed, even above the target


def test_the_global_ranking_sets_one_threshold_over_all_layers():
    net = Net()
    cb = MagnitudePruning(0.6, scope="global")
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    weights = torch.cat([net.fc1.weight.flatten(), net.fc2.weight.flatten(), net.head.weight.flatten()]).detach().abs().clone()
    threshold = weights.sort().values[round(0.6 * weights.numel()) - 1]
    cb.on_train_epoch_start(trainer, module)
    for layer in (net.fc1, net.fc2, net.head):
        assert torch.equal(layer.weight == 0, layer.weight.detach().abs() <= threshold)  # all below one threshold, none above
    assert sum(zeros(m.weight) for m in (net.fc1, net.fc2, net.head)) == round(0.6 * weights.numel())


def test_layers_choose_what_is_pruned_and_biases_only_where_there_are_some():
    net = Net()
    cb = MagnitudePruning(0.5, layers=["fc*"], include_bias=True)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    assert sorted(cb.masks()) == ["fc1", "fc1.bias", "fc2"]  # fc2 has no bias; the head is not chosen
    cb.on_train_epoch_start(trainer, module)
    assert zeros(net.head.weight) == 0 and zeros(net.fc1.bias) == 6 and zeros(net.fc2.weight) == 48


def test_amounts_override_per_layer_and_a_pattern_must_name_a_pruned_layer():
    cb = MagnitudePruning(0.5, layers=["fc*"], amounts={"fc2": 0.25})
    cb.check_layers(Net(), (16,))
    assert cb.final_sparsity("fc2") == 0.25 and cb.final_sparsity("fc1") == 0.5
    with pytest.raises(ValueError, match=r"prune.amounts pattern 'head' matches no pruned layer"):
        MagnitudePruning(0.5, layers=["fc*"], amounts={"head": 0.3}).check_layers(Net(), (16,))
    with pytest.raises(ValueError, match=r"no prunable layer matches 'nope'"):
        MagnitudePruning(0.5, layers=["nope"]).check_layers(Net(), (16,))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({}, "prune magnitude s=0.5"), ({"scope": "global"}, "prune magnitude-global s=0.5"),
     ({"schedule": "agp", "end": 2}, "prune agp s=0.5"), ({"schedule": "iterative", "end": 2, "scope": "global"}, "prune iterative-global s=0.5"),
     ({"amounts": {"fc1": 0.2}}, "prune magnitude s=per-layer"), ({"sensitivity": True, "max_drop": 0.01}, "prune magnitude s=per-layer")],
)  # fmt: skip
def test_the_run_name_part_says_the_schedule_the_scope_and_the_sparsity(kwargs, name):
    assert MagnitudePruning(0.5, **kwargs).describe() == name


def test_a_schedule_training_cannot_finish_is_refused_at_setup_too():
    trainer, module = stub(Net(), max_epochs=3)
    MagnitudePruning(0.5, schedule="agp", start=0, end=2).setup(trainer, module, "fit")  # ends in the last epoch
    with pytest.raises(ValueError, match="ends at epoch 3 but training has trainer.max_epochs=3"):
        MagnitudePruning(0.5, schedule="agp", start=0, end=3).setup(trainer, module, "fit")
    MagnitudePruning(0.5, schedule="agp", start=0, end=3).setup(trainer, module, "test")  # only fitting prunes


def test_a_step_schedule_must_end_before_the_last_step():
    trainer, module = stub(Net(), steps=10)
    MagnitudePruning(0.5, schedule="agp", unit="step", start=0, end=9).on_train_start(trainer, module)
    with pytest.raises(ValueError, match="ends at step 10 but training has 10 steps"):
        MagnitudePruning(0.5, schedule="agp", unit="step", start=0, end=10).on_train_start(trainer, module)
    MagnitudePruning(0.5, schedule="agp", unit="epoch", start=0, end=12).on_train_start(trainer, module)  # epochs: not this check


def test_step_events_happen_at_batch_starts_and_epoch_events_at_epoch_starts():
    net = Net()
    cb = MagnitudePruning(0.5, unit="step", start=3)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    for step in range(4):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, step)
        assert zeros(net.fc1.weight) == (96 if step == 3 else 0)
    epoch_cb = MagnitudePruning(0.5, start=1)
    net2 = Net()
    trainer2, module2 = stub(net2)
    epoch_cb.setup(trainer2, module2, "fit")
    trainer2.current_epoch = trainer2.global_step = 1
    epoch_cb.on_train_batch_start(trainer2, module2, None, 0)
    assert zeros(net2.fc1.weight) == 0
    epoch_cb.on_train_epoch_start(trainer2, module2)
    assert zeros(net2.fc1.weight) == 96


def test_weights_pruned_stay_zero_after_an_optimizer_step_and_sparsity_is_logged():
    net = Net()
    cb = MagnitudePruning(0.5, include_bias=True)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # an optimizer step moves every weight
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert zeros(net.fc1.weight) == 96 and zeros(net.fc2.weight) == 48 and zeros(net.head.weight) == 16 and zeros(net.fc1.bias) == 6
    cb.on_train_epoch_end(trainer, module)
    assert module.logged["model/sparsity"] == pytest.approx((96 + 6 + 48 + 16 + 2) / (192 + 12 + 96 + 32 + 4))
    assert module.logged["model/sparsity/fc1.bias"] == 0.5 and module.logged["prune/at_target"] == 1.0


def test_the_learning_rate_drops_once_at_the_first_event():
    net = Net()
    cb = MagnitudePruning(0.5, schedule="iterative", start=1, end=3, lr_scale=0.5)
    trainer, module = stub(net, lr=0.2)
    cb.setup(trainer, module, "fit")
    epochs(cb, trainer, module, 4)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_checkpoint_carries_the_events_done_the_rate_drop_and_the_picked_amounts():
    net = Net()
    cb = MagnitudePruning(0.5, schedule="iterative", start=0, end=2, lr_scale=0.5)
    trainer, module = stub(net, lr=0.2)
    cb.setup(trainer, module, "fit")
    cb._picked = {"fc1": 0.3, "fc2": 0.1, "head": 0.0}  # as a sensitivity analysis leaves them
    epochs(cb, trainer, module, 1)
    state = cb.state_dict()
    resumed = MagnitudePruning(0.5, schedule="iterative", start=0, end=2, lr_scale=0.5)
    resumed.load_state_dict(state)
    assert resumed._done == [0, 1] and resumed._lr_scaled is True and resumed._picked == cb._picked
    assert resumed.final_sparsity("fc1") == 0.3
    trainer2, module2 = stub(net, lr=0.1)
    resumed.setup(trainer2, module2, "fit")
    epochs(resumed, trainer2, module2, 2)
    assert trainer2.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # not dropped again
    assert zeros(net.fc1.weight) == round(0.3 * 192)  # the picked amount, not prune.sparsity


def test_folding_leaves_plain_zeros_and_can_be_done_twice():
    net = Net()
    cb = MagnitudePruning(0.5, include_bias=True)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    with torch.no_grad():
        net.fc1.weight.add_(1.0)
    cb.fold(net)
    cb.fold(net)
    assert not [n for n, _ in net.named_buffers()]
    assert zeros(net.fc1.weight) == 96 and zeros(net.fc1.bias) == 6


def test_the_sensitivity_analysis_writes_its_table_and_plot_beside_the_run(tmp_path):
    net = Net()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(val=SimpleNamespace(x=x, y=net(x).argmax(1).detach()))
    cb = MagnitudePruning(0.5, sensitivity=True, sensitivity_levels=[0.5, 0.95], max_drop=0.0)
    trainer, module = stub(net, root=tmp_path, data=data)
    cb.setup(trainer, module, "fit")
    net.train()
    cb.on_train_epoch_start(trainer, module)
    assert [p.name for p in cb.artifacts(tmp_path)] == ["sensitivity.csv", "sensitivity.png"]
    assert net.training  # put back as it was
    assert set(cb._picked) == {"fc1", "fc2", "head"} and all(v in (0.0, 0.5, 0.95) for v in cb._picked.values())
    for name, layer in (("fc1", net.fc1), ("fc2", net.fc2), ("head", net.head)):
        assert zeros(layer.weight) == round(cb._picked[name] * layer.weight.numel())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr_scale": 0.0}, r"prune.lr_scale must lie in \(0, 1\], got 0.0"), ({"lr_scale": 1.5}, r"prune.lr_scale must lie in \(0, 1\], got 1.5"),
     ({"sensitivity": True, "max_drop": 0.01, "scope": "global"}, r"^prune.max_drop picks per-layer sparsities; it needs prune.scope=layer$"),
     ({"scope": "global", "amounts": {"fc1": 0.2}}, r"^prune.amounts sets per-layer sparsities; it needs prune.scope=layer, not global$"),
     ({"max_drop": 0.01}, r"^prune.max_drop picks amounts from the sensitivity analysis: set prune.sensitivity=true$"),
     ({"amounts": {"fc1": 1.2}}, r"prune.amounts\[fc1\] must be a fraction"), ({"sensitivity_levels": [0.5, 1.0]}, r"prune.sensitivity_levels\[\] must be a fraction")],
)  # fmt: skip
def test_bad_values_are_refused_with_the_key_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(0.5, **kwargs)


def test_a_learning_rate_scale_of_exactly_one_is_allowed_and_changes_nothing():
    net = Net()
    cb = MagnitudePruning(0.5, lr_scale=1.0)
    trainer, module = stub(net, lr=0.2)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.2


def test_the_initial_sparsity_is_the_first_events_target():
    net = Net()
    cb = MagnitudePruning(0.8, schedule="agp", start=0, end=2, initial_sparsity=0.25)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    assert zeros(net.fc1.weight) == round(0.25 * 192)


def test_a_second_setup_keeps_the_masks_it_finds():
    net = Net()
    cb = MagnitudePruning(0.5)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    cb.setup(trainer, module, "fit")  # a second fit (fine-tuning), or a resume onto a set-up model
    with torch.no_grad():
        net.fc1.weight.add_(1.0)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert zeros(net.fc1.weight) == 96


def test_a_callback_that_never_fitted_folds_nothing():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert MagnitudePruning(0.5).fold(net) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_step_event_drops_the_learning_rate_too():
    net = Net()
    cb = MagnitudePruning(0.5, unit="step", start=2, lr_scale=0.5)
    trainer, module = stub(net, lr=0.2)
    cb.setup(trainer, module, "fit")
    for step in range(4):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, step)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)


def test_the_sensitivity_table_holds_accuracies_of_the_chosen_layers(tmp_path):
    import csv

    net = Net()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(val=SimpleNamespace(x=x, y=net(x).argmax(1).detach()))  # the model's own predictions: 100% at 0
    cb = MagnitudePruning(0.5, layers=["fc*"], sensitivity=True, sensitivity_levels=[0.0, 0.9], max_drop=0.5)
    trainer, module = stub(net, root=tmp_path, data=data)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    assert {r["layer"] for r in rows} == {"fc1", "fc2"} and set(cb._picked) == {"fc1", "fc2"}
    assert all(float(r["accuracy"]) == 1.0 for r in rows if float(r["sparsity"]) == 0.0)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


# ---- structured ------------------------------------------------------------------------
from callbacks import StructuredPruning  # noqa: E402
from kd.compression.thinning import PRUNED_KEY  # noqa: E402
from kd.models import LeNet5  # noqa: E402

SHAPE = (1, 8, 8)
WIDTHS = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}  # the groups of LeNet-5; fc3 holds the classes


def lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(10, SHAPE)


def removed(n: int, ratio: float) -> int:
    """Channels a group of ``n`` loses at ``ratio``: Torch-Pruning keeps ``int(n * (1 - ratio))``."""
    return n - int(n * (1 - ratio))


def dead_rows(weight: torch.Tensor) -> int:
    return int((weight.detach().flatten(1).abs().sum(1) == 0).sum())


def structured(net, **kwargs):
    trainer, module = stub(net, data=SimpleNamespace(input_shape=SHAPE))
    cb = StructuredPruning(**kwargs)
    cb.setup(trainer, module, "fit")
    return cb, trainer, module


def test_each_structured_event_removes_the_groups_count_and_keeps_what_it_removed():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5, schedule="agp", start=1, end=3)
    previous = {k: v.clone() for k, v in cb._pruned.items()}
    for epoch in range(4):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, module)
        ratio = 0.0 if epoch < 1 else 0.5 * (1 - (1 - (epoch - 1) / 2) ** 3)
        for name, n in WIDTHS.items():
            assert int(cb._pruned[name].sum()) == removed(n, ratio), (epoch, name)
            assert bool((previous[name] <= cb._pruned[name]).all())
            assert dead_rows(getattr(net, name).weight) == removed(n, ratio)
        previous = {k: v.clone() for k, v in cb._pruned.items()}
        assert cb.at_target == (epoch == 3)
    assert dead_rows(net.fc3.weight) == 0
    cb.on_train_epoch_end(trainer, module)
    pruned = sum(removed(n, 0.5) for n in WIDTHS.values())
    assert module.logged["model/channel_sparsity"] == pytest.approx(1 - (sum(WIDTHS.values()) - pruned) / sum(WIDTHS.values()))
    zero = sum(int((m.weight == 0).sum()) for m in (net.conv1, net.conv2, net.fc1, net.fc2, net.fc3))
    total = sum(m.weight.numel() for m in (net.conv1, net.conv2, net.fc1, net.fc2, net.fc3))
    assert module.logged["model/sparsity"] == pytest.approx(zero / total)
    assert module.logged["model/sparsity/conv1"] == pytest.approx(3 / 6)


def test_channel_sparsity_is_the_pruned_share_of_all_group_channels():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.25)
    cb.on_train_epoch_start(trainer, module)
    cb.on_train_epoch_end(trainer, module)
    pruned = sum(removed(n, 0.25) for n in WIDTHS.values())  # 1 + 4 + 30 + 21 of 226
    assert module.logged["model/channel_sparsity"] == pytest.approx(pruned / sum(WIDTHS.values()))


def test_the_structured_defaults_and_a_fold_before_any_fit():
    cb = StructuredPruning(0.5)
    assert (cb.importance, cb.scope, cb.calibration_batches, cb.reg_strength, cb.regularize, cb.lr_scale) == ("l1", "layer", 8, 1e-4, None, 1.0)
    with pytest.raises(AssertionError, match=r"^finalize\(\) runs after fit\(\)$"):
        cb.fold(lenet())
    with pytest.raises(ValueError, match="ends at epoch 3 but training has trainer.max_epochs=3"):
        StructuredPruning(0.5, schedule="agp", start=0, end=3).check_layers(lenet(), SHAPE, max_epochs=3)
    with pytest.raises(ValueError, match=r"^prune.calibration_batches must be >= 1, prune.reg_strength >= 0, prune.lr_scale in \(0, 1\]$"):
        StructuredPruning(0.5, calibration_batches=0)


def test_a_resumed_structured_callback_zeroes_its_channels_before_the_next_event():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5)
    cb.on_train_epoch_start(trainer, module)
    state = cb.state_dict()
    resumed, trainer2, module2 = structured(net, sparsity=0.5)  # setup, then Lightning restores the callback's state
    resumed.load_state_dict(state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    resumed.on_train_batch_end(trainer2, module2, None, None, 0)
    assert dead_rows(net.conv1.weight) == 3 and dead_rows(net.fc1.weight) == 60


def test_the_pruned_channels_of_each_group_are_listed_for_the_saved_model():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5)
    cb.on_train_epoch_start(trainer, module)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert dead_rows(net.conv1.weight) == 3 and int((net.conv1.bias == 0).sum()) == 3
    assert int((net.conv2.weight.detach().abs().sum((0, 2, 3)) == 0).sum()) == 3  # the consumer's input channels too
    channels = cb.pruned_channels()
    assert sorted(channels) == sorted(WIDTHS) and all(len(v) == removed(WIDTHS[k], 0.5) for k, v in channels.items())
    assert channels["conv1"] == sorted(channels["conv1"]) and set(channels["conv1"]) == set(torch.nonzero(cb._pruned["conv1"]).flatten().tolist())
    assert cb.saved_extras() == {PRUNED_KEY: channels}


def test_layers_choose_the_groups_and_the_others_stay_whole():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5, layers=["conv2", "fc1"])
    assert sorted(cb._groups) == ["conv2", "fc1"]
    cb.on_train_epoch_start(trainer, module)
    assert dead_rows(net.conv1.weight) == 0 and dead_rows(net.fc2.weight) == 0
    assert dead_rows(net.conv2.weight) == 8 and dead_rows(net.fc1.weight) == 60
    assert cb.pruned_channels().keys() == {"conv2", "fc1"}


def test_a_step_schedule_prunes_at_batch_starts_and_the_rate_drops_once():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5, schedule="iterative", unit="step", start=2, end=4, lr_scale=0.5)
    cb.on_train_epoch_start(trainer, module)
    assert dead_rows(net.conv2.weight) == 0  # a step schedule does nothing at an epoch start
    for step in range(6):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, step)
        assert (dead_rows(net.conv2.weight) > 0) == (step >= 2)
    assert int(cb._pruned["conv2"].sum()) == 8 and cb._done == [2, 3, 4]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    state = cb.state_dict()
    again = StructuredPruning(0.5, schedule="iterative", unit="step", start=2, end=4, lr_scale=0.5)
    again.load_state_dict(state)
    state["pruned"]["conv2"][:] = False  # the loaded state is a copy
    assert again._done == [2, 3, 4] and again._lr_scaled is True and int(again._pruned["conv2"].sum()) == 8


def test_an_epoch_schedule_does_nothing_at_batch_starts():
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5, start=0)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert not any(p.any() for p in cb._pruned.values())


@pytest.mark.parametrize(("kind", "strength"), [("l1", 0.01), ("bn_l1", 0.01), ("group_lasso", 0.01), ("l1", 0.0), (None, 0.01)])
def test_the_penalty_gradient_is_added_after_backward_only_when_asked(kind, strength):
    net = lenet()
    cb, trainer, module = structured(net, sparsity=0.5, regularize=kind, reg_strength=strength)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    cb.on_after_backward(trainer, module)
    grad = net.conv1.weight.grad
    if kind == "l1" and strength > 0:
        torch.testing.assert_close(grad, strength * torch.sign(net.conv1.weight.detach()))
    elif kind == "group_lasso":
        rows = net.conv1.weight.detach().flatten(1)  # conv1's group: its filters, bias, and conv2's input channels
        norms = (rows.pow(2).sum(1) + net.conv1.bias.detach().pow(2) + net.conv2.weight.detach().pow(2).sum((0, 2, 3))).sqrt()
        torch.testing.assert_close(grad, strength * net.conv1.weight.detach() / norms.view(-1, 1, 1, 1))
    else:
        assert not grad.any()  # bn_l1 touches only norm scales (LeNet-5 has none); strength 0 or no regularizer: nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"calibration_batches": 0}, "calibration_batches must be >= 1"), ({"reg_strength": -0.1}, "reg_strength >= 0"),
     ({"lr_scale": 0.0}, r"lr_scale in \(0, 1\]"), ({"lr_scale": 1.5}, r"lr_scale in \(0, 1\]"),
     ({"importance": "nope"}, "prune.importance must be one of"), ({"regularize": "l3"}, "prune.regularize must be null or one of")],
)  # fmt: skip
def test_bad_structured_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(0.5, **kwargs)


def test_the_structured_boundaries_are_allowed():
    cb = StructuredPruning(0.5, calibration_batches=1, reg_strength=0.0, lr_scale=1.0, schedule="agp", start=0, end=1, initial_sparsity=0.25)
    assert cb.schedule.sparsity_at(0, 0.5) == 0.25 and cb.describe() == "prune structured-l1 s=0.5"
    assert StructuredPruning(0.3).schedule.times() == [0]  # one shot at the first epoch by default


def test_skipping_every_group_is_refused_and_naming_no_layer_lists_the_layers():
    with pytest.raises(ValueError, match=r"^no channel group is left to prune \(every group holds a skipped layer\)$"):
        StructuredPruning(0.5, skip=["conv1", "conv2", "fc1", "fc2"]).check_layers(lenet(), SHAPE)
    with pytest.raises(ValueError, match=r"no layer matches 'fc9'; the layers with prunable outputs are \['conv1', 'conv2', 'fc1', 'fc2', 'fc3'\]"):
        StructuredPruning(0.5, layers=["fc9"]).check_layers(lenet(), SHAPE)
    with pytest.raises(ValueError, match=r"'fc3' is the output layer"):
        StructuredPruning(0.5, layers=["fc3"]).check_layers(lenet(), SHAPE)
    with pytest.raises(ValueError, match="ends at epoch 6 but training has trainer.max_epochs=6"):
        StructuredPruning(0.5, start=6).setup(*stub(lenet(), max_epochs=6, data=SimpleNamespace(input_shape=SHAPE)), "fit")


def test_apply_prunes_to_the_final_sparsity_outside_training_and_fold_removes_the_channels():
    net = lenet()
    cb = StructuredPruning(0.5, layers=["conv2"])
    assert cb.apply(net, SHAPE) is net
    assert int(cb._pruned["conv2"].sum()) == 8 and dead_rows(net.conv1.weight) == 0
    x = torch.randn(5, *SHAPE)
    before = net.eval()(x)
    cb.fold(net)
    assert net.conv2.out_channels == 8 and net.conv1.out_channels == 6
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-4)


def revive(net: LeNet5, channel: int, value: float) -> None:
    """Give a pruned channel of conv2 a constant output ``value`` that reaches fc1 (its 2x2 map's columns)."""
    with torch.no_grad():
        net.conv2.bias[channel] = value
        net.fc1.weight[:, 4 * channel : 4 * channel + 4] = 1.0


def test_fold_refuses_a_model_whose_function_removal_would_change():
    net = lenet()
    cb = StructuredPruning(0.5, layers=["conv2"])
    cb.apply(net, SHAPE)
    channel = cb.pruned_channels()["conv2"][0]
    revive(net, channel, 5.0)  # a "pruned" channel that still carries a signal
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))  # the fold's own probe
    with torch.no_grad():
        before = net.eval()(x)
        rows = net.fc1.weight[:, 4 * channel : 4 * channel + 4].clone()
        net.fc1.weight[:, 4 * channel : 4 * channel + 4] = 0.0
        without = net(x)
        net.fc1.weight[:, 4 * channel : 4 * channel + 4] = rows
    diff = float((before - without).abs().max())
    with pytest.raises(RuntimeError, match=rf"^removing the pruned channels changed the outputs \(max \|diff\| {diff:.3g}\)$"):
        cb.fold(net)


def test_fold_tolerates_only_float_noise():
    net = lenet()
    cb = StructuredPruning(0.5, layers=["conv2"])
    cb.apply(net, SHAPE)
    channel = cb.pruned_channels()["conv2"][0]
    revive(net, channel, 1e-7)  # below any tolerance: removing it cannot be told apart
    cb.fold(net)
    net2 = lenet()
    cb2 = StructuredPruning(0.5, layers=["conv2"])
    cb2.apply(net2, SHAPE)
    revive(net2, cb2.pruned_channels()["conv2"][0], 1e-4)  # a change of about 1e-3 in logits of about 0.1: real
    with pytest.raises(RuntimeError, match="changed the outputs"):
        cb2.fold(net2)


# ---- lottery tickets -------------------------------------------------------------------
from callbacks import LotteryTicket  # noqa: E402


def lottery(net, epochs_per_round: int = 2, steps: int = 10, **kwargs):
    """A lottery callback set up on ``net`` (Net: 16 -> 12 -> 8 -> 4) in a stub fit."""
    trainer, module = stub(net, max_epochs=epochs_per_round, data=SimpleNamespace(input_shape=(16,)))
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizers[0], step_size=1, gamma=0.5)
    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=scheduler)]
    trainer.fit_loop = SimpleNamespace(max_epochs=epochs_per_round)
    trainer.num_training_batches = steps
    trainer.callback_metrics, trainer.sanity_checking, trainer.callbacks = {}, False, []
    trainer.is_global_zero = True
    trainer.logger = SimpleNamespace(rows=[], log_metrics=lambda metrics, step: trainer.logger.rows.append((step, metrics)))
    cb = LotteryTicket(**kwargs)
    cb.setup(trainer, module, "fit")
    cb.on_train_start(trainer, module)
    return cb, trainer, module


def start_epoch(cb, trainer, module, epoch: int) -> None:
    trainer.current_epoch = epoch
    cb.on_train_epoch_start(trainer, module)


def test_rounds_are_the_fewest_that_reach_the_sparsity_on_both_sides_of_an_exact_power():
    assert LotteryTicket(1 - 0.8**2, rate=0.2).rounds == 2  # exactly two rounds' worth: not three
    assert LotteryTicket(1 - 0.8**2 + 0.001, rate=0.2).rounds == 3
    assert LotteryTicket(0.0, rate=0.2).rounds == 0 and LotteryTicket(0.0, rate=0.0).rounds == 0
    default = LotteryTicket(0.5)
    assert (default.rate, default.output_rate, default.rewind, default.seed) == (0.2, 0.1, 0, 0)
    assert LotteryTicket(0.5, rate=0.2, output_rate=0.3).output_rate == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sparsity": 1.0}, r"^prune.sparsity must be a fraction"), ({"sparsity": 0.5, "rate": 1.0}, r"^prune.rate must be a fraction"),
     ({"sparsity": 0.5, "output_rate": 1.0}, r"^prune.output_rate must be a fraction"),
     ({"sparsity": 0.001, "rate": 0.0}, r"^prune.rate must be > 0 to reach a sparsity above 0$"),
     ({"sparsity": 0.5, "reinit": "fresh"}, r"^prune.reinit must be one of \('rewind', 'random'\), got 'fresh'$"),
     ({"sparsity": 0.5, "rewind": -1}, r"^prune.rewind is an optimizer step \(>= 0\), got -1$")],
)  # fmt: skip
def test_bad_lottery_values_are_refused_with_the_key_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LotteryTicket(**kwargs)


def test_the_lottery_run_name_part_says_ticket_or_control():
    assert LotteryTicket(0.9, rate=0.2).describe() == "prune lottery s=0.9 r=0.2"
    assert LotteryTicket(0.9, rate=0.2, reinit="random").describe() == "prune lottery-random-reinit s=0.9 r=0.2"


def test_the_control_needs_the_builder_and_layer_names_are_checked():
    with pytest.raises(ValueError, match=r"^prune.reinit=random needs the model's builder \(set by kd.run.experiment\)$"):
        LotteryTicket(0.5, reinit="random").check_layers(Net(), (16,))
    control = LotteryTicket(0.5, reinit="random")
    control.build_model = Net
    control.check_layers(Net(), (16,))
    LotteryTicket(0.5).check_layers(Net(), (16,))  # a ticket needs no builder
    with pytest.raises(ValueError, match="no prunable layer matches 'fc9'"):
        LotteryTicket(0.5, layers=["fc9"]).check_layers(Net(), (16,))


def test_each_round_prunes_the_remaining_weights_the_output_layer_at_half_rate_and_skipped_ones_not_at_all():
    net = Net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3, skip=["fc2"])
    assert cb.rounds == 2 and trainer.fit_loop.max_epochs == 2 * 3
    start_epoch(cb, trainer, module, 0)
    start_epoch(cb, trainer, module, 1)
    assert cb._round == 0 and module.logged["lottery/round"] == 0.0
    for r, epoch in ((1, 2), (2, 4)):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5)  # training moved the weights
        trainer.optimizers[0].state[net.fc1.bias] = {"momentum_buffer": torch.ones(12)}
        trainer.optimizers[0].param_groups[0]["lr"] = 0.001
        trainer.optimizers[0].step()
        trainer.lr_scheduler_configs[0].scheduler.step()
        start_epoch(cb, trainer, module, epoch)
        assert cb._round == r and module.logged["lottery/round"] == float(r)
        hidden = 0.5 if r == 2 else 1 - 0.7**r
        assert int((net.fc1.weight_mask == 0).sum()) == round(hidden * 192)
        assert int((net.head.weight_mask == 0).sum()) == round((1 - 0.85**r) * 32)
        assert not hasattr(net.fc2, "weight_mask") and torch.equal(net.fc2.weight, init["fc2.weight"])  # rewound, never pruned
        kept = net.fc1.weight_mask.bool()
        torch.testing.assert_close(net.fc1.weight_orig[kept], init["fc1.weight"][kept])
        torch.testing.assert_close(net.fc1.bias, init["fc1.bias"])
        assert not trainer.optimizers[0].state and trainer.optimizers[0].param_groups[0]["lr"] == 0.1
        assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    start_epoch(cb, trainer, module, 5)
    assert cb._round == 2 and cb.at_target
    assert [m for m in cb._masks] == [1, 2] and torch.equal(cb._masks[2]["fc1"], net.fc1.weight_mask.bool())


def test_a_resumed_round_is_not_entered_twice():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3)
    start_epoch(cb, trainer, module, 2)
    pruned = int((net.fc1.weight_mask == 0).sum())
    start_epoch(cb, trainer, module, 2)  # the same epoch again (resumed from its checkpoint)
    start_epoch(cb, trainer, module, 3)
    assert cb._round == 1 and int((net.fc1.weight_mask == 0).sum()) == pruned


@pytest.mark.parametrize("k", [1, 3])
def test_late_rewinding_captures_the_weights_of_step_k_only(k):
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.3, rate=0.3, rewind=k)
    assert cb._rewind_state is None  # not the initial weights
    for step in range(6):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, step)
        if step == k:
            at_k = {name: v.clone() for name, v in net.state_dict().items()}
        with torch.no_grad():
            net.fc1.bias.add_(1.0)
    start_epoch(cb, trainer, module, 2)
    torch.testing.assert_close(net.fc1.bias, at_k["fc1.bias"])
    assert LotteryTicket(0.3, rate=0.3).rewind == 0


def test_the_rewind_step_must_lie_in_round_0_on_both_sides():
    lottery(Net(), epochs_per_round=2, steps=10, sparsity=0.3, rewind=19)
    with pytest.raises(ValueError, match=r"^prune.rewind=20 lies beyond round 0 \(20 steps\)$"):
        lottery(Net(), epochs_per_round=2, steps=10, sparsity=0.3, rewind=20)


def test_the_best_epoch_of_a_round_is_the_first_to_reach_its_best_accuracy():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.3, rate=0.3)
    for step, acc, sanity in ((5, 0.9, True), (10, 0.5, False), (20, 0.7, False), (30, 0.7, False), (40, None, False)):
        trainer.global_step, trainer.sanity_checking = step, sanity
        trainer.callback_metrics = {} if acc is None else {"val/acc": torch.tensor(acc)}
        cb.on_validation_end(trainer, module)
    assert cb._best == (pytest.approx(0.7), 20)  # the sanity check's 0.9 does not count; the tie keeps step 20


def test_a_finished_round_is_a_row_logged_with_the_round_as_its_step():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3)
    cb._best = (0.8, 7)
    start_epoch(cb, trainer, module, 2)
    step, metrics = trainer.logger.rows[0]
    assert step == 0 and metrics == {"lottery/sparsity": 0.0, "lottery/remaining_percent": 100.0,
                                     "lottery/val_acc_best": 0.8, "lottery/early_stop_iteration": 7.0}  # fmt: skip
    cb._best = (0.6, 3)
    kept = sum(int(m.weight_mask.sum()) for m in (net.fc1, net.fc2, net.head))  # round 1's masks, before round 2 prunes
    start_epoch(cb, trainer, module, 4)
    step, metrics = trainer.logger.rows[1]
    assert step == 1 and metrics["lottery/sparsity"] == pytest.approx(1 - kept / 320)
    assert metrics["lottery/remaining_percent"] == pytest.approx(100 * kept / 320)


def test_the_artifacts_of_a_single_round_and_the_fold(tmp_path):
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.0)
    cb.on_fit_end(trainer, module)
    files = cb.artifacts(tmp_path / "new" / "run")
    assert [f.name for f in files] == ["lottery_rounds.csv", "lottery_masks.pt", "lottery_rounds.png"]
    assert (tmp_path / "new" / "run" / "lottery_rounds.csv").read_text().splitlines()[0] == "round,sparsity,remaining_percent,val_acc_best,early_stop_iteration"
    cb.fold(net)
    assert not [n for n, _ in net.named_buffers()] and "fc1.weight" in dict(net.named_parameters())


def test_the_control_redraws_fresh_weights_from_its_seed_each_round():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3, reinit="random", seed=7)
    cb.build_model = _fresh  # a builder draws from the global generator, which the control seeds
    for r, epoch in ((1, 2), (2, 4)):
        start_epoch(cb, trainer, module, epoch)
        torch.manual_seed(7 + 1000 * r)
        expected = _fresh()
        kept = net.fc1.weight_mask.bool()
        torch.testing.assert_close(net.fc1.weight_orig[kept], expected.fc1.weight[kept])


def test_a_round_without_validation_has_no_best_epoch():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3)
    start_epoch(cb, trainer, module, 2)
    assert trainer.logger.rows[0][1]["lottery/val_acc_best"] == -1.0 and trainer.logger.rows[0][1]["lottery/early_stop_iteration"] == 0.0


def test_lottery_layers_choose_what_is_pruned_and_a_kept_output_layer_is_fine():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3, layers=["fc1"])
    start_epoch(cb, trainer, module, 2)
    assert list(cb._targets) == ["fc1"] and not hasattr(net.head, "weight_mask") and not hasattr(net.fc2, "weight_mask")
    assert int((net.fc1.weight_mask == 0).sum()) == round(0.3 * 192)
    net2 = Net()
    cb2, trainer2, module2 = lottery(net2, sparsity=0.5, rate=0.3, skip=["head"])
    assert cb2._output is None  # the output layer is not pruned: no half rate for anyone
    start_epoch(cb2, trainer2, module2, 2)
    assert int((net2.fc2.weight_mask == 0).sum()) == round(0.3 * 96)


def test_a_second_lottery_setup_keeps_the_masks():
    net = Net()
    cb, trainer, module = lottery(net, sparsity=0.5, rate=0.3)
    start_epoch(cb, trainer, module, 2)
    mask = net.fc1.weight_mask.clone()
    cb.setup(trainer, module, "fit")
    assert torch.equal(net.fc1.weight_mask, mask) and len(net.fc1._forward_pre_hooks) == 1


def test_replayed_masks_are_loaded_as_weights_only(tmp_path):
    import pickle

    path = tmp_path / "masks.pt"
    torch.save({1: {"fc1": SimpleNamespace(mask=torch.ones(12, 16))}}, path)  # an object, not a tensor
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        LotteryTicket(0.3, rate=0.3, masks_from=str(path)).check_layers(Net(), (16,))


def _fresh() -> Net:
    """A Net drawn from the global generator as it stands (what a seeded builder does)."""
    net = Net.__new__(Net)
    nn.Module.__init__(net)
    net.fc1, net.fc2, net.head = nn.Linear(16, 12), nn.Linear(12, 8, bias=False), nn.Linear(8, 4)
    return net


def test_replayed_masks_must_cover_every_round_and_layer(tmp_path):
    good = {r: {"fc1": torch.ones(12, 16, dtype=torch.bool), "fc2": torch.ones(8, 12, dtype=torch.bool), "head": torch.ones(4, 8, dtype=torch.bool)} for r in (1, 2)}
    path = tmp_path / "masks.pt"
    with pytest.raises(FileNotFoundError, match=rf"^prune.masks_from: no such file {tmp_path / 'none.pt'}$"):
        LotteryTicket(0.5, rate=0.3, masks_from=str(tmp_path / "none.pt")).check_layers(Net(), (16,))
    for rounds, missing in (((2,), [1]), ((1,), [2])):
        torch.save({r: good[r] for r in rounds}, path)
        with pytest.raises(ValueError, match=rf"masks.pt has no masks for rounds \[{missing[0]}\]: was it written with the same sparsity and rate\?$"):
            LotteryTicket(0.5, rate=0.3, masks_from=str(path)).check_layers(Net(), (16,))
    torch.save({r: good[r] | {"fc2": torch.ones(8, 13, dtype=torch.bool)} for r in (1, 2)}, path)
    with pytest.raises(ValueError, match=r"round 1 has no mask of shape \(8, 12\) for 'fc2'$"):
        LotteryTicket(0.5, rate=0.3, masks_from=str(path)).check_layers(Net(), (16,))
    torch.save({r: {k: v for k, v in good[r].items() if k != "head"} for r in (1, 2)}, path)
    with pytest.raises(ValueError, match=r"round 1 has no mask of shape \(4, 8\) for 'head'$"):
        LotteryTicket(0.5, rate=0.3, masks_from=str(path)).check_layers(Net(), (16,))
    LotteryTicket(0.5, rate=0.3, masks_from=str(path), skip=["head"]).check_layers(Net(), (16,))  # only the pruned layers need one
    LotteryTicket(0.5, rate=0.3, masks_from=str(path), layers=["fc*"]).check_layers(Net(), (16,))
    torch.save(good, path)
    LotteryTicket(0.5, rate=0.3, masks_from=str(path)).check_layers(Net(), (16,))


# ---- model selection -------------------------------------------------------------------
from callbacks import PostTrainingQuantization, QuantizationAwareTraining, SELECTION_KEY, WeightClustering  # noqa: E402
from callbacks.stage import write_selection  # noqa: E402


def selecting(stages, epoch: int, acc: float | None, sanity: bool = False):
    trainer = SimpleNamespace(callbacks=[*stages, object()], current_epoch=epoch, sanity_checking=sanity,
                              callback_metrics={} if acc is None else {"val/acc": torch.tensor(acc)})  # fmt: skip
    write_selection(trainer)
    return trainer.callback_metrics.get(SELECTION_KEY)


def test_an_epoch_counts_for_selection_only_when_every_stage_has_its_final_form():
    pruner = MagnitudePruning(0.5, schedule="agp", start=0, end=2)
    clustering = WeightClustering(bits=4, start=3)
    assert float(selecting([pruner, clustering], 3, 0.7)) == 0.0  # pruner not at its target yet
    pruner._done = [0, 1, 2]
    assert float(selecting([pruner, clustering], 2, 0.7)) == 0.0  # clustering starts at epoch 3
    assert float(selecting([pruner, clustering], 3, 0.7)) == pytest.approx(0.7)
    assert float(selecting([], 0, 0.6)) == pytest.approx(0.6)  # no stage: every epoch counts
    assert selecting([pruner], 3, None) is None  # no validation this epoch: nothing written
    assert selecting([pruner], 3, 0.9, sanity=True) is None  # Lightning's sanity check is not an epoch


def test_the_selection_key_is_a_copy_of_the_accuracy():
    trainer = SimpleNamespace(callbacks=[], current_epoch=0, sanity_checking=False, callback_metrics={"val/acc": torch.tensor(0.5)})
    write_selection(trainer)
    trainer.callback_metrics["val/acc"] += 0.25
    assert float(trainer.callback_metrics[SELECTION_KEY]) == 0.5


def test_post_training_quantization_lets_every_epoch_count_and_qat_every_epoch_from_its_start():
    assert PostTrainingQuantization().selectable(0)
    qat = QuantizationAwareTraining()
    assert qat.selectable(0) and qat.start == 0
    assert not WeightClustering(bits=4, start=2).selectable(1) and WeightClustering(bits=4, start=2).selectable(2)


# ---- N:M semi-structured ---------------------------------------------------------------
from callbacks import NMPruning  # noqa: E402
from callbacks.nm import check_pattern  # noqa: E402


def _groups_of(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The non-zero count of every run of ``m`` input weights (a conv's runs are of input channels)."""
    w = weight.detach()
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return (w.reshape(-1, m) != 0).sum(1)


def test_every_group_of_four_keeps_its_two_largest_weights():
    net = Net()
    cb = NMPruning(2, 4)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    original = net.fc1.weight.detach().clone()
    cb.on_train_epoch_start(trainer, module)
    for layer in (net.fc1, net.fc2, net.head):
        assert _groups_of(layer.weight, 4).tolist() == [2] * (layer.weight.numel() // 4)
    kept = net.fc1.weight.detach().reshape(-1, 4) != 0
    top2 = original.abs().reshape(-1, 4).topk(2, dim=1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, top2, True))  # the two largest of each group, by hand
    assert cb.describe() == "prune 2:4" and cb.sparsity == 0.5


def test_a_gradual_schedule_steps_through_patterns_of_its_own():
    net = Net()
    cb = NMPruning(1, 4, schedule="agp", start=0, end=2)
    trainer, module = stub(net)
    cb.setup(trainer, module, "fit")
    for epoch in range(3):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, module)
        target = 0.75 * (1 - (1 - epoch / 2) ** 3)
        assert set(_groups_of(net.fc1.weight, 4).tolist()) == {4 - int(target * 4 + 1e-9)}, epoch  # 4:4, 3:4, then 1:4
        with torch.no_grad():
            net.fc1.weight.add_(0.01)
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert cb.describe() == "prune 1:4 agp"


def test_conv_groups_run_along_input_channels_and_taylor_uses_the_gradient():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(32, 8, 8, 8)
    y = torch.randint(0, 10, (32,))
    data = SimpleNamespace(train=SimpleNamespace(x=x, y=y), batch_size=16, input_shape=(8, 8, 8))
    cb = NMPruning(2, 4, importance="taylor", calibration_batches=2, skip=["2"])
    cb.check_layers(conv, (8, 8, 8))
    trainer, module = stub(conv, data=data)
    cb.setup(trainer, module, "fit")
    weight = conv[0].weight.detach().clone()
    conv.zero_grad()
    conv.eval()
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    for chunk in order.split(16):  # the summed gradient of two calibration batches, by hand
        nn.functional.cross_entropy(conv(x[chunk]), y[chunk]).backward()
    scores = (weight * conv[0].weight.grad).abs().permute(0, 2, 3, 1).reshape(-1, 4)
    conv.train()
    cb.on_train_epoch_start(trainer, module)
    kept = conv[0].weight.detach().permute(0, 2, 3, 1).reshape(-1, 4) != 0
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, scores.topk(2, dim=1).indices, True))
    assert conv[0].weight.grad is None  # the calibration gradient does not leak into training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": 5, "m": 4}, r"prune.n must be <= prune.m .* got n=5, m=4"), ({"n": 0}, "prune.n must be an integer >= 1, got 0"),
     ({"m": 2.5}, "prune.m must be an integer >= 1, got 2.5"), ({"importance": "l1"}, r"prune.importance must be one of \('magnitude', 'taylor'\)")],
)  # fmt: skip
def test_bad_nm_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NMPruning(**kwargs)


def test_a_layer_whose_input_is_not_a_multiple_of_m_is_named():
    with pytest.raises(ValueError, match=r"N:M pruning of 'conv1': its input dimension 1 is not a multiple of prune.m=4; add it to prune.skip"):
        NMPruning(2, 4).check_layers(lenet(), SHAPE)
    with pytest.raises(ValueError, match=r"N:M pruning of 'conv2': its input dimension 6 is not a multiple of prune.m=4"):
        NMPruning(2, 4, skip=["conv1"]).check_layers(lenet(), SHAPE)
    NMPruning(2, 4, skip=["conv1", "conv2"]).check_layers(lenet(), SHAPE)  # fc1 (64), fc2 (120), fc3 (84) group by 4
    NMPruning(2, 3, skip=["conv1", "fc1", "fc2"]).check_layers(lenet(), SHAPE)  # conv2's 6 and fc3's 84 by 3

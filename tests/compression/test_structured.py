"""Structured pruning: channel groups chosen by every importance, held at zero while training,
removed for real at the end with the function unchanged, saved and reloaded; the sparse
regularisers' gradients; bad layer choices; resume."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import StructuredPruning
from callbacks.groups import add_penalty_gradient, group_members
from callbacks.importance import calibration_gradients
from kd.train.checkpoint import load_weights
from kd.run.experiment import run
from kd.tracking.measure import count_macs, count_params
from kd.models import MLP, CIFARResNet, LeNet5
from kd.compression.thinning import PRUNED_KEY, dependency_graph
from tests.compression.pruning_helpers import KillAt, digits, module, trainer

SHAPE = (1, 8, 8)


def _lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(10, SHAPE)


def _resnet(seed: int = 0) -> CIFARResNet:
    torch.manual_seed(seed)
    return CIFARResNet(10, SHAPE, depth=8, width=[8, 16, 32])


@pytest.mark.parametrize("importance", ["l1", "l2", "random", "taylor", "hessian", "fpgm"])
def test_every_importance_prunes_half_of_each_group_and_the_model_gets_smaller(importance):
    model = _lenet()
    cb = StructuredPruning(0.5, importance=importance, start=1)
    trainer([cb], max_epochs=2).fit(module(model), datamodule=digits())
    # held at zero while training: conv1 loses 3 of its 6 filters, the output layer none
    assert int((model.conv1.weight.flatten(1).abs().sum(1) == 0).sum()) == 3
    assert int((model.fc3.weight.abs().sum(1) == 0).sum()) == 0
    params, macs = count_params(model), count_macs(model, SHAPE)
    cb.fold(model)  # raises if removing the channels changed the outputs
    assert model.conv1.out_channels == 3 and model.conv2.in_channels == 3
    assert model.fc3.out_features == 10
    assert count_params(model) < 0.5 * params and count_macs(model, SHAPE) < 0.5 * macs


def test_groups_follow_the_graph_through_residual_blocks_and_batchnorm():
    model = _resnet()
    x = torch.randn(4, *SHAPE)
    cb = StructuredPruning(0.5, schedule="agp", start=0, end=2)
    trainer([cb], max_epochs=3).fit(module(model), datamodule=digits())
    model.eval()
    before = model(x)
    cb.fold(model)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    assert model.layer1[0].bn1.num_features == model.layer1[0].conv1.out_channels == 4


def test_global_scope_ranks_all_channels_together():
    model = _lenet()
    cb = StructuredPruning(0.5, scope="global", importance="l2", start=1)
    trainer([cb], max_epochs=2).fit(module(model), datamodule=digits())
    fractions = {root: float(p.float().mean()) for root, p in cb._pruned.items()}
    total = sum(p.numel() for p in cb._pruned.values())
    assert sum(int(p.sum()) for p in cb._pruned.values()) == pytest.approx(total / 2, abs=len(cb._pruned))
    assert len(set(round(f, 2) for f in fractions.values())) > 1  # groups end at different widths


def test_channels_once_pruned_stay_pruned_across_events():
    model = _lenet()
    seen: list[dict[str, torch.Tensor]] = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in cb._pruned.items()})

    cb = StructuredPruning(0.75, importance="random", schedule="iterative", start=0, end=2)
    trainer([cb, Spy()], max_epochs=3).fit(module(model), datamodule=digits())
    for earlier, later in zip(seen, seen[1:]):
        for root in earlier:
            assert bool((earlier[root] <= later[root]).all()), root  # a superset every time


def test_taylor_gradient_is_summed_over_the_calibration_batches():
    model = _lenet()
    calibration_gradients(model, digits(), 3, squared=False)
    got = model.conv1.weight.grad.clone()
    data = digits()
    order = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    expected = torch.zeros_like(got)
    model.eval()
    for chunk in order[: 3 * data.batch_size].split(data.batch_size):
        model.zero_grad()
        nn.functional.cross_entropy(model(data.train.x[chunk]), data.train.y[chunk]).backward()
        expected += model.conv1.weight.grad
    torch.testing.assert_close(got, expected)


def _penalty_grad(cb: StructuredPruning, model: nn.Module) -> dict[str, torch.Tensor]:
    cb._groups = {}
    graph = dependency_graph(model, SHAPE)
    _, roots, _ = cb._plan(model, SHAPE)
    for name, root in roots.items():
        handler = graph.get_pruner_of_module(root).prune_out_channels
        cb._groups[name] = group_members(graph, graph.get_pruning_group(root, handler, list(range(graph.get_out_channels(root)))))
        cb._pruned[name] = torch.zeros(graph.get_out_channels(root), dtype=torch.bool)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add_penalty_gradient(cb.regularize, cb.reg_strength, cb._groups, model)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_group_lasso_gradient_is_that_of_the_sum_of_channel_group_norms():
    torch.manual_seed(0)
    model = MLP(10, SHAPE, hidden=[6, 5])
    got = _penalty_grad(StructuredPruning(0.5, regularize="group_lasso", reg_strength=0.3), model)
    w0, b0, w1, b1, w2 = model.layers[0].weight, model.layers[0].bias, model.layers[2].weight, model.layers[2].bias, model.head.weight
    # group of hidden unit j of layer 0: row j of W0, b0[j], column j of W1 (and likewise for layer 2)
    penalty = 0.3 * (
        (w0.pow(2).sum(1) + b0.pow(2) + w1.pow(2).sum(0)).sqrt().sum()
        + (w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)).sqrt().sum()
    )
    expected = torch.autograd.grad(penalty, [w0, b0, w1, b1, w2])
    for name, want in zip(["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias", "head.weight"], expected):
        torch.testing.assert_close(got[name], want, msg=name)
    assert got["head.bias"].abs().sum() == 0  # the output layer is not a group of its own


def test_bn_l1_is_network_slimming_on_batchnorm_scales_only():
    model = _resnet()
    with torch.no_grad():
        model.bn1.weight.uniform_(-1, 1)
    got = _penalty_grad(StructuredPruning(0.5, regularize="bn_l1", reg_strength=0.01), model)
    torch.testing.assert_close(got["bn1.weight"], 0.01 * torch.sign(model.bn1.weight))
    assert got["conv1.weight"].abs().sum() == 0 and got["bn1.bias"].abs().sum() == 0


def test_l1_pushes_the_pruned_layers_weights_toward_zero():
    model = _lenet()
    got = _penalty_grad(StructuredPruning(0.5, regularize="l1", reg_strength=0.01), model)
    torch.testing.assert_close(got["conv1.weight"], 0.01 * torch.sign(model.conv1.weight))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["fc3"]}, "'fc3' is the output layer"),
        ({"layers": ["conv9"]}, r"no layer matches 'conv9'; the layers with prunable outputs are \['conv1'"),
        ({"importance": "entropy"}, "prune.importance must be one of"),
        ({"scope": "global_unstructured"}, "prune.scope must be one of"),
        ({"regularize": "l2"}, "prune.regularize must be null or one of"),
        ({"sparsity": 1.0}, "prune.sparsity must be a fraction"),
    ],
)
def test_bad_structured_choices_fail_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**({"sparsity": 0.5} | kwargs)).check_layers(_lenet(), SHAPE)


def test_a_layer_coupled_with_a_kept_layer_cannot_be_pruned():
    # a residual addition ties layer2's second conv to its shortcut conv: keep one, the other cannot go
    cb = StructuredPruning(0.5, layers=["layer2.0.conv2"], skip=["layer2.0.downsample.0"])
    with pytest.raises(ValueError, match="'layer2.0.conv2' cannot be pruned: its channels are coupled"):
        cb.check_layers(_resnet(), SHAPE)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_structured_masks_survive_a_checkpoint_resume(tmp_path):
    def fit(root: Path, ckpt: str | None = None, kill: bool = False):
        pl.seed_everything(0, verbose=False)
        lit = module(_lenet())
        cb = StructuredPruning(0.6, importance="taylor", schedule="agp", start=1, end=3)
        callbacks = [cb, ModelCheckpoint(dirpath=root, save_last=True), *([KillAt(2)] if kill else [])]
        trainer(callbacks, 4, enable_checkpointing=True).fit(lit, datamodule=digits(), ckpt_path=ckpt)
        return lit, cb

    full, full_cb = fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "cut", kill=True)
    resumed, cb = fit(tmp_path / "cut", ckpt=str(tmp_path / "cut" / "last.ckpt"))
    assert cb.pruned_channels() == full_cb.pruned_channels() and cb._done == [1, 2, 3]
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))


def test_a_structured_run_is_physically_smaller_saved_and_reloadable(make_cfg):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "prune=structured", "prune.start=1", "trainer.max_epochs=3")
    metrics = run(cfg)
    assert metrics["model/params"] < 0.5 * metrics["dense/params"]
    assert metrics["model/macs"] < 0.5 * metrics["dense/macs"]
    assert metrics["prune/param_reduction"] == pytest.approx(metrics["dense/params"] / metrics["model/params"])
    saved = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)  # no pickled module
    assert set(saved[PRUNED_KEY]) >= {"conv1", "conv2", "fc1", "fc2"}
    rebuilt = load_weights(LeNet5(10, SHAPE), Path(cfg.paths.run_dir) / "student.pt", input_shape=SHAPE)
    assert count_params(rebuilt) == metrics["model/params"]
    with torch.no_grad():
        predictions = rebuilt.eval()(digits().test.x).argmax(1)
    # the reloaded small model scores exactly what the run tested (on the masked dense model)
    assert float((predictions == digits().test.y).float().mean()) == pytest.approx(metrics["test/acc"], abs=1e-6)

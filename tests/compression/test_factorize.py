"""Low-rank factorisation (kd.compression.factorize): exactness at full rank, the rank criteria against
hand-computed values, the parameter bookkeeping of LowRank, and rebuilding a saved model."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd.compression.factorize import LowRank, choose_rank, factorize_conv, factorize_linear
from kd.tracking.measure import count_params
from kd.models.lenet import LeNet5


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


def known_spectrum() -> tuple[torch.Tensor, torch.Tensor]:
    """A (16, 12) matrix with singular values exactly [4, 2, 1, 0.5] (and zeros)."""
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))  # orthonormal columns
    right, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    return (left * s) @ right.T, s


def test_full_rank_linear_reproduces_outputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    seq = factorize_linear(layer, rank=7)
    x = torch.randn(5, 12)
    assert [m.weight.shape for m in seq] == [(7, 12), (7, 7)] and seq[0].bias is None
    assert seq[1].weight.dtype == torch.float32
    torch.testing.assert_close(seq(x), layer(x))


@pytest.mark.parametrize("scheme, rank", [("channel", 3 * 3 * 5), ("spatial", min(3 * 3, 6 * 5))])
def test_full_rank_conv_reproduces_outputs(scheme: str, rank: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 6, kernel_size=(3, 5), stride=2, padding=1, bias=True)
    seq = factorize_conv(layer, rank=rank, scheme=scheme)
    x = torch.randn(2, 3, 11, 13)
    out = seq(x)
    assert out.shape == layer(x).shape
    torch.testing.assert_close(out, layer(x))


def test_spatial_layers_have_separable_kernels() -> None:
    layer = nn.Conv2d(3, 6, kernel_size=(3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2))
    vertical, horizontal = factorize_conv(layer, rank=2, scheme="spatial")
    assert (vertical.kernel_size, vertical.stride, vertical.padding, vertical.dilation) == ((3, 1), (2, 1), (1, 0), (1, 1))
    assert (horizontal.kernel_size, horizontal.stride, horizontal.padding, horizontal.dilation) == (
        (1, 5), (1, 3), (0, 2), (1, 2))
    assert vertical.bias is None and horizontal.bias is not None


def test_conv_refuses_grouped_and_same_padding_for_spatial() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        factorize_conv(nn.Conv2d(4, 4, 3, groups=2), rank=1, scheme="channel")
    with pytest.raises(ValueError, match="padding='same'"):
        factorize_conv(nn.Conv2d(4, 4, 3, padding="same"), rank=1, scheme="spatial")
    torch.manual_seed(0)
    same = nn.Conv2d(4, 5, 3, padding="same")
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(factorize_conv(same, rank=5, scheme="channel")(x), same(x))


def test_choose_rank_energy_on_known_spectrum() -> None:
    w, s = known_spectrum()
    found = torch.linalg.svdvals(w)
    torch.testing.assert_close(found[:4], s)
    # sum s^2 = 16 + 4 + 1 + 0.25 = 21.25; kept: 16/21.25=0.753, 20/21.25=0.941, 21/21.25=0.988 -> 3
    assert choose_rank(found, rank=None, energy=0.95) == 3
    assert choose_rank(found, rank=None, energy=0.94) == 2  # 0.941 >= 0.94
    assert choose_rank(found, rank=None, energy=0.75) == 1  # 0.753 >= 0.75
    assert choose_rank(s, rank=None, energy=20 / 21.25) == 2  # reaching exactly counts, rounding aside
    assert choose_rank(s, rank=None, energy=1.0) == 4
    assert choose_rank(s, rank=9, energy=None) == 4 and choose_rank(s, rank=2, energy=None) == 2
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(s, rank=2, energy=0.5)


def test_truncated_error_matches_dropped_energy() -> None:
    w, _ = known_spectrum()
    layer = nn.Linear(12, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    model = nn.Sequential(layer)
    (row,) = LowRank(energy=0.95).apply(model)
    assert row["factorized"] and row["rank"] == 3 and row["full_rank"] == 12
    assert row["energy"] == pytest.approx(21 / 21.25)
    assert row["rel_error"] == pytest.approx(math.sqrt(0.25 / 21.25), rel=1e-6)  # 0.108
    assert row["params_after"] == 3 * (12 + 16) == count_params(model)
    first, second = (m.weight.detach().double() for m in model[0])
    dropped = (w - second @ first).norm() / w.norm()
    assert float(dropped) == pytest.approx(math.sqrt(0.25 / 21.25), rel=1e-5)


def test_rank_two_mlp_params_and_rows() -> None:
    model = mlp()
    assert count_params(model) == 64 * 32 + 32 + 32 * 10 + 10  # 2410
    rows = LowRank(rank=2, energy=None).apply(model)
    # 2*(64+32)+32 = 224 and 2*(32+10)+10 = 94
    assert [(r["layer"], r["params_before"], r["params_after"], r["factorized"]) for r in rows] == [
        ("0", 2080, 224, True), ("2", 330, 94, True)]
    assert count_params(model) == 224 + 94
    assert isinstance(model[0], nn.Sequential) and model(torch.randn(3, 64)).shape == (3, 10)
    assert all(r["kind"] == "linear" and r["rank"] == 2 and r["reason"] == "" for r in rows)


def test_layer_without_saving_is_left_alone() -> None:
    model = mlp()
    last = model[2]
    rows = LowRank(rank=8, energy=None).apply(model)  # layer 2: 8*(32+10)+10 = 346 >= 330
    assert rows[0]["factorized"] and not rows[1]["factorized"]
    assert model[2] is last and rows[1]["params_after"] == 330 and "saves no parameters" in rows[1]["reason"]
    model = mlp()
    rows = LowRank(rank=2, energy=None, min_saving=0.75).apply(model)  # saves 1-224/2080=89%, 1-94/330=71.5%
    assert [r["factorized"] for r in rows] == [True, False] and "min_saving=0.75" in rows[1]["reason"]
    assert count_params(model) == 224 + 330


def test_nothing_factorised_is_an_error() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"factorised no layer.*0: saves .*2: rank 8 saves no parameters"):
        LowRank(rank=8, energy=None, min_saving=0.7).apply(model)
    assert count_params(model) == 2410


def test_conv_none_and_grouped_conv_are_skipped() -> None:
    model = convnet()
    convs = model[0], model[2]
    rows = LowRank(rank=2, energy=None, conv="none").apply(model)
    assert (model[0], model[2]) == convs and isinstance(model[5], nn.Sequential)
    assert [r["factorized"] for r in rows] == [False, False, True] and "none" in rows[0]["reason"]
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    rows = LowRank(rank=2, energy=None).apply(grouped)
    assert isinstance(grouped[0], nn.Conv2d) and "groups=2" in rows[0]["reason"] and rows[1]["factorized"]


@pytest.mark.parametrize(
    "arguments, key",
    [
        ({"rank": 2, "energy": 0.5}, "factorize.rank"),
        ({"rank": None, "energy": None}, "factorize.energy"),
        ({"energy": 0.0}, "factorize.energy"),
        ({"energy": 1.5}, "factorize.energy"),
        ({"rank": 0, "energy": None}, "factorize.rank"),
        ({"conv": "bogus"}, "factorize.conv"),
        ({"finetune_epochs": -1}, "factorize.finetune_epochs"),
        ({"lr_scale": 0.0}, "factorize.lr_scale"),
        ({"min_saving": 1.0}, "factorize.min_saving"),
    ],
)
def test_invalid_arguments_name_the_key(arguments: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LowRank(**arguments)


def test_bad_layer_pattern_is_an_error() -> None:
    with pytest.raises(ValueError, match="no prunable layer matches 'fc9'"):
        LowRank(layers=["fc9"]).apply(mlp())


def test_describe() -> None:
    assert LowRank().describe() == "svd energy=0.9"
    assert LowRank(rank=8, energy=None, conv="spatial").describe() == "svd rank=8 conv=spatial"


@pytest.mark.parametrize("conv", ["channel", "spatial"])
def test_apply_ranks_rebuilds_loadable_architecture(conv: str) -> None:
    original = convnet()
    model = copy.deepcopy(original)
    factorizer = LowRank(rank=2, energy=None, conv=conv)
    recipe = factorizer.ranks(factorizer.apply(model))
    assert recipe == {"0": {"kind": f"conv-{conv}", "rank": 2}, "2": {"kind": f"conv-{conv}", "rank": 2},
                      "5": {"kind": "linear", "rank": 2}}
    rebuilt = copy.deepcopy(original)
    factorizer.apply_ranks(rebuilt, recipe)
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="no such layer"):
        factorizer.apply_ranks(copy.deepcopy(original), {"9": {"kind": "linear", "rank": 2}})


def test_write_report(tmp_path: Path) -> None:
    rows = LowRank(rank=2, energy=None).apply(mlp())
    path = LowRank.write_report(rows, tmp_path / "deep" / "factorize.csv")
    with path.open() as handle:
        read = list(csv.DictReader(handle))
    assert [(r["layer"], r["params_after"], r["factorized"]) for r in read] == [("0", "224", "True"), ("2", "94", "True")]


def test_lenet_spatial_energy() -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10, input_shape=(1, 28, 28))
    before = count_params(model)
    rows = LowRank(energy=0.9, conv="spatial").apply(model)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(model) == before - sum(r["params_before"] - r["params_after"] for r in rows) < before
    assert {r["layer"] for r in rows} == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert all(r["energy"] >= 0.9 for r in rows if r["factorized"])
    # random weights have flat spectra: 90% energy keeps conv1 at full rank 5, 35*5+6 = 181 >= 156
    assert [r["kind"] for r in rows[:2]] == ["conv-spatial"] * 2 and "saves no parameters" in rows[0]["reason"]
    torch.manual_seed(0)
    model = LeNet5(num_classes=10, input_shape=(1, 28, 28))
    rows = LowRank(rank=2, energy=None, conv="spatial").apply(model)
    assert rows[1]["params_after"] == 2 * (6 * 5 + 16 * 5) + 16  # conv2: 236 of 2416
    assert model.conv2[0].kernel_size == (5, 1) and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- factorize=svd in a run: tested, fine-tuned, measured before/after, saved and reloaded ---


def test_a_factorized_run_fine_tunes_measures_and_saves_a_reloadable_model(make_cfg):
    from kd.tracking.measure import accuracy
    from kd.train.checkpoint import load_weights
    from kd.run.experiment import run
    from kd.models import MLP
    from tests.compression.pruning_helpers import digits

    cfg = make_cfg("factorize=svd", "factorize.rank=4", "factorize.energy=null", "factorize.finetune_epochs=2",
                   "model@student.model=mlp", "trainer.max_epochs=3", "distill=kd")  # fmt: skip
    metrics = run(cfg)
    # every linear layer of the MLP at rank 4 saves parameters
    assert metrics["model/params"] < 0.2 * metrics["dense/params"]
    assert metrics["model/macs"] < 0.2 * metrics["dense/macs"]
    assert metrics["factorize/param_reduction"] == pytest.approx(metrics["dense/params"] / metrics["model/params"])
    assert metrics["factorize/test_acc_truncated"] < metrics["factorize/test_acc_before"]  # rank 4 of 64+ loses
    assert metrics["test/acc"] > metrics["factorize/test_acc_truncated"]  # fine-tuning wins some back
    rows = list(csv.DictReader((Path(cfg.paths.run_dir) / "factorization.csv").open()))
    assert int(metrics["factorize/layers"]) == sum(r["factorized"] == "True" for r in rows) >= 2
    student = MLP(10, (1, 8, 8), hidden=list(cfg.student.model.hidden), dropout=cfg.student.model.dropout)
    rebuilt = load_weights(student, Path(cfg.paths.run_dir) / "student.pt")
    assert count_params(rebuilt) == metrics["model/params"]
    assert accuracy(rebuilt.eval(), digits().test.x, digits().test.y) == pytest.approx(metrics["test/acc"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["factorize=svd", "prune=magnitude"], "factorize with prune is not supported"),
        (["factorize=svd", "quantize=qat"], "factorize with quantize=qat is not supported"),
        (["factorize=svd", "factorize.layers=[nope]"], "no prunable layer matches 'nope'"),
        (["factorize=svd", "factorize.rank=64", "factorize.energy=null"], "factorised no layer"),
    ],
)
def test_bad_factorize_config_fails_before_anything_is_written(make_cfg, overrides, message):
    from kd.run.experiment import run

    cfg = make_cfg(*overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()

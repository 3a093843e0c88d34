"""Tests for kd.models and the conf/model/*.yaml Hydra configs."""

from collections.abc import Callable
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kd.models import MLP, CIFARResNet, LeNet5, MobileNetLite, WideResNet

MODEL_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
MODEL_CONFS = sorted(MODEL_CONF_DIR.glob("*.yaml"))
EXPECTED_CONFS = {
    "mlp", "mlp_small", "lenet300_100", "lenet5", "lenet5_caffe", "mobilenet",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10",
}  # fmt: skip
NOT_8X8 = {"lenet5_caffe"}  # unpadded 5x5 convolutions: 8 -> 4 -> 2 -> (-2)


def build(name: str, num_classes: int, input_shape: tuple[int, int, int], **overrides) -> nn.Module:
    """Instantiates conf/model/<name>.yaml the way the experiment does (partial + call)."""
    cfg = OmegaConf.load(MODEL_CONF_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    factory: Callable[..., nn.Module] = hydra.utils.instantiate(cfg)
    return factory(num_classes=num_classes, input_shape=input_shape)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_expected_configs_exist() -> None:
    assert {p.stem for p in MODEL_CONFS} == EXPECTED_CONFS


@pytest.mark.parametrize("path", MODEL_CONFS, ids=lambda p: p.stem)
def test_config_layout(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ")
    cfg = OmegaConf.load(path)
    assert cfg._target_.startswith("kd.models.")
    assert cfg._partial_ is True
    assert "num_classes" not in cfg and "input_shape" not in cfg


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 32, 32)], ids=["8x8x1", "32x32x3"])
@pytest.mark.parametrize("path", MODEL_CONFS, ids=lambda p: p.stem)
@torch.no_grad()
def test_forward_shape(path: Path, input_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    if path.stem in NOT_8X8 and input_shape[1] == 8:
        with pytest.raises(ValueError, match="larger inputs"):
            build(path.stem, num_classes=7, input_shape=input_shape)
        return
    model = build(path.stem, num_classes=7, input_shape=input_shape).eval()
    out = model(torch.randn(2, *input_shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "num_classes", "published", "exact"),
    [
        # He et al. 2016 Table 6 (0.27M / 0.85M); exact values: RepDistiller option-B code.
        ("resnet20", 10, 0.27e6, 272_474),
        ("resnet56", 10, 0.85e6, 855_770),
        # Tian et al. 2020 (CRD) Table 1, CIFAR-100.
        ("resnet8x4", 100, 1.23e6, 1_233_540),
        ("resnet32x4", 100, 7.43e6, 7_433_860),
        ("wrn_16_2", 100, 0.70e6, 703_284),
        ("wrn_40_2", 100, 2.25e6, 2_255_156),
        # Zagoruyko & Komodakis 2016 Table 4/5: WRN-28-10 has 36.5M parameters.
        ("wrn_28_10", 100, 36.5e6, 36_536_884),
        # LeCun et al. 1998 / Han et al. 2015: 784*300 + 300 + 300*100 + 100 + 100*10 + 10.
        ("lenet300_100", 10, 266_610, 266_610),
        # Han et al. 2015 Table 2 (Caffe's LeNet-5): 431K; 520 + 25,050 + 400,500 + 5,010.
        ("lenet5_caffe", 10, 431e3, 431_080),
    ],
)
def test_param_counts(name: str, num_classes: int, published: float, exact: int) -> None:
    shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
    count = n_params(build(name, num_classes=num_classes, input_shape=shape))
    assert abs(count - published) / published < 0.02
    assert count == exact


def test_named_submodules_for_hooks() -> None:
    shape = (3, 32, 32)
    expected = {
        CIFARResNet(num_classes=10, input_shape=shape): ["conv1", "bn1", "layer1", "layer2", "layer3", "avgpool", "fc"],
        WideResNet(num_classes=10, input_shape=shape): ["conv1", "block1", "block2", "block3", "bn", "fc"],
        LeNet5(num_classes=10, input_shape=shape): ["conv1", "conv2", "fc1", "fc2", "fc3"],
        MLP(num_classes=10, input_shape=shape, hidden=[8]): ["layers", "head"],
        MobileNetLite(num_classes=10, input_shape=shape): ["conv1", "bn1", "blocks", "avgpool", "fc"],
    }
    for model, names in expected.items():
        children = dict(model.named_children())
        assert all(n in children for n in names), (type(model).__name__, list(children))


@torch.no_grad()
def test_feature_shapes_resnet_and_wrn() -> None:
    feats: dict[str, torch.Size] = {}
    model = CIFARResNet(num_classes=10, input_shape=(3, 32, 32), depth=8, width=[64, 128, 256], stem=32)
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o.shape))
    model.eval()(torch.randn(2, 3, 32, 32))
    assert feats == {"layer1": (2, 64, 32, 32), "layer2": (2, 128, 16, 16), "layer3": (2, 256, 8, 8)}
    wrn = WideResNet(num_classes=10, input_shape=(3, 32, 32), depth=16, widen_factor=2).eval()
    wrn.block3.register_forward_hook(lambda m, i, o: feats.__setitem__("block3", o.shape))
    wrn(torch.randn(2, 3, 32, 32))
    assert feats["block3"] == (2, 128, 8, 8)


def test_lenet5_mnist_and_mlp_variants() -> None:
    assert build("lenet5", 10, (1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    caffe = build("lenet5_caffe", 10, (1, 28, 28))
    assert [n for n, _ in caffe.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    assert caffe.fc1.in_features == 50 * 4 * 4  # 28 -> 24 -> 12 -> 8 -> 4
    flat = LeNet5(num_classes=3, input_shape=(1, 28, 28), hidden=[])  # logistic regression on conv features
    assert [n for n, _ in flat.named_children()] == ["conv1", "conv2", "fc1"] and flat.fc1.out_features == 3
    # Empty hidden list is allowed: multinomial logistic regression.
    logreg = MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[])
    assert n_params(logreg) == 64 * 10 + 10
    assert len(logreg.layers) == 0
    assert sum(isinstance(m, nn.Dropout) for m in build("mlp", 10, (1, 8, 8)).modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in build("mlp_small", 10, (1, 8, 8)).modules())


def test_mobilenet_width_mult() -> None:
    half = MobileNetLite(num_classes=10, input_shape=(3, 8, 8), width_mult=0.5)
    assert half.fc.in_features == 64
    assert n_params(half) < n_params(MobileNetLite(num_classes=10, input_shape=(3, 8, 8)))


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = WideResNet(num_classes=5, input_shape=(3, 8, 8), depth=10, widen_factor=1, dropout=0.5)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("resnet20", {"depth": 9}, r"\(depth - 2\) % 6 == 0"),
        ("resnet20", {"depth": 2}, r"depth"),
        ("resnet20", {"width": [16, 32]}, r"width"),
        ("wrn_16_1", {"depth": 15}, r"\(depth - 4\) % 6 == 0"),
        ("wrn_16_1", {"depth": 4}, r"depth"),
        ("wrn_16_1", {"widen_factor": 0}, r"widen_factor"),
        ("wrn_16_1", {"dropout": 1.0}, r"dropout"),
        ("mlp", {"hidden": [256, 0]}, r"hidden"),
        ("mlp", {"dropout": -0.1}, r"dropout"),
        ("mobilenet", {"blocks": []}, r"blocks"),
        ("mobilenet", {"blocks": [[32, 3]]}, r"stride"),
        ("mobilenet", {"width_mult": 0.0}, r"width_mult"),
        ("lenet5", {"channels": [6]}, r"channels must have 2"),
        ("lenet5", {"hidden": [120, 0]}, r"hidden"),
        ("lenet5", {"padding": 3}, r"padding"),
    ],
)
def test_bad_args_raise_value_error(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, num_classes=10, input_shape=(3, 32, 32), **overrides)


def test_bad_common_args_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build("resnet8", num_classes=0, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="input_shape"):
        build("resnet8", num_classes=10, input_shape=(32, 32))
    with pytest.raises(ValueError, match="H, W >= 4"):
        build("lenet5", num_classes=10, input_shape=(1, 3, 3))


@pytest.mark.parametrize(
    ("name", "typo"),
    [("resnet20", "dpeth"), ("wrn_16_2", "widen"), ("mlp", "hiden"), ("mobilenet", "width_mul"), ("lenet5", "dropout")],
)
def test_misspelled_kwarg_raises_type_error(name: str, typo: str) -> None:
    with pytest.raises(TypeError):
        build(name, num_classes=10, input_shape=(3, 32, 32), **{typo: 1})

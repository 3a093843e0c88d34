"""Binary and logarithmic weights: the quantizers' values against hand-computed ones, training
through the straight-through estimator keeps the formats, resume, and a whole run."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import WeightQuantization
from kd.tracking.measure import accuracy
from callbacks.weight_quant import binarize, power_of_two
from kd.run.experiment import run
from kd.models import LeNet5
from tests.compression.pruning_helpers import digits, module, trained_lenet5, trainer, uninterrupted_and_resumed

SHAPE = (1, 8, 8)


def test_binarize_is_sign_times_the_channels_mean_magnitude():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.1, -0.3, 0.2, 0.2]])
    # channel 0: mean|w| = 4.0 / 4 = 1.0; channel 1: 0.8 / 4 = 0.2; sign(0) = +1
    expected = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-0.2, -0.2, 0.2, 0.2]])
    torch.testing.assert_close(binarize(w, per_channel=True), expected)
    torch.testing.assert_close(binarize(w, per_channel=False), torch.where(w >= 0, 0.6, -0.6))  # 4.8 / 8


def test_the_binary_scale_is_the_least_squares_one():
    w = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    best = binarize(w)
    for factor in (0.9, 1.1):
        assert ((w - best) ** 2).sum() < ((w - factor * best) ** 2).sum()


def test_power_of_two_rounds_exponents_in_the_log_domain_and_clips_the_range():
    # bits=3: sign + 2 bits -> 3 exponents and zero. max 1.0 -> top exponent 0: {1, 1/2, 1/4}
    w = torch.tensor([[1.0, -0.7, 0.36, 0.34, 0.18, 0.17, 0.0, -0.2]])
    # 0.7: log2 = -0.51 -> 2^-1; 0.36: -1.47 -> 2^-1; 0.34: -1.56 -> 2^-2; 0.18: -2.47 -> 2^-2;
    # 0.17: -2.56 -> 2^-3, below the three kept exponents -> 0; -0.2: -2.32 -> -2^-2
    expected = torch.tensor([[1.0, -0.5, 0.5, 0.25, 0.25, 0.0, 0.0, -0.25]])
    torch.testing.assert_close(power_of_two(w, bits=3), expected)
    big = torch.tensor([[3.0, 1.0, 0.01]])  # top = round(log2 3) = 2: 3 stays 4, 0.01 -> 0
    torch.testing.assert_close(power_of_two(big, bits=3), torch.tensor([[4.0, 1.0, 0.0]]))


def test_power_of_two_per_channel_has_its_own_full_scale():
    w = torch.tensor([[8.0, 0.5], [0.25, 0.125]])
    torch.testing.assert_close(power_of_two(w, bits=3, per_channel=True), torch.tensor([[8.0, 0.0], [0.25, 0.125]]))
    torch.testing.assert_close(power_of_two(w, bits=3, per_channel=False), torch.tensor([[8.0, 0.0], [0.0, 0.0]]))


def test_gradients_pass_straight_through_to_the_latent_weights():
    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
    cb = WeightQuantization("binary")

    class Host(pl.LightningModule):
        model = layer

    cb.setup(SimpleNamespace(max_epochs=1), Host(), "fit")
    x = torch.tensor([[1.0, 2.0, 3.0]])
    layer(x).sum().backward()
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, x)  # d(x . q(w))/dw = x
    torch.testing.assert_close(layer.weight, torch.tensor([[0.2, -0.2, 0.2]]))


@pytest.fixture(scope="module")
def trained() -> LeNet5:
    from kd.run.experiment import ignore_known_warnings

    ignore_known_warnings()  # a module fixture runs before the per-test autouse filters
    return trained_lenet5()


@pytest.mark.parametrize(("scheme", "bits", "levels"), [("binary", 1, 2), ("log", 4, 15)])
def test_fine_tuning_keeps_the_format_and_the_accuracy(trained, scheme, bits, levels):
    pl.seed_everything(0, verbose=False)
    model = copy.deepcopy(trained).train()
    float_acc = accuracy(trained, digits().test.x, digits().test.y)
    quantized_at_once = copy.deepcopy(trained)
    for m in (quantized_at_once.conv2, quantized_at_once.fc1, quantized_at_once.fc2, quantized_at_once.fc3):
        with torch.no_grad():
            m.weight.copy_(binarize(m.weight) if scheme == "binary" else power_of_two(m.weight, bits))
    cb = WeightQuantization(scheme, bits, skip=["conv1"])
    trainer([cb], max_epochs=2).fit(module(model, lr=0.01), datamodule=digits())
    cb.convert(model, digits())
    assert not hasattr(model.conv2, "parametrizations")  # a plain float model again
    for name in ("conv2", "fc1", "fc2", "fc3"):
        for row in getattr(model, name).weight.detach().flatten(1):
            assert torch.unique(row).numel() <= levels, name
    assert torch.unique(model.conv1.weight).numel() > 100  # skipped: still float
    acc = accuracy(model.eval(), digits().test.x, digits().test.y)
    # fine-tuning recovers what quantizing the trained weights at once loses
    assert acc > float_acc - 0.03 and acc > accuracy(quantized_at_once.eval(), digits().test.x, digits().test.y) + 0.02
    coded = cb.coded_bytes(model)
    quantized = sum(getattr(model, n).weight.numel() for n in ("conv2", "fc1", "fc2", "fc3"))
    floats = sum(p.numel() for p in model.parameters()) - quantized
    scales = sum(getattr(model, n).weight.shape[0] for n in ("conv2", "fc1", "fc2", "fc3")) * (4 if scheme == "binary" else 1)
    assert coded == pytest.approx(quantized * bits / 8 + scales + 4 * floats)


def test_binary_training_resumes_bit_identically(tmp_path):
    full, resumed = uninterrupted_and_resumed(lambda: LeNet5(10, SHAPE), lambda: [WeightQuantization("binary")], tmp_path, 3)
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))


def test_a_log_run_tests_the_quantized_model_and_saves_plain_weights(make_cfg):
    cfg = make_cfg("distill=kd", "quantize=log", "quantize.bits=5", "trainer.max_epochs=4")  # the default MLP student
    metrics = run(cfg)
    assert metrics["quant/bits"] == 5 and metrics["test/acc"] > 0.8
    assert metrics["quant/coded_reduction"] == pytest.approx(4 * metrics["model/params"] / metrics["quant/size_bytes_coded"])
    assert 4 < metrics["quant/coded_reduction"] < 32 / 5
    state = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)["state_dict"]
    assert not any("parametrizations" in k for k in state)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    assert weights
    for w in weights:
        exponents = torch.log2(w[w != 0].abs())
        torch.testing.assert_close(exponents, exponents.round())  # powers of two, as saved


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantize=binary", "quantize.bits=2"], "quantize.bits must be 1 for binary"),
        (["quantize=log", "quantize.bits=9"], r"quantize.bits must lie in \[2, 8\]"),
        (["quantize=log", "quantize.scheme=ternary"], "quantize.scheme must be one of"),
        (["quantize=binary", "prune=magnitude"], "with pruning is not supported"),
        (["quantize=binary", "quantize.skip=[nope]"], "no prunable layer matches 'nope'"),
    ],
)
def test_bad_weight_quantization_config_fails_before_anything_is_written(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception, match=message):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()


def test_log_exponent_count_matches_the_bit_budget():
    w = torch.logspace(-12, 0, 400, base=2).reshape(1, -1)
    for bits in (2, 3, 4):
        values = torch.unique(power_of_two(w, bits).abs())
        assert values.numel() == 2 ** (bits - 1) - 1 + 1, bits  # exponents + zero
        assert math.log2(float(values.max())) == 0


def test_model_selection_waits_for_the_start_epoch(tmp_path):
    from callbacks import SELECTION_KEY

    pl.seed_everything(0, verbose=False)
    cb = WeightQuantization("binary", start=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=SELECTION_KEY, mode="max", filename="{epoch}")
    lit = module(LeNet5(10, SHAPE))
    trainer([cb, checkpoint], 3, enable_checkpointing=True).fit(lit, datamodule=digits())
    assert Path(checkpoint.best_model_path).name == "epoch=2.ckpt"  # epochs 0-1 were float: never selected
    assert lit.model.fc1.parametrizations.weight[0].active

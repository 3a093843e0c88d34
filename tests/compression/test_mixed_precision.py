"""Mixed precision under a budget: the widths chosen are the cheapest that fit (checked against
every combination), the budget is met within one layer's step, the Hutchinson trace is the
Hessian's, both flows' fake-quant graphs train each layer at its width, and a run reports the
widths (metrics, table, plot) and the simulated model's coded size."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from callbacks import QuantizationAwareTraining, fx_quant
from kd.compression import mixed_precision as mp
from kd.models import LeNet5
from kd.run.experiment import run
from tests.compression.pruning_helpers import digits, trained_lenet5

SHAPE = (1, 8, 8)


def _random_problem(seed: int, layers: int = 5) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    g = torch.Generator().manual_seed(seed)
    params = {f"l{i}": int(torch.randint(10, 400, (1,), generator=g)) for i in range(layers)}
    costs = {}
    for name in params:  # a cost that falls as bits grow, as a quantization error does
        steps = torch.rand(len(mp.CANDIDATES), generator=g).tolist()
        costs[name] = {b: sum(steps[i:]) - steps[-1] for i, b in enumerate(mp.CANDIDATES)}
    return costs, params


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [2.0, 2.7, 3.5, 4.5, 6.1, 8.0])
def test_the_chosen_widths_are_the_cheapest_combination_that_fits_and_leave_no_room_for_a_wider_layer(seed, budget):
    costs, params = _random_problem(seed)
    chosen = mp.choose_bits(costs, params, budget)
    capacity = budget * sum(params.values())
    size = sum(params[n] * b for n, b in chosen.items())
    assert size <= capacity + 1e-9
    best = min(sum(costs[n][b] for n, b in zip(params, combo))
               for combo in itertools.product(mp.CANDIDATES, repeat=len(params))
               if sum(params[n] * b for n, b in zip(params, combo)) <= capacity + 1e-9)  # fmt: skip
    assert sum(costs[n][b] for n, b in chosen.items()) == pytest.approx(best, abs=1e-12)
    for name, b in chosen.items():  # within one layer's granularity: no layer's next width still fits
        wider = [c for c in mp.CANDIDATES if c > b]
        if wider:
            assert size + params[name] * (min(wider) - b) > capacity


def test_a_noisy_estimate_that_prefers_fewer_bits_does_not_make_a_layer_narrower_than_the_budget_allows():
    costs = {"a": {2: 1.0, 4: -0.2, 8: 0.0}, "b": {2: 5.0, 4: 0.5, 8: 0.0}}  # 'a' looks better at 4 than at 8: noise
    assert mp.choose_bits(costs, {"a": 100, "b": 100}, 8.0) == {"a": 8, "b": 8}
    assert mp.monotone(costs["a"]) == {8: 0.0, 4: 0.0, 2: 1.0}
    # the sensitive layer gets the bits when only one can have them
    assert mp.choose_bits(costs, {"a": 100, "b": 100}, 6.0) == {"a": 4, "b": 8}


def test_the_budget_and_the_widths_are_checked():
    assert mp.check_budget(4.5, [8, 2, 4]) == (2, 4, 8)
    for budget in (1.99, 8.01, "4", True, None):
        with pytest.raises(ValueError, match="budget_bits must lie in"):
            mp.check_budget(budget, [2, 4])
    for widths in ([1, 4], [2, 9], [4, 4], []):
        with pytest.raises(ValueError, match="bit_choices must be distinct widths in 2..8"):
            mp.check_budget(4, widths)
    with pytest.raises(ValueError, match="below the narrowest"):
        mp.check_budget(3, [4, 8])


def _on_grid(w: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Each output channel of ``w`` rounded to ``scale * (q_min..q_max)``, ``scale = max|w| / ((q_max - q_min) / 2)``
    (torch's symmetric observer), dividing as torch's fake-quant kernel does (times ``1 / scale``: it
    decides a tie at the channel's extreme weight)."""
    scale = w.abs().flatten(1).amax(1) / ((q_max - q_min) / 2)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w * (1 / scale).reshape(shape)), q_min, q_max) * scale.reshape(shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("narrow", [False, True])
def test_a_weight_is_rounded_to_its_channels_symmetric_grid(bits, narrow):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    q = mp.quantize_weight(w, bits, narrow)
    q_max = 2 ** (bits - 1) - 1
    torch.testing.assert_close(q, _on_grid(w, -q_max if narrow else -q_max - 1, q_max))
    assert all(len(row.unique()) <= 2**bits for row in q.flatten(1))


def test_hutchinson_gives_the_trace_of_a_diagonal_hessian_exactly():
    # loss = 1/2 sum_i ||W x_i - y_i||^2 with x_i = d_i e_i: H = I_out (x) diag(d_i^2), Tr = out * sum d_i^2
    d = torch.tensor([0.5, 1.0, 2.0, 3.0])
    x, out = torch.diag(d), 3
    model = nn.Linear(4, out, bias=False)
    loss = lambda m, xb, yb: 0.5 * (m(xb) - yb).pow(2).sum()  # noqa: E731
    traces = mp.hessian_traces(model, {"fc": model}, loss, [(x, torch.randn(4, out))], samples=3)
    assert traces["fc"] == pytest.approx(out * float((d**2).sum()), rel=1e-6)


def test_hutchinson_estimates_the_trace_of_a_small_networks_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    first = model[0]
    estimate = mp.hessian_traces(model, {"0": first}, lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb), [(x, y)], samples=2000)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(x @ w.reshape(4, 5).T + first.bias)
        return nn.functional.cross_entropy(model[2](hidden), y)

    exact = torch.autograd.functional.hessian(loss_of, first.weight.detach().flatten()).diagonal().sum()
    assert estimate["0"] == pytest.approx(float(exact), rel=0.1)


def test_the_measured_sensitivity_is_the_loss_of_each_layer_quantized_alone_and_the_weights_come_back():
    model = trained_lenet5()
    data = digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"conv2": model.conv2, "fc1": model.fc1}
    loss = lambda m: float(nn.functional.cross_entropy(m(data.val.x), data.val.y).detach())  # noqa: E731
    costs = mp.measured_sensitivity(model, layers, loss, (2, 8))
    torch.testing.assert_close(model.state_dict(), before)
    base = loss(model)
    for name, layer in layers.items():
        copy = LeNet5(10, SHAPE)
        copy.load_state_dict(before)
        with torch.no_grad():
            getattr(copy, name).weight.copy_(_on_grid(getattr(copy, name).weight, -2, 1))  # 2 bits: integers -2..1
        assert costs[name][2] == pytest.approx(loss(copy.eval()) - base, abs=1e-6)
    assert costs["conv2"][8] < costs["conv2"][2] and costs["fc1"][8] < costs["fc1"][2]


def test_hawq_sensitivity_is_the_trace_per_weight_times_the_squared_error():
    layer = nn.Linear(6, 4)
    costs = mp.hessian_sensitivity({"fc": layer}, {"fc": 12.0}, (2, 4))
    for b in (2, 4):
        error = (mp.quantize_weight(layer.weight.detach(), b) - layer.weight.detach()).pow(2).sum()
        assert costs["fc"][b] == pytest.approx(12.0 / 24 * float(error))


def _widths(n: int) -> list[int]:
    return [[2, 3, 4, 6, 8][i % 5] for i in range(n)]


@pytest.mark.parametrize("engine", ["pt2e", "fx"])
def test_each_layer_of_the_fake_quant_graph_trains_at_its_own_width(engine):
    from callbacks import pt2e_quant

    model = LeNet5(10, SHAPE)
    names = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    layer_bits = dict(zip(names, _widths(5)))
    recipe = {"mode": "qat", "engine": engine, "backend": "x86", "per_channel": True, "bits": 8, "activation_bits": 8, "layer_bits": layer_bits}
    example = torch.randn(4, *SHAPE)
    flow = pt2e_quant if engine == "pt2e" else fx_quant
    prepared = flow.prepare_for_qat(model, recipe, example)
    prepared(example)
    signed = {name: (m.quant_min, m.quant_max) for name, m in prepared.named_modules()
              if type(m).__name__.endswith("FakeQuantize") and m.quant_min < 0}  # fmt: skip: the weights' (activations are unsigned)
    expected = [(-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in layer_bits.values()]
    if engine == "fx":
        assert [signed[f"{n}.weight_fake_quant"] for n in names] == expected
    else:  # the captured graph has no layer modules: its weight fake-quants come in the layers' order
        assert list(signed.values()) == expected
    activations = {(m.quant_min, m.quant_max) for m in prepared.modules() if type(m).__name__.endswith("FakeQuantize") and m.quant_min >= 0}
    assert activations == {(0, 255)}


@pytest.mark.parametrize("sensitivity", ["measured", "hessian"])
def test_a_run_with_a_budget_reports_its_widths_and_trains_at_them(make_cfg, sensitivity):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=qat", "quantize.budget_bits=3.5", "trainer.max_epochs=2",
                   "quantize.finetune_epochs=1", f"quantize.sensitivity={sensitivity}")  # fmt: skip
    metrics = run(cfg)
    widths = {k.rsplit("/", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("quant/layer_bits/")}
    assert set(widths) == {"conv1", "conv2", "fc1", "fc2", "fc3"} and set(widths.values()) <= set(mp.CANDIDATES)
    model = LeNet5(10, SHAPE)
    params = {n: getattr(model, n).weight.numel() for n in widths}
    average = sum(params[n] * b for n, b in widths.items()) / sum(params.values())
    assert metrics["quant/weight_bits_avg"] == pytest.approx(average) and average <= 3.5
    assert metrics["quant/qat_finetune_epochs"] == 1.0 and "quant/test_acc" not in metrics  # below 8 bits: no int8 model
    # the coded size: each layer's weights at their width, a 32-bit scale per output channel, the rest at 32 bits
    total = sum(p.numel() for p in model.parameters())
    scales = sum(getattr(model, n).weight.shape[0] for n in widths)
    coded = (sum(params[n] * b for n, b in widths.items()) + 32 * (total - sum(params.values()) + scales)) / 8
    assert metrics["quant/size_bytes_coded"] == pytest.approx(coded)
    run_dir = Path(cfg.paths.run_dir)
    rows = list(csv.DictReader((run_dir / "mixed_precision.csv").open()))
    assert {r["layer"]: int(r["bits"]) for r in rows} == widths
    assert (run_dir / "mixed_precision.png").stat().st_size > 0
    saved = torch.load(run_dir / "student.pt", weights_only=True)["kd.quantization"]
    assert saved["layer_bits"] == widths and saved["budget_bits"] == 3.5
    assert not math.isnan(metrics["test/acc"]) and metrics["test/acc"] > 0.5


def test_a_budget_of_one_width_is_uniform_precision_and_eight_bits_converts_to_int8():
    uniform = QuantizationAwareTraining(budget_bits=4, bit_choices=[4])
    uniform.backend = "x86"
    uniform.layer_bits = uniform.choose_widths(trained_lenet5(), digits())
    assert set(uniform.layer_bits.values()) == {4} and not uniform.converts
    full = QuantizationAwareTraining(budget_bits=8)
    full.layer_bits = full.choose_widths(trained_lenet5(), digits())
    assert set(full.layer_bits.values()) == {8} and full.converts

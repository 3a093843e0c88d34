"""Per-layer weight bits under a size budget (``quantize=qat quantize.budget_bits=4.5``).

Each quantizable layer ``l`` (convolution or linear, ``n_l`` weights) gets a width ``b_l`` from the
candidates (2, 3, 4, 6, 8 by default) so that the average width over those weights,
``sum_l n_l b_l / sum_l n_l``, is at most the budget, choosing the widths that cost least by a
sensitivity estimate ``Omega_l(b)``:

- ``measured``: the validation loss of the float model with layer ``l`` alone quantized to ``b``
  bits, minus the float model's (the seed survey's per-layer sensitivity analysis, as for pruning
  in ``kd/compression/sensitivity.py``).
- ``hessian``: HAWQ-v2 (Dong et al., NeurIPS 2020): ``Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2``,
  with the trace of the loss Hessian of the layer's weights estimated by Hutchinson's method,
  ``Tr(H) = E[v^T H v]`` over Rademacher vectors ``v``, ``H v`` by differentiating ``g . v`` again.

Choosing the widths is a multiple-choice knapsack; :func:`choose_bits` solves it exactly by
merging the layers' (size, cost) options and keeping only the non-dominated pairs. A layer's
cost is made non-increasing in bits first (a noisy estimate may say 6 bits hurt more than 4); a
wider layer then costs nothing more, so layers are widened while the budget allows and the unused
budget is less than any layer's next step up (the budget is met within one layer's granularity).

``Q_b`` here is the symmetric per-output-channel grid the QAT flows train on
(:func:`quantize_weight`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from kd.tracking.figures import new_figure, save_figure

CANDIDATES = (2, 3, 4, 6, 8)
SENSITIVITIES = ("measured", "hessian")


def check_budget(budget: float, candidates: Sequence[int]) -> tuple[int, ...]:
    """The sorted candidate widths, after refusing a budget outside [2, 8], widths outside 2..8,
    and a budget below every candidate (no choice of widths would meet it)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 2 <= budget <= 8:
        raise ValueError(f"quantize.budget_bits must lie in [2, 8] (average bits per weight), got {budget!r}")
    widths = tuple(sorted(set(int(b) for b in candidates)))
    if not widths or any(not 2 <= b <= 8 for b in widths) or len(widths) != len(candidates):
        raise ValueError(f"quantize.bit_choices must be distinct widths in 2..8, got {list(candidates)}")
    if widths[0] > budget:
        raise ValueError(f"quantize.budget_bits={budget} is below the narrowest of quantize.bit_choices {list(widths)}: no choice meets it")
    return widths


def quantize_weight(w: Tensor, bits: int, narrow: bool = False) -> Tensor:
    """``w`` on the per-output-channel symmetric grid of ``bits`` bits that the QAT flows train
    on: integers ``-2**(b-1) .. 2**(b-1) - 1`` (``narrow``: from ``-(2**(b-1) - 1)``, XNNPACK's),
    scale ``max|w| / ((q_max - q_min) / 2)``, as torch's symmetric observers set it."""
    q_max = 2 ** (bits - 1) - 1
    q_min = -q_max if narrow else -q_max - 1
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / ((q_max - q_min) / 2)).float()
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, q_min, q_max)


@torch.no_grad()
def measured_sensitivity(
    model: nn.Module, layers: Mapping[str, nn.Module], loss: Callable[[nn.Module], float], candidates: Sequence[int],
    narrow: bool = False,
) -> dict[str, dict[int, float]]:  # fmt: skip
    """``{layer: {bits: validation loss increase}}``: each layer alone quantized, the rest float;
    the weights are restored afterwards."""
    base = loss(model)
    costs: dict[str, dict[int, float]] = {}
    for name, module in layers.items():
        original = module.weight.detach().clone()
        costs[name] = {}
        for bits in candidates:
            module.weight.copy_(quantize_weight(original, bits, narrow))
            costs[name][bits] = loss(model) - base
            module.weight.copy_(original)
    return costs


def hessian_traces(
    model: nn.Module, layers: Mapping[str, nn.Module], loss: Callable[[nn.Module, Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]], samples: int = 8, seed: int = 0,
) -> dict[str, float]:  # fmt: skip
    """``{layer: Tr(H)}`` of the loss Hessian of each layer's weights (Hutchinson: ``samples``
    Rademacher vectors per batch, averaged over the batches)."""
    generator = torch.Generator().manual_seed(seed)
    weights = [m.weight for m in layers.values()]
    totals, count = [0.0] * len(weights), 0
    was_training = model.training
    model.eval()
    for x, y in batches:
        grads = torch.autograd.grad(loss(model, x, y), weights, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
            hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
            for i, (hv, v) in enumerate(zip(hvs, vs)):
                totals[i] += float((hv * v).sum())
            count += 1
    model.train(was_training)
    return {name: total / max(count, 1) for name, total in zip(layers, totals)}


@torch.no_grad()
def hessian_sensitivity(
    layers: Mapping[str, nn.Module], traces: Mapping[str, float], candidates: Sequence[int], narrow: bool = False
) -> dict[str, dict[int, float]]:  # fmt: skip
    """HAWQ-v2's ``Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` for every layer and width."""
    costs = {}
    for name, module in layers.items():
        w = module.weight.detach()
        costs[name] = {b: traces[name] / w.numel() * float((quantize_weight(w, b, narrow) - w).pow(2).sum()) for b in candidates}
    return costs


def monotone(cost: Mapping[int, float]) -> dict[int, float]:
    """``cost`` made non-increasing in bits: a width costs at least what any wider one does."""
    out, running = {}, float("-inf")
    for bits in sorted(cost, reverse=True):
        running = max(running, cost[bits])
        out[bits] = running
    return out


def choose_bits(costs: Mapping[str, Mapping[int, float]], params: Mapping[str, int], budget: float) -> dict[str, int]:
    """The widths minimising the summed (monotone) cost with ``sum n_l b_l <= budget * sum n_l``.
    Exact: a multiple-choice knapsack solved by merging the layers' options and keeping the
    non-dominated (size, cost) pairs. Then, as a cost that does not increase with bits makes a
    wider layer free, layers are widened while the budget allows: no layer's next width fits in
    what is left."""
    capacity = budget * sum(params[name] for name in costs)
    cost = {name: monotone(costs[name]) for name in costs}
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]  # (size in bits, cost, widths so far)
    for name in costs:
        merged = sorted((s + params[name] * b, c + cost[name][b], chosen + (b,)) for s, c, chosen in front for b in cost[name])
        front = []
        for option in merged:  # by size: an option is kept only if it is cheaper than every smaller one
            if option[0] > capacity + 1e-9:
                break
            if not front or option[1] < front[-1][1]:
                front.append(option)
    if not front or len(front[-1][2]) != len(costs):
        raise ValueError(f"no choice of widths meets budget_bits={budget}")
    bits = dict(zip(costs, min(front, key=lambda t: t[1])[2]))
    size = sum(params[n] * b for n, b in bits.items())
    widened = True
    while widened:  # the costliest layers first
        widened = False
        for name in sorted(bits, key=lambda n: -cost[n][bits[n]]):
            wider = [b for b in cost[name] if b > bits[name]]
            if wider and size + params[name] * (min(wider) - bits[name]) <= capacity + 1e-9:
                size += params[name] * (min(wider) - bits[name])
                bits[name], widened = min(wider), True
    return bits


def average_bits(bits: Mapping[str, int], params: Mapping[str, int]) -> float:
    return sum(params[n] * b for n, b in bits.items()) / sum(params[n] for n in bits)


def write_table(path: Path, bits: Mapping[str, int], params: Mapping[str, int], costs: Mapping[str, Mapping[int, float]]) -> Path:
    """``layer, params, bits, cost@<b>...``: the chosen widths and the estimate they came from."""
    widths = sorted(next(iter(costs.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "params", "bits", *(f"cost@{b}" for b in widths)])
        for name, b in bits.items():
            writer.writerow([name, params[name], b, *(f"{costs[name][w]:.6g}" for w in widths)])
    return path


def plot(path: Path, bits: Mapping[str, int], params: Mapping[str, int], budget: float, sensitivity: str) -> Path:
    """The chosen width of each layer (bars, annotated with its weight count) against the budget."""
    names = list(bits)
    fig, ax = new_figure((max(5.0, 0.6 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), [bits[n] for n in names], color="tab:blue")
    for bar, name in zip(bars, names):
        ax.annotate(f"{params[name]:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget:g} bits")
    ax.axhline(average_bits(bits, params), color="grey", linestyle=":", linewidth=1, label=f"average {average_bits(bits, params):.3g} bits")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 9)
    ax.set_ylabel("weight bits (label: weights in the layer)")
    ax.set_title(f"mixed precision ({sensitivity} sensitivity)")
    return save_figure(fig, ax, path, grid=False)

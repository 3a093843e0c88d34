"""Low-rank factorisation of linear and convolution layers by truncated SVD.

A weight matrix ``W`` (m, n) has the SVD ``W = U S V^T``; keeping the ``r`` largest singular
values gives ``W_r = U_r S_r V_r^T``, the best rank-``r`` approximation in Frobenius norm
(Eckart-Young), with relative error ``||W - W_r||_F / ||W||_F = sqrt(sum_{i>r} s_i^2 / sum s_i^2)``.
Splitting ``sqrt(S_r)`` between the factors turns one layer of ``m n`` weights into two of
``r (m + n)``: a saving whenever ``r < m n / (m + n)``.

Convolutions (Denton et al. 2014, "Exploiting Linear Structure Within Convolutional Networks
for Efficient Evaluation"; Jaderberg, Vedaldi & Zisserman 2014, "Speeding up Convolutional
Neural Networks with Low Rank Expansions") have two decompositions here:

* ``channel``: ``W`` (Cout, Cin, kh, kw) as a (Cout, Cin kh kw) matrix, giving a kh x kw conv to
  ``r`` channels followed by a 1x1 conv to Cout; params ``r (Cin kh kw + Cout)``.
* ``spatial`` (Jaderberg's scheme 2): ``W`` as the (Cin kh, Cout kw) matrix ``M[(c, h), (o, w)]``,
  giving a vertical kh x 1 conv to ``r`` channels followed by a horizontal 1 x kw conv to Cout;
  params ``r (Cin kh + Cout kw)``. The SVD of ``M`` is the closed-form optimum of the weight
  reconstruction problem that Jaderberg et al. solve iteratively (Tai et al. 2016, ICLR).

The rank is either fixed or the smallest ``r`` keeping a fraction ``energy`` of ``sum s_i^2``.

A factorised model is a different architecture: each replaced layer becomes an
``nn.Sequential`` of two layers, so its ``student.pt`` state dict has keys such as
``fc1.0.weight`` / ``fc1.1.weight``. Reloading it needs the factorisation replayed onto a fresh
model first: :meth:`LowRank.apply_ranks` with the dict from :meth:`LowRank.ranks` (store it beside
the state dict, as the stage does under :data:`FACTORIZED_KEY`) rebuilds those layers with
random weights, and ``load_state_dict`` fills them (``kd.train.checkpoint.load_weights`` does both).

In a run (``factorize=svd``, the compression stage ``callbacks.LowRankFactorization``) the
validation-selected model is tested, measured (``dense/*``), factorised
(``factorize/test_acc_truncated``: before any fine-tuning), fine-tuned for ``finetune_epochs`` at
``lr_scale`` times the learning rate with the run's objective (the teacher's soft targets too),
then tested and measured again (``test/acc``, ``model/*``, and ``factorize/*`` ratios);
``factorization.csv`` lists every layer.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd.compression.layers import check_fraction, select_layers
from kd.tracking.measure import count_params

FACTORIZED_KEY = "kd.factorized"  # beside the state dict in student.pt: LowRank.ranks(rows)
CONV_SCHEMES = ("channel", "spatial", "none")
KINDS = ("linear", "conv-channel", "conv-spatial")
COLUMNS = ("layer", "kind", "shape", "rank", "full_rank", "energy", "params_before", "params_after",
           "rel_error", "factorized", "reason")


def choose_rank(singular_values: Tensor, rank: int | None, energy: float | None) -> int:
    """The rank to keep: ``min(rank, len(s))``, or the smallest ``r`` with
    ``sum(s[:r]^2) / sum(s^2) >= energy``; at least 1. Exactly one of ``rank``/``energy`` is set."""
    if (rank is None) == (energy is None):
        raise ValueError(f"exactly one of rank and energy must be set, got rank={rank!r}, energy={energy!r}")
    n = len(singular_values)
    if rank is not None:
        return max(1, min(int(rank), n))
    power = singular_values.detach().double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    if energy >= 1.0:
        return n
    kept = torch.cumsum(power, 0) / total
    # a cumulative fraction equal to ``energy`` up to rounding counts as reaching it
    return max(1, min(n, int((kept < energy - 1e-12).sum()) + 1))


def _unsupported(layer: nn.Module, kind: str) -> str:
    """Why ``layer`` cannot be factorised as ``kind`` ("" when it can)."""
    if kind == "linear":
        return "" if isinstance(layer, nn.Linear) else f"{type(layer).__name__} is not nn.Linear"
    if type(layer) is not nn.Conv2d:
        return f"{type(layer).__name__} is not factorised (only Linear and Conv2d)"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    if kind == "conv-spatial" and isinstance(layer.padding, str):
        return f"spatial scheme needs numeric padding, got padding={layer.padding!r}"
    if kind == "conv-spatial" and layer.padding_mode != "zeros":
        return f"spatial scheme needs padding_mode='zeros', got {layer.padding_mode!r}"
    return ""


def _matrix(layer: nn.Module, kind: str) -> Tensor:
    """The float64 matrix whose SVD factorises ``layer``."""
    w = layer.weight.detach().double()
    if kind == "conv-spatial":
        o, c, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(c * kh, o * kw)  # (O, C, kh, kw) -> (C, kh, O, kw) -> (C*kh, O*kw)
    return w.reshape(w.shape[0], -1)  # (out, in) or (out, in, kh, kw) -> (out, in*kh*kw)


def _shell(layer: nn.Module, kind: str, rank: int) -> nn.Sequential:
    """The two-layer replacement of ``layer`` with randomly initialised weights."""
    like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if kind == "linear":
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False, **like),
                             nn.Linear(rank, layer.out_features, bias=bias, **like))
    if kind == "conv-channel":
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode, **like)
        return nn.Sequential(first, nn.Conv2d(rank, layer.out_channels, 1, bias=bias, **like))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    vertical = nn.Conv2d(layer.in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **like)
    horizontal = nn.Conv2d(rank, layer.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias, **like)
    return nn.Sequential(vertical, horizontal)


def _decompose(layer: nn.Module, kind: str, rank: int | None, energy: float | None) -> tuple[nn.Sequential, dict]:
    """The factorised replacement of ``layer`` and its statistics (rank, full rank, energy, error)."""
    reason = _unsupported(layer, kind)
    if reason:
        raise ValueError(f"cannot factorise as {kind}: {reason}")
    matrix = _matrix(layer, kind)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    a, b = u[:, :r] * root, root[:, None] * vh[:r]  # (m, r), (r, n): W_r = a @ b
    seq = _shell(layer, kind, r)
    first, second = seq
    with torch.no_grad():  # copy_ casts back from float64 to the layer's dtype
        if kind == "conv-spatial":
            c, kh, o, kw = layer.in_channels, layer.kernel_size[0], layer.out_channels, layer.kernel_size[1]
            first.weight.copy_(a.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1))  # (C*kh, r) -> (r, C, kh, 1)
            second.weight.copy_(b.reshape(r, o, kw).permute(1, 0, 2).unsqueeze(2))  # (r, O*kw) -> (O, r, 1, kw)
        else:
            first.weight.copy_(b.reshape(first.weight.shape))  # (r, in*kh*kw) -> (r, in[, kh, kw])
            second.weight.copy_(a.reshape(second.weight.shape))  # (out, r) -> (out, r[, 1, 1])
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    power = s**2
    norm = torch.linalg.norm(matrix)
    stats = {
        "rank": r,
        "full_rank": len(s),
        "energy": float(power[:r].sum() / power.sum()) if norm > 0 else 1.0,
        "rel_error": float(torch.linalg.norm(matrix - a @ b) / norm) if norm > 0 else 0.0,
    }
    return seq, stats


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Linear(in, r, bias=False)``, ``Linear(r, out)`` with weights
    ``sqrt(S_r) V_r^T`` and ``U_r sqrt(S_r)``; bias, dtype and device kept."""
    return _decompose(layer, "linear", rank, None)[0]


def factorize_conv(layer: nn.Conv2d, rank: int, scheme: str) -> nn.Sequential:
    """A Conv2d as two convolutions of rank ``rank`` (``scheme``: "channel" or "spatial", see the
    module docstring). Raises ValueError for grouped convs, and for string padding or a padding
    mode other than zeros under the spatial scheme."""
    if scheme not in ("channel", "spatial"):
        raise ValueError(f"scheme must be one of ('channel', 'spatial'), got {scheme!r}")
    return _decompose(layer, f"conv-{scheme}", rank, None)[0]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class LowRank:
    """Truncated-SVD factorisation of a model's linear and Conv2d layers (``conf/factorize/``).

    Args:
        rank: Fixed rank of every factorised layer (>= 1); set ``energy=None`` to use it.
        energy: Fraction of ``sum s^2`` each layer keeps, in (0, 1].
        conv: "channel", "spatial" or "none" (convolutions left alone).
        layers: fnmatch patterns of layer names to factorise; None for all.
        skip: fnmatch patterns of layer names to leave alone.
        finetune_epochs: Epochs of fine-tuning after the factorisation (>= 0).
        lr_scale: Factor on the learning rate while fine-tuning (> 0).
        min_saving: Least fraction of a layer's parameters the factorisation must save, in [0, 1).

    Raises:
        ValueError: If an argument is out of range, or not exactly one of rank/energy is set.
    """

    def __init__(self, rank: int | None = None, energy: float | None = 0.9, conv: str = "channel",
                 layers: list[str] | None = None, skip: Sequence[str] = (), finetune_epochs: int = 5,
                 lr_scale: float = 0.1, min_saving: float = 0.0) -> None:
        if (rank is None) == (energy is None):
            raise ValueError(f"exactly one of factorize.rank and factorize.energy must be set (the other null), "
                             f"got factorize.rank={rank!r}, factorize.energy={energy!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"factorize.rank must be an integer >= 1, got {rank!r}")
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                                   or not 0.0 < energy <= 1.0):
            raise ValueError(f"factorize.energy must be a fraction in (0, 1], got {energy!r}")
        if conv not in CONV_SCHEMES:
            raise ValueError(f"factorize.conv must be one of {CONV_SCHEMES}, got {conv!r}")
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise ValueError(f"factorize.finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"factorize.lr_scale must be > 0, got {lr_scale!r}")
        self.rank, self.energy, self.conv = rank, None if energy is None else float(energy), conv
        self.layers = None if layers is None else [str(p) for p in layers]
        self.skip = [str(p) for p in skip]
        self.finetune_epochs, self.lr_scale = finetune_epochs, float(lr_scale)
        self.min_saving = check_fraction("factorize.min_saving", min_saving)

    def describe(self) -> str:
        """Short label, e.g. ``"svd energy=0.9"`` or ``"svd rank=8 conv=spatial"``."""
        label = f"svd rank={self.rank}" if self.rank is not None else f"svd energy={self.energy:g}"
        return label if self.conv == "channel" else f"{label} conv={self.conv}"

    def apply(self, model: nn.Module) -> list[dict[str, Any]]:
        """Factorise the chosen layers of ``model`` in place.

        Returns:
            One row per chosen layer with the keys of :data:`COLUMNS`; ``rank``, ``full_rank``,
            ``energy`` and ``rel_error`` are None for layers never decomposed.

        Raises:
            ValueError: If a pattern matches no layer, or no layer is factorised at all.
        """
        rows = []
        for name, layer in select_layers(model, self.layers, self.skip).items():
            kind = "linear" if isinstance(layer, nn.Linear) else f"conv-{self.conv}"
            before = count_params(layer)
            row = {"layer": name, "kind": kind, "shape": str(tuple(layer.weight.shape)), "rank": None,
                   "full_rank": None, "energy": None, "params_before": before, "params_after": before,
                   "rel_error": None, "factorized": False, "reason": ""}
            rows.append(row)
            if kind == "conv-none":
                row["reason"] = "factorize.conv='none' leaves convolutions alone"
                continue
            row["reason"] = _unsupported(layer, kind) or ("" if name else "the model itself cannot be replaced")
            if row["reason"]:
                continue
            seq, stats = _decompose(layer, kind, self.rank, self.energy)
            row.update(stats)
            after = count_params(seq)
            if after >= before:
                row["reason"] = f"rank {stats['rank']} saves no parameters ({after} >= {before})"
            elif after > (1.0 - self.min_saving) * before:
                row["reason"] = f"saves {1 - after / before:.1%} < factorize.min_saving={self.min_saving}"
            else:
                _replace(model, name, seq)
                row.update(params_after=after, factorized=True)
        if not any(row["factorized"] for row in rows):
            reasons = "; ".join(f"{row['layer']}: {row['reason']}" for row in rows)
            raise ValueError(f"{self.describe()} factorised no layer ({reasons})")
        return rows

    @staticmethod
    def ranks(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``{layer: {"kind": kind, "rank": r}}`` of the factorised rows of :meth:`apply`: the
        recipe :meth:`apply_ranks` replays (store it beside the state dict)."""
        return {row["layer"]: {"kind": row["kind"], "rank": int(row["rank"])} for row in rows if row["factorized"]}

    @staticmethod
    def apply_ranks(model: nn.Module, ranks: dict[str, dict[str, Any]]) -> None:
        """Rebuild the factorised architecture in place from :meth:`ranks`'s dict, with random
        weights, so that a factorised model's state dict loads onto ``model``."""
        modules = dict(model.named_modules())
        for name, entry in ranks.items():
            kind, rank = entry["kind"], int(entry["rank"])
            if name not in modules or not name:
                raise ValueError(f"cannot factorise {name!r}: no such layer in {type(model).__name__}")
            if kind not in KINDS or rank < 1:
                raise ValueError(f"{name}: kind must be one of {KINDS} and rank >= 1, got {entry!r}")
            reason = _unsupported(modules[name], kind)
            if reason:
                raise ValueError(f"cannot factorise {name!r} as {kind}: {reason}")
            _replace(model, name, _shell(modules[name], kind, rank))

    @staticmethod
    def write_report(rows: Sequence[dict[str, Any]], path: Path) -> Path:
        """Write the rows of :meth:`apply` as CSV (columns :data:`COLUMNS`); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return path

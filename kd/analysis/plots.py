"""The report's figures, drawn from the rows and summary of ``kd.analysis.report``: the temperature x
alpha heatmap, accuracy against size with the Pareto front, and training curves."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

# the x axes of the trade-off plot: (column, label, scale)
SIZES = [("nonzero_params", "non-zero parameters", 1.0), ("size_bytes_zip", "size on disk, zipped (KiB)", 1 / 1024),
         ("latency_ms_b256", "CPU latency at batch 256 (ms)", 1.0)]  # fmt: skip


def _pct(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if "acc" in metric else f"{value:g}"


def heatmap(rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str, experiment: str, path: Path) -> Path | None:
    """Mean ``metric`` over seeds on a temperature x alpha grid, for the soft-target objective
    with the most finished runs; None (nothing drawn) unless it has >= 2 temperatures or alphas."""
    kd = [s for s in summary if s["temperature"] is not None and s["alpha"] is not None]
    if not kd:
        return None
    objective = max({s["objective"] for s in kd}, key=lambda o: sum(s["n"] for s in kd if s["objective"] == o))
    cells = {(s["temperature"], s["alpha"]): s["mean"] for s in kd if s["objective"] == objective}
    temps, alphas = sorted({t for t, _ in cells}), sorted({a for _, a in cells})
    if len(temps) < 2 and len(alphas) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scale = 100.0 if "acc" in metric else 1.0
    grid = np.full((len(alphas), len(temps)), np.nan)
    for (t, a), mean in cells.items():
        grid[alphas.index(a), temps.index(t)] = mean * scale
    fig, ax = plt.subplots(figsize=(1.4 * len(temps) + 3, 1.0 * len(alphas) + 2.5))
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap="viridis", aspect="auto")
    for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
        dark = image.norm(grid[i, j]) < 0.6  # viridis: light text on the dark (low) end
        ax.text(j, i, f"{grid[i, j]:.2f}" + ("%" if scale == 100.0 else ""), ha="center", va="center", color="w" if dark else "k")
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha (weight of the soft term)")
    fig.colorbar(image, ax=ax).set_label(f"{metric}" + (" (%)" if scale == 100.0 else ""))
    finished = [r for r in rows if r["status"] == "FINISHED"]
    teacher = [r["teacher/test_acc"] for r in finished if r.get("teacher/test_acc") is not None]
    baseline = [r[metric] for r in finished if r["objective"] == "ce" and r.get(metric) is not None]
    refs = ([f"teacher test acc {statistics.fmean(teacher):.2%}"] if teacher else []) + (
        [f"no-teacher baseline (ce) {_pct(statistics.fmean(baseline), metric)}"] if baseline else [])  # fmt: skip
    title = f"{experiment}: mean {metric} over seeds ({objective})"
    ax.set_title(title + ("\n" + ", ".join(refs) if refs else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller x, larger y)."""
    return [
        i for i, (x, y) in enumerate(points)
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)
    ]  # fmt: skip


def tradeoff(rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str, experiment: str, path: Path) -> Path | None:
    """``metric`` against size, one panel per measure of ``SIZES``, a point per config (mean over
    seeds), the Pareto front joined; the teacher as a reference line. None unless at least two
    configs differ in non-zero parameters."""
    sized = [s for s in summary if s.get("nonzero_params") is not None]
    if len({s["nonzero_params"] for s in sized}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    scale = 100.0 if "acc" in metric else 1.0
    panels = [(k, label, f) for k, label, f in SIZES if sum(s.get(k) is not None for s in sized) >= 2]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    teacher = [r["teacher/test_acc"] for r in rows if r["status"] == "FINISHED" and r.get("teacher/test_acc") is not None]
    for ax, (key, label, factor) in zip(axes[0], panels):
        here = [s for s in sized if s.get(key) is not None]
        points = [(s[key] * factor, s["mean"] * scale) for s in here]
        front = sorted(pareto(points), key=lambda i: points[i][0])
        for s, (x, y) in zip(here, points):
            ax.errorbar(x, y, yerr=s["std"] * scale, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=2, markersize=4)
            ax.annotate(_label(s), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="tab:red", label="Pareto front")
        if teacher and "acc" in metric and key != "latency_ms_b256":
            ax.axhline(statistics.fmean(teacher) * scale, color="tab:green", linestyle="--", linewidth=1, label="teacher")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))  # minor labels collide on short ranges
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{experiment}: {metric} vs size (mean over seeds, error bars: std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(client: MlflowClient, rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str,
           experiment: str, path: Path, key: str = "val/acc", top: int = 8) -> Path | None:  # fmt: skip
    """Per-epoch ``key`` of the ``top`` configs by ``metric`` (mean over seeds at each epoch,
    shaded min-max), overlaid; None when no run has a history of ``key``."""
    ranked = sorted(summary, key=lambda s: s["mean"], reverse=True)[:top]
    series = []
    for s in ranked:
        members = [r for r in rows if r["status"] == "FINISHED" and (r["objective"], r.get("compression", "none"),
                   r["temperature"], r["alpha"]) == (s["objective"], s["compression"], s["temperature"], s["alpha"])]  # fmt: skip
        histories = [sorted(client.get_metric_history(r["run_id"], key), key=lambda m: m.step) for r in members]
        histories = [h for h in histories if h]
        if histories:
            n = min(len(h) for h in histories)
            per_epoch = [[h[i].value for h in histories] for i in range(n)]
            series.append((s, per_epoch))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if "acc" in key else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s, per_epoch in series:
        epochs = range(1, len(per_epoch) + 1)
        label = _label(s) + (f" T={s['temperature']:g} a={s['alpha']:g}" if s["temperature"] is not None else "")
        line, = ax.plot(epochs, [scale * statistics.fmean(v) for v in per_epoch], label=f"{label} (n={s['n']})")
        if s["n"] > 1:
            ax.fill_between(epochs, [scale * min(v) for v in per_epoch], [scale * max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(key + (" (%)" if scale == 100.0 else ""))
    ax.set_title(f"{experiment}: {key} per epoch, top {len(series)} configs by {metric} (mean over seeds, band: min-max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(s: dict[str, Any]) -> str:
    what = s["compression"] if s.get("compression", "none") != "none" else "dense"
    return f"{s['objective']} {what}" if s["objective"] != "ce" else what

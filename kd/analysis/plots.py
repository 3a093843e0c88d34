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
    families: dict[str, list[dict[str, Any]]] = {}  # configs equal but for T and alpha: one grid, never two runs per cell
    for s in kd:
        families.setdefault(_family(s), []).append(s)
    family = max(families.values(), key=lambda f: (len(f), sum(s["n"] for s in f)))
    objective = family[0]["objective"]
    cells = {(s["temperature"], s["alpha"]): s["mean"] for s in family}
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
    teachers = _teachers(family)
    baseline = [s["mean"] for s in summary if s["objective"] == "ce"]
    refs = [f"teacher {fp[:8]} test acc {acc:.2%}" for fp, acc in teachers.items()] + (
        [f"{BASELINE} {_pct(max(baseline), metric)}" + (" (best of several)" if len(baseline) > 1 else "")] if baseline else [])  # fmt: skip
    title = f"{experiment}: mean {metric} over seeds ({objective})"
    ax.set_title(title + ("\n" + ", ".join(refs) if refs else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _family(s: dict[str, Any]) -> str:
    config = {k: config_value(s["config"], k) for k in s.get("config", {}) if k not in ("distill.temperature", "distill.alpha")}
    return repr(sorted(config.items())) + s["objective"]


def _teachers(summary: list[dict[str, Any]]) -> dict[str, float]:
    """Each teacher of these groups (fingerprint) and its test accuracy: a reference per teacher."""
    return {s["teacher"]: s["teacher/test_acc"] for s in summary if s.get("teacher") and s.get("teacher/test_acc") is not None}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller x, larger y)."""
    return [
        i for i, (x, y) in enumerate(points)
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)
    ]  # fmt: skip


def tradeoff(rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str, experiment: str, path: Path,
             labels: dict[str, str] | None = None) -> Path | None:  # fmt: skip
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
    teachers = _teachers(summary)
    number = {id(s): i + 1 for i, s in enumerate(sized)}  # each config a number: labels never overprint
    names = [f"{number[id(s)]}: {(labels or {}).get(s.get('group', ''), _label(s))} (n={s['n']})" for s in sized]
    top = 100.0 if "acc" in metric else float("inf")
    for ax, (key, label, factor) in zip(axes[0], panels):
        here = [s for s in sized if s.get(key) is not None]
        points = [(s[key] * factor, s["mean"] * scale) for s in here]
        front = sorted(pareto(points), key=lambda i: points[i][0])
        for s, (x, y) in zip(here, points):
            spread = s["std"] * scale
            bounds = [[min(spread, y)], [min(spread, top - y)]]  # an accuracy stays within [0, 100]
            ax.errorbar(x, y, yerr=bounds, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=2, markersize=4)
            ax.annotate(str(number[id(s)]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="tab:red", label="Pareto front")
        if "acc" in metric and key != "latency_ms_b256":
            for (fp, acc), style in zip(teachers.items(), ("--", ":", "-.", (0, (5, 5)))):
                ax.axhline(acc * scale, color="tab:green", linestyle=style, linewidth=1, label=f"teacher {fp[:8]}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))  # minor labels collide on short ranges
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{experiment}: {metric} vs size (mean over seeds, error bars: std, clipped to the range)", fontsize=10)
    fig.text(0.01, 0.01, "\n".join(names), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.04 + 0.028 * len(names), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(client: MlflowClient, rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str,
           experiment: str, path: Path, labels: dict[str, str] | None = None, key: str = "val/acc", top: int = 8) -> Path | None:  # fmt: skip
    """Per-epoch ``key`` of the ``top`` configs by ``metric`` (mean over seeds at each epoch,
    shaded min-max), overlaid; None when no run has a history of ``key``."""
    ranked = sorted(summary, key=lambda s: s["mean"], reverse=True)[:top]
    series = []
    for s in ranked:
        members = [r for r in rows if r["status"] == "FINISHED" and r.get("group") == s.get("group")]
        histories = [sorted(client.get_metric_history(r["run_id"], key), key=lambda m: m.step) for r in members]
        histories = [h for h in histories if h]
        if histories:  # each epoch over the runs that reached it: a longer run is drawn to its own end
            n = max(len(h) for h in histories)
            per_epoch = [[h[i].value for h in histories if i < len(h)] for i in range(n)]
            series.append((s, per_epoch))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    scale = 100.0 if "acc" in key else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s, per_epoch in series:
        epochs = range(1, len(per_epoch) + 1)
        label = (labels or {}).get(s.get("group", "")) or (_label(s) + (f" T={s['temperature']:g} a={s['alpha']:g}" if s["temperature"] is not None else ""))
        line, = ax.plot(epochs, [scale * statistics.fmean(v) for v in per_epoch], label=f"{label} (n={s['n']})")
        if s["n"] > 1:
            ax.fill_between(epochs, [scale * min(v) for v in per_epoch], [scale * max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key + (" (%)" if scale == 100.0 else ""))
    ax.set_title(f"{experiment}: {key} per epoch, top {len(series)} configs by {metric} (mean over seeds, band: min-max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def config_value(config: dict[str, str], key: str) -> str:
    """A param as the table shows it: ``4.0`` and ``4`` (a default and the same value typed) alike."""
    text = config.get(key, "-")
    try:
        number = float(text)
    except (TypeError, ValueError):
        return text
    return f"{number:g}" if number.is_integer() or "e" in f"{number:g}" else text



BASELINE = "ce (no teacher)"  # the label-only student, by one name in every table and figure


def _label(s: dict[str, Any]) -> str:
    what = s["compression"] if s.get("compression", "none") != "none" else ""
    objective = BASELINE if s["objective"] == "ce" else s["objective"]
    return f"{objective} {what}".strip()


def group_label(s: dict[str, Any], differing: list[str]) -> str:
    """A group's name in the figures: the values of the keys that differ between groups
    (``distill.temperature=4 trainer.max_epochs=30``), else objective and compression."""
    if not differing:
        return _label(s)
    def part(key: str) -> str:
        if key in ("objective", "compression"):
            return BASELINE if s[key] == "ce" else str(s[key])
        return f"{key.rsplit('.', 1)[-1] if key.count('.') > 1 else key}={config_value(s['config'], key)}"

    return " ".join(part(k) for k in differing)

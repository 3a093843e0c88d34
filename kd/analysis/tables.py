"""The report's tables: the comparison table's rows (the keys that differ, n, mean ± std, the
selected and the last epoch, size, each group's teacher), and their CSV and Markdown forms."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kd.analysis.plots import BASELINE, config_value

NOTE = ("model selection used validation only; test accuracy is that of the validation-selected "
        "epoch (for pruned runs: the best epoch at the final sparsity); val acc is given for that "
        "epoch and for the last one; std is the population std (ddof=0) over seeds")  # fmt: skip


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and "acc" in metric:
        return f"{value:.2%}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pm(s: dict[str, Any], key: str) -> str:
    """``mean ± std`` of ``key`` in a summary row, as percentages (the mean alone for one run)."""
    if s.get(f"{key}_mean") is None:
        return "-"
    return f"{s[f'{key}_mean']:.2%}" + (f" ± {s[f'{key}_std']:.2%}" if s["n"] > 1 else "")


def _teacher(s: dict[str, Any]) -> str:
    """The group's own reference: its teacher's test accuracy and which teacher (fingerprint)."""
    if s.get("teacher/test_acc") is None:
        return "-"
    return f"{s['teacher/test_acc']:.2%} ({s['teacher'][:8]})"


def table_rows(summary: list[dict[str, Any]], metric: str, differing: list[str]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: the keys that differ between groups, n, mean ± std, the validation
    accuracy of the selected and of the last epoch, non-zero parameters and each group's teacher."""
    varied = differing or ["objective", "compression"]
    header = [*varied, "n", f"{metric} mean ± std", "val acc, best epoch", "val acc, last epoch", "non-zero params", "teacher test acc"]
    rows = []
    for s in summary:
        cells = [(BASELINE if s[k] == "ce" else s[k]) if k in ("objective", "compression") else config_value(s["config"], k)
                 for k in varied]  # fmt: skip
        acc = _fmt(s["mean"], metric) + (f" ± {_fmt(s['std'], metric)}" if s["n"] > 1 else "")
        rows.append([*map(str, cells), str(s["n"]), acc, _pm(s, "val/acc_best"), _pm(s, "val/acc_last"),
                     _fmt(s["nonzero_params"], ""), _teacher(s)])  # fmt: skip
    return header, rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    rows = [{k: v for k, v in row.items() if k not in ("_params", "config")} for row in rows]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def write_markdown(header: list[str], rows: list[list[str]], metric: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + f"\n\n{metric}: {NOTE}.\n"

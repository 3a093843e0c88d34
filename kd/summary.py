"""The short summary a run ends with: accuracies, sizes, compression ratios, and the command
that opens the MLflow store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kd.teacher import Teacher
    from kd.tracking import Tracker


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Ratios teacher / student, when there is a teacher: how much smaller and faster."""
    if "teacher/params" not in metrics:
        return {}
    ratios = {
        "model/compression_ratio": metrics["teacher/params"] / metrics["model/params"],
        "model/size_ratio": metrics["teacher/size_bytes"] / metrics["model/size_bytes"],
    }
    if metrics.get("model/macs"):
        ratios["model/macs_ratio"] = metrics["teacher/macs"] / metrics["model/macs"]
    return ratios


def print_summary(name: str, metrics: dict[str, float], teacher: Teacher | None, tracker: Tracker) -> None:
    table = Table(title=f"kd run: {name}", title_justify="left")
    table.add_column("")
    table.add_column("test acc", justify="right")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("latency b=1", justify="right")
    rows = [("student", "")] + ([("teacher", "teacher/")] if teacher is not None else [])
    for label, prefix in rows:
        key = prefix or "model/"
        acc = metrics["test/acc"] if not prefix else metrics["teacher/test_acc"]
        table.add_row(
            label if not prefix else f"teacher ({teacher.source})",
            f"{acc:.2%}",
            f"{int(metrics[key + 'params']):,}",
            f"{metrics[key + 'size_bytes'] / 1024:.1f} KiB",
            f"{int(metrics[key + 'macs']):,}",
            f"{metrics[key + 'latency_ms_b1']:.3f} ms" if key + "latency_ms_b1" in metrics else "-",
        )
    console = Console()
    console.print(table)
    if "model/compression_ratio" in metrics:
        console.print(
            f"compression: {metrics['model/compression_ratio']:.1f}x fewer parameters, "
            f"{metrics['model/size_ratio']:.1f}x smaller on disk; accuracy "
            f"{metrics['test/acc'] - metrics['teacher/test_acc']:+.2%} vs the teacher"
        )
    console.print(f"MLflow: {tracker.ui_command()}  (experiment '{tracker.experiment_name}')", soft_wrap=True)

"""The short summary a run ends with: accuracies, sizes, compression ratios, and the command
that opens the MLflow store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kd.train.teacher import Teacher
    from kd.tracking.tracker import Tracker


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Ratios teacher / student, when there is a teacher, and dense / pruned (``prune/*``) or
    dense / factorised (``factorize/*``) student: how much smaller and faster."""
    stage = "factorize" if "factorize/test_acc_before" in metrics else "prune"
    ratios = _reduction_ratios(metrics, stage) if "dense/params" in metrics else {}
    if "quant/size_bytes_coded" in metrics:  # 32-bit parameters vs their compact encoding (no file overhead in either)
        ratios["quant/coded_reduction"] = 4 * metrics["model/params"] / metrics["quant/size_bytes_coded"]
    if "teacher/params" not in metrics:
        return ratios
    ratios |= {
        "model/compression_ratio": metrics["teacher/params"] / metrics["model/params"],
        "model/size_ratio": metrics["teacher/size_bytes"] / metrics["model/size_bytes"],
    }
    if metrics.get("model/macs"):
        ratios["model/macs_ratio"] = metrics["teacher/macs"] / metrics["model/macs"]
    return ratios


def _reduction_ratios(metrics: dict[str, float], stage: str) -> dict[str, float]:
    ratios = {
        f"{stage}/param_reduction": metrics["dense/params"] / metrics["model/params"],
        f"{stage}/nonzero_reduction": metrics["dense/params"] / max(metrics["model/nonzero_params"], 1),
        f"{stage}/size_reduction_zip": metrics["dense/size_bytes"] / metrics["model/size_bytes_zip"],
        f"{stage}/size_reduction_sparse": metrics["dense/size_bytes"] / metrics["model/size_bytes_sparse"],
    }
    if metrics.get("model/macs"):
        ratios[f"{stage}/mac_reduction"] = metrics["dense/macs"] / metrics["model/macs"]
    for key in [k for k in metrics if k.startswith("dense/latency_ms_b")]:
        ratios[f"{stage}/speedup_{key.rsplit('_', 1)[1]}"] = metrics[key] / metrics[key.replace("dense/", "model/")]
    return ratios


def print_summary(name: str, metrics: dict[str, float], teacher: Teacher | None, tracker: Tracker) -> None:
    table = Table(title=f"kd run: {name}", title_justify="left")
    table.add_column("")
    table.add_column("test acc", justify="right")
    table.add_column("params", justify="right")
    table.add_column("non-zero", justify="right")
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
            f"{int(metrics[key + 'nonzero_params']):,}",
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
    if "prune/param_reduction" in metrics:
        speedup = next((v for k, v in metrics.items() if k.startswith("prune/speedup_b") and k != "prune/speedup_b1"), None)
        console.print(
            f"pruning: {metrics['model/sparsity_all']:.1%} of all parameters zero; vs the dense student "
            f"{metrics['prune/param_reduction']:.2f}x fewer parameters, {metrics['prune/nonzero_reduction']:.2f}x fewer "
            f"non-zeros, {metrics['prune/size_reduction_zip']:.2f}x smaller zipped"
            + (
                f", {metrics['prune/mac_reduction']:.2f}x fewer MACs, {speedup:.2f}x faster at the large batch"
                if metrics["prune/param_reduction"] > 1 and speedup and "prune/mac_reduction" in metrics
                else " (masks: same shapes, MACs and speed as dense)"
            )
        )
    if "factorize/param_reduction" in metrics:
        speedup = next((v for k, v in metrics.items() if k.startswith("factorize/speedup_b") and k != "factorize/speedup_b1"), None)
        console.print(
            f"low-rank: {int(metrics['factorize/layers'])} layers factorised, {metrics['factorize/param_reduction']:.2f}x fewer "
            f"parameters" + (f", {metrics['factorize/mac_reduction']:.2f}x fewer MACs" if "factorize/mac_reduction" in metrics else "")
            + (f", {speedup:.2f}x faster at the large batch" if speedup else "")
            + f"; test acc {metrics['factorize/test_acc_before']:.2%} before, {metrics['factorize/test_acc_truncated']:.2%} "
            f"truncated, {metrics['test/acc']:.2%} fine-tuned"
        )
    if "quant/bits" in metrics:
        acts = int(metrics.get("quant/activation_bits", metrics["quant/bits"]))
        width = f"{int(metrics['quant/bits'])}-bit" + (f" weights, {acts}-bit activations" if acts != metrics["quant/bits"] else "")
        console.print(f"{width} (simulated): the test accuracy above is the float model holding "
                      "the quantized values (fake-quant); no integer kernels exist for this recipe, so no integer model was made"
                      + (f"; {metrics['quant/coded_reduction']:.1f}x smaller in its compact encoding" if "quant/coded_reduction" in metrics else ""))  # fmt: skip
    if "quant/test_acc" in metrics:
        speed = next((v for k, v in metrics.items() if k.startswith("quant/speedup_b") and k != "quant/speedup_b1"), None)
        console.print(
            f"int8: test acc {metrics['quant/test_acc']:.2%} ({metrics['quant/acc_delta']:+.2%} vs the tested model, "
            f"{metrics['quant/argmax_agreement']:.2%} same predictions, logits {metrics['quant/logit_rel_error']:.1%} off), "
            f"{metrics['quant/size_reduction']:.2f}x smaller on disk" + (f", {speed:.2f}x faster at the large batch" if speed else "")
        )
    console.print(f"MLflow: {tracker.ui_command()}  (experiment '{tracker.experiment_name}')", soft_wrap=True)

"""The short summary a run ends with: accuracies, sizes, compression ratios, and the command
that opens the MLflow store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kd.tracking import keys

if TYPE_CHECKING:
    from kd.train.teacher import Teacher
    from kd.tracking.tracker import Tracker


def summary_metrics(metrics: dict[str, float], reshaped_by: str | None) -> dict[str, float]:
    """Ratios teacher / student, when there is a teacher, and dense / compressed student for the
    stage that measured the dense one (``reshaped_by``: ``prune`` or ``factorize``, None when no
    stage did): how much smaller and faster."""
    ratios = keys.reduction_ratios(metrics, reshaped_by) if reshaped_by is not None else {}
    coded = keys.key(keys.QUANT, "size_bytes_coded")
    if coded in metrics:  # 32-bit parameters vs their compact encoding (no file overhead in either)
        ratios[keys.key(keys.QUANT, "coded_reduction")] = 4 * metrics[keys.key(keys.MODEL, keys.PARAMS)] / metrics[coded]
    teacher, model = (lambda name: metrics[keys.key(keys.TEACHER, name)]), (lambda name: metrics[keys.key(keys.MODEL, name)])
    if keys.key(keys.TEACHER, keys.PARAMS) not in metrics:
        return ratios
    ratios |= {keys.COMPRESSION_RATIO: teacher(keys.PARAMS) / model(keys.PARAMS), keys.SIZE_RATIO: teacher(keys.SIZE) / model(keys.SIZE)}
    if metrics.get(keys.key(keys.MODEL, keys.MACS)):
        ratios[keys.MACS_RATIO] = teacher(keys.MACS) / model(keys.MACS)
    return ratios


def print_summary(
    name: str, metrics: dict[str, float], teacher: Teacher | None, tracker: Tracker, run_dir: Path | None = None,
    saved: Sequence[Path] = (), run_id: str = "",
) -> None:  # fmt: skip
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
        acc = metrics[keys.TEST_ACC] if not prefix else metrics[keys.TEACHER_TEST_ACC]
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
                f", {metrics['prune/mac_reduction']:.2f}x fewer MACs" + (f", {speedup:.2f}x faster at the large batch" if speedup else "")
                if metrics["prune/param_reduction"] > 1 and "prune/mac_reduction" in metrics
                else " (masks: same shapes, MACs and speed as dense)"
            )
        )
    if "factorize/param_reduction" in metrics:
        speedup = next((v for k, v in metrics.items() if k.startswith("factorize/speedup_b") and k != "factorize/speedup_b1"), None)
        console.print(
            f"low-rank: {int(metrics['factorize/layers'])} layers factorised, {metrics['factorize/param_reduction']:.2f}x fewer "
            f"parameters" + (f", {metrics['factorize/mac_reduction']:.2f}x fewer MACs" if "factorize/mac_reduction" in metrics else "")
            + (f", {metrics['factorize/nonzero_reduction']:.2f}x fewer non-zeros (pruned factors)"
               if metrics["factorize/nonzero_reduction"] > 1.01 * metrics["factorize/param_reduction"] else "")
            + (f", {speedup:.2f}x faster at the large batch" if speedup else "")
            + (f"; test acc {metrics['factorize/test_acc_before']:.2%} before, {metrics['factorize/test_acc_truncated']:.2%} "
               f"truncated, {metrics['test/acc']:.2%} fine-tuned" if "factorize/test_acc_before" in metrics
               else " before training (the factorised model trained)")
        )
    if "exit/threshold" in metrics:  # student=multi_exit
        names = [k.split("/")[1] for k in metrics if k.startswith("exit/") and k.endswith("/share")]
        shares = ", ".join(f"{n} {metrics[f'exit/{n}/share']:.0%}" for n in names)
        console.print(
            f"early exits: at confidence > {metrics['exit/threshold']:.3g} (chosen on validation, within "
            f"{metrics['exit/max_drop']:.1%} of the final exit) test acc {metrics['exit/test_acc']:.2%} at "
            f"{metrics['exit/macs_avg']:,.0f} MACs per input on average, {metrics['exit/macs_ratio']:.2f}x fewer than the final "
            f"exit; inputs leaving at {shares}; each exit alone: "
            + ", ".join(f"{n} {metrics[f'exit/{n}/test_acc']:.2%} at {metrics[f'exit/{n}/macs']:,.0f} MACs" for n in names)
            + " (exits.csv, exits.png)", soft_wrap=True,
        )  # fmt: skip
    if "quant/bits" in metrics:
        acts = int(metrics.get("quant/activation_bits", metrics["quant/bits"]))
        width = f"{int(metrics['quant/bits'])}-bit" + (f" weights, {acts}-bit activations" if acts != metrics["quant/bits"] else "")
        if "quant/budget_bits" in metrics:  # mixed precision: widths per layer
            chosen = sorted({int(v) for k, v in metrics.items() if k.startswith("quant/layer_bits/")})
            width = (f"mixed {'/'.join(map(str, chosen))}-bit weights (average {metrics['quant/weight_bits_avg']:.2f} bits, budget "
                     f"{metrics['quant/budget_bits']:g}; per layer: mixed_precision.csv), {acts}-bit activations")  # fmt: skip
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
    if run_dir is not None:
        names = ", ".join(p.name if p.parent == run_dir else str(p) for p in saved)
        console.print(f"saved in {run_dir}: {names}" if names else f"run folder: {run_dir}", soft_wrap=True)
    run = f"run {run_id} in " if run_id else ""
    console.print(f"MLflow: {run}experiment '{tracker.experiment_name}'; open it with {tracker.ui_command()}", soft_wrap=True)

"""Compare student runs read back from MLflow: ``python -m kd.report [--sweep TAG]``.

Reads only what MLflow holds (tags, params, metrics of runs tagged ``kd.role=student``), groups
the FINISHED runs by every config but the seed (objective, compression, temperature, alpha), and
writes ``runs.csv``, ``summary.csv``, ``summary.md``, a temperature x alpha ``heatmap.png`` and,
when the runs differ in size, ``tradeoff.png`` (accuracy vs non-zero parameters, zipped size and
latency, Pareto front marked) and ``curves.png`` (validation accuracy per epoch of the best
configs) to ``--out``, and logs them to an MLflow run tagged ``kd.role=report``. RUNNING and
FAILED runs are listed in ``runs.csv`` but left out of every statistic.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from kd.analysis.plots import SIZES, curves, heatmap, pareto, tradeoff
from kd.tracking import keys
from kd.tracking.tracker import resolve_uri

__all__ = ["curves", "heatmap", "load_runs", "main", "pareto", "summarise", "tradeoff"]

COLUMNS = ["run_id", "name", "status", "objective", "compression", "temperature", "alpha", "seed",
           "val/acc_best", "val/acc_last", "test/acc", "params", "nonzero_params", "size_bytes_zip", "latency_ms_b256",
           "compression_ratio", "teacher/test_acc"]  # fmt: skip
# column -> the metric key it reads
METRICS = {"val/acc_best": keys.VAL_ACC_BEST, "val/acc_last": keys.VAL_ACC, "test/acc": keys.TEST_ACC,
           **{name: keys.key(keys.MODEL, name) for name in (keys.PARAMS, keys.NONZERO, keys.SIZE_ZIP, keys.LATENCY + "256")},
           "compression_ratio": keys.COMPRESSION_RATIO, "teacher/test_acc": keys.TEACHER_TEST_ACC}  # fmt: skip
NOTE = ("model selection used validation only; test accuracy is that of the validation-selected "
        "epoch (for pruned runs: the best epoch at the final sparsity); val acc is given for that "
        "epoch and for the last one; std is the population std (ddof=0) over seeds")  # fmt: skip


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def load_runs(client: MlflowClient, experiment: str, sweep: str | None = None, metric: str = "test/acc") -> list[dict[str, Any]]:
    """One row per student run of ``experiment`` (optionally of one sweep), oldest first.

    Args:
        client: a client on the store to read.
        experiment: MLflow experiment name.
        sweep: keep only runs whose tag ``kd.sweep`` equals this.
        metric: a metric to add as a column when it is not one of ``COLUMNS`` already.

    Returns:
        Dicts with the keys of ``COLUMNS`` (plus ``metric``); a value the run lacks is None.
        Empty when the experiment does not exist.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = "tags.`kd.role` = 'student'" + (f" and tags.`kd.sweep` = '{sweep}'" if sweep else "")
    metrics = METRICS | ({} if metric in METRICS else {metric: metric})
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], query, ViewType.ACTIVE_ONLY, 1000,
                                  ["attributes.start_time ASC"], page_token=token)  # fmt: skip
        for run in page:
            params, tags = run.data.params, run.data.tags
            seed = _number(params.get("seed"))
            row = {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "objective": tags.get("kd.objective", "?").split(" ")[0],  # "kd T=4 a=0.9" -> "kd"
                "compression": tags.get("kd.compression", "none").removeprefix("prune "),
                "temperature": _number(params.get("distill.temperature")),
                "alpha": _number(params.get("distill.alpha")),
                "seed": int(seed) if seed is not None else None,
            }
            rows.append(row | {column: run.data.metrics.get(key) for column, key in metrics.items()})
        token = page.token
        if not token:
            return rows


def summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and population std (ddof=0) of ``metric`` over seeds, per (objective, compression,
    temperature, alpha), from the FINISHED rows that have the metric, with the mean of each size
    column of ``SIZES``; sorted by the group key."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "FINISHED" and row.get(metric) is not None:
            groups.setdefault((row["objective"], row.get("compression", "none"), row["temperature"], row["alpha"]), []).append(row)

    def order(key: tuple) -> tuple:
        return tuple((value is None, value if value is not None else 0) for value in key)

    summary = []
    for (o, c, t, a), members in sorted(groups.items(), key=lambda item: order(item[0])):
        values = [r[metric] for r in members]
        sizes = {k: statistics.fmean(v) if (v := [r[k] for r in members if r.get(k) is not None]) else None for k, _, _ in SIZES}
        epochs = {}  # the validation accuracy of the selected (best) epoch and of the last epoch
        for key in ("val/acc_best", "val/acc_last"):
            v = [r[key] for r in members if r.get(key) is not None]
            epochs[f"{key}_mean"] = statistics.fmean(v) if v else None
            epochs[f"{key}_std"] = statistics.pstdev(v) if v else None
        summary.append({"objective": o, "compression": c, "temperature": t, "alpha": a, "n": len(values),
                        "mean": statistics.fmean(values), "std": statistics.pstdev(values)} | epochs | sizes)  # fmt: skip
    return summary


def log_report(client: MlflowClient, experiment: str, sweep: str | None, files: list[Path]) -> str:
    """Log the report's files as artifacts of a run tagged ``kd.role=report`` (one per
    experiment and sweep, reused when the report is redrawn); returns its run id."""
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    scope = sweep or "all"
    found = client.search_runs([exp_id], f"tags.`kd.role` = 'report' and tags.`kd.report_scope` = '{scope}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=f"report {scope}", tags={"kd.role": "report", "kd.report_scope": scope}).info.run_id  # fmt: skip
    for f in files:
        client.log_artifact(run_id, str(f), "report")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and "acc" in metric:
        return f"{value:.2%}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pm(s: dict[str, Any], key: str) -> str:
    """``mean ± std`` of ``key`` in a summary row, as percentages."""
    if s.get(f"{key}_mean") is None:
        return "-"
    return f"{s[f'{key}_mean']:.2%} ± {s[f'{key}_std']:.2%}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _markdown(summary: list[dict[str, Any]], metric: str, header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        cells = [s["objective"], s["compression"], _fmt(s["temperature"], ""), _fmt(s["alpha"], ""), str(s["n"]),
                 _fmt(s["mean"], metric), _fmt(s["std"], metric), _pm(s, "val/acc_best"), _pm(s, "val/acc_last"),
                 _fmt(s["nonzero_params"], "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{metric}: {NOTE}.\n"


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2: nothing to report)."""
    parser = argparse.ArgumentParser(prog="python -m kd.report", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=None, help="tracking URI (default: as a run resolves it)")
    parser.add_argument("--experiment", default="kd", help="MLflow experiment name (default: kd)")
    parser.add_argument("--sweep", default=None, help="only runs whose tag kd.sweep equals this")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/reports/<experiment>")
    parser.add_argument("--metric", default="test/acc", help="metric to compare (default: test/acc)")
    parser.add_argument("--no-log", dest="log", action="store_false", help="do not log the files to an MLflow run")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri, Path("outputs"))
    console = Console()
    where = f"experiment '{args.experiment}'" + (f", sweep '{args.sweep}'" if args.sweep else "")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        rows = []  # opening a missing SQLite store would create an empty one
    else:
        client = MlflowClient(tracking_uri=uri)
        rows = load_runs(client, args.experiment, args.sweep, args.metric)
    summary = summarise(rows, args.metric)
    if not summary:
        why = f"{len(rows)} student run(s), none FINISHED with {args.metric}" if rows else "no student runs"
        console.print(f"kd.analysis.report: nothing to report: {why} ({where} in {uri})", soft_wrap=True, highlight=False)
        return 2

    out = args.out if args.out is not None else Path("outputs") / "reports" / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "summary.csv", summary)
    header = ["objective", "compression", "T", "alpha", "n", f"mean {args.metric}", "std",
              "val acc, best epoch", "val acc, last epoch", "non-zero params"]  # fmt: skip
    (out / "summary.md").write_text(_markdown(summary, args.metric, header))

    table = Table(title=f"kd report: {where}", title_justify="left", caption=f"{args.metric}: {NOTE}", caption_justify="left")
    kd_params = any(s["temperature"] is not None or s["alpha"] is not None for s in summary)
    columns = ["objective", "compression", *(["T", "alpha"] if kd_params else []), "n", f"{args.metric} mean ± std",
               "val acc, best epoch", "val acc, last epoch", "non-zero params"]  # fmt: skip
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 2 else "right")
    for s in summary:
        grid = [_fmt(s["temperature"], ""), _fmt(s["alpha"], "")] if kd_params else []
        table.add_row(s["objective"], s["compression"], *grid, str(s["n"]),
                      f"{_fmt(s['mean'], args.metric)} ± {_fmt(s['std'], args.metric)}", _pm(s, "val/acc_best"),
                      _pm(s, "val/acc_last"), _fmt(s["nonzero_params"], ""))  # fmt: skip
    console.print(table)
    console.print(f"store: {uri}", soft_wrap=True)
    left_out = [r for r in rows if r["status"] != "FINISHED"]
    if left_out:
        counts = {s: sum(r["status"] == s for r in left_out) for s in sorted({r["status"] for r in left_out})}
        console.print("not in the statistics: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    png = heatmap(rows, summary, args.metric, args.experiment, out / "heatmap.png")
    console.print(f"heatmap: {png}" if png else "heatmap: skipped (kd runs have a single temperature and a single alpha)", soft_wrap=True)
    trade = tradeoff(rows, summary, args.metric, args.experiment, out / "tradeoff.png")
    console.print(f"accuracy vs size: {trade}" if trade else "accuracy vs size: skipped (every config has the same size)", soft_wrap=True)
    curve = curves(client, rows, summary, args.metric, args.experiment, out / "curves.png")
    console.print(f"training curves: {curve}" if curve else "training curves: skipped (no val/acc history)", soft_wrap=True)
    console.print(f"tables: {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}", soft_wrap=True)
    if args.log:
        files = [out / n for n in ("runs.csv", "summary.csv", "summary.md")] + [p for p in (png, trade, curve) if p]
        console.print(f"logged to MLflow run {log_report(client, args.experiment, args.sweep, files)} (kd.role=report)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

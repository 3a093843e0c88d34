"""Compare student runs read back from MLflow: ``python -m kd.report [--sweep TAG]``.

Reads only what MLflow holds (tags, params, metrics of runs tagged ``kd.role=student``; smoke
tests, ``kd.debug``, never), groups the FINISHED runs whose resolved configs are equal except the
seed (the tag ``kd.group``), shows the config keys that differ between groups, and writes ``runs.csv``, ``summary.csv``, ``summary.md``, a temperature x alpha ``heatmap.png`` and,
when the runs differ in size, ``tradeoff.png`` (accuracy vs non-zero parameters, zipped size and
latency, Pareto front marked) and ``curves.png`` (validation accuracy per epoch of the best
configs) to ``--out``, and logs them to an MLflow run tagged ``kd.role=report``. RUNNING and
FAILED runs are listed in ``runs.csv`` but left out of every statistic.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from kd.analysis.html import write_html
from kd.analysis.plots import SIZES, config_value, curves, group_label, heatmap, pareto, tradeoff
from kd.analysis.tables import NOTE, table_rows, write_csv, write_markdown
from kd.tracking import keys
from kd.tracking.liveness import close_dead_runs
from kd.tracking.store import resolve_uri

__all__ = ["curves", "heatmap", "load_runs", "main", "pareto", "summarise", "tradeoff"]

COLUMNS = ["run_id", "name", "status", "objective", "compression", "temperature", "alpha", "seed",
           "val/acc_best", "val/acc_last", "test/acc", "params", "nonzero_params", "size_bytes_zip", "latency_ms_b256",
           "compression_ratio", "teacher/test_acc"]  # fmt: skip
# column -> the metric key it reads
METRICS = {"val/acc_best": keys.VAL_ACC_BEST, "val/acc_last": keys.VAL_ACC, "test/acc": keys.TEST_ACC,
           **{name: keys.key(keys.MODEL, name) for name in (keys.PARAMS, keys.NONZERO, keys.SIZE_ZIP, keys.LATENCY + "256")},
           "compression_ratio": keys.COMPRESSION_RATIO, "teacher/test_acc": keys.TEACHER_TEST_ACC}  # fmt: skip

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
            if tags.get("kd.debug") == "true":
                continue  # a smoke test (trainer=debug) is never compared with real runs
            row = {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "objective": tags.get("kd.objective", "?").split(" ")[0],  # "kd T=4 a=0.9" -> "kd"
                "compression": tags.get("kd.compression", "none").removeprefix("prune "),
                "temperature": _number(params.get("distill.temperature")),
                "alpha": _number(params.get("distill.alpha")),
                "seed": int(seed) if seed is not None else None,
                "group": tags.get("kd.group") or _legacy_group(tags, params),
                "teacher": tags.get("kd.teacher_fingerprint", ""),
                "experiment_id": run.info.experiment_id,
                "_params": dict(params),
            }
            rows.append(row | {column: run.data.metrics.get(key) for column, key in metrics.items()})
        token = page.token
        if not token:
            return rows


def _legacy_group(tags: dict[str, str], params: dict[str, str]) -> str:
    """A run logged before ``kd.group`` existed: its params without the seed and output paths."""
    kept = sorted((k, v) for k, v in params.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES))
    return "legacy:" + hashlib.sha256(repr(kept).encode()).hexdigest()[:20]


# params that never make two groups differ in a table: the seed pooled over, where and how visibly a run ran
IGNORED = ("seed", "resume", "log_steps", "optimized_metric")
IGNORED_PREFIXES = ("paths.", "tracking.", "callbacks.", "measure.", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                    "trainer.log_every_n_steps", "reproduce.")  # fmt: skip


def _compared(params: dict[str, str]) -> dict[str, str]:
    """The params that can make two groups differ (not the seed, output paths, display switches)."""
    return {k: v for k, v in params.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)}


def differing_keys(summary: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between groups (what the table and the plot labels
    show), in config order; ``[]`` for one group."""
    if len(summary) < 2:
        return []
    shown = [c for c in ("objective", "compression") if len({s[c] for s in summary}) > 1]
    owner = {"distill.": "objective", "prune.": "compression", "quantize.": "compression", "factorize.": "compression"}
    every = dict.fromkeys(k for s in summary for k in s["config"])
    for key in every:
        # a method's own keys count only between groups of that method (T between two KD groups,
        # not KD's T against the baseline's lack of one): the method column says the rest
        by = next((o for prefix, o in owner.items() if key.startswith(prefix)), None)
        families = {s[by] for s in summary} if by else {None}
        for family in families:
            values = {config_value(s["config"], key) for s in summary if by is None or s[by] == family}
            if len(values) > 1:
                shown.append(key)
                break
    return shown


def summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and population std (ddof=0) of ``metric`` over seeds, per group of runs whose configs
    are equal but for the seed (``kd.group``), from the FINISHED rows that have the metric, with
    the mean of each size column of ``SIZES`` and the group's teacher; sorted by objective,
    compression, temperature, alpha."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "FINISHED" and row.get(metric) is not None:
            groups.setdefault(row.get("group") or "", []).append(row)

    def order(members: list[dict[str, Any]]) -> tuple:
        first = members[0]
        key = (first["objective"], first.get("compression", "none"), first["temperature"], first["alpha"])
        return tuple((value is None, value if value is not None else 0) for value in key) + (first["run_id"],)

    summary = []
    for members in sorted(groups.values(), key=order):
        first = members[0]
        o, c, t, a = first["objective"], first.get("compression", "none"), first["temperature"], first["alpha"]
        values = [r[metric] for r in members]
        sizes = {k: statistics.fmean(v) if (v := [r[k] for r in members if r.get(k) is not None]) else None for k, _, _ in SIZES}
        epochs = {}  # the validation accuracy of the selected (best) epoch and of the last epoch
        for key in ("val/acc_best", "val/acc_last"):
            v = [r[key] for r in members if r.get(key) is not None]
            epochs[f"{key}_mean"] = statistics.fmean(v) if v else None
            epochs[f"{key}_std"] = statistics.pstdev(v) if v else None
        teacher = [r["teacher/test_acc"] for r in members if r.get("teacher/test_acc") is not None]
        summary.append({"objective": o, "compression": c, "temperature": t, "alpha": a, "n": len(values),
                        "mean": statistics.fmean(values), "std": statistics.pstdev(values)} | epochs | sizes
                       | {"teacher": first.get("teacher", ""), "teacher/test_acc": statistics.fmean(teacher) if teacher else None,
                          "group": first.get("group", ""), "experiment_id": first.get("experiment_id", ""), "run_ids": " ".join(r["run_id"] for r in members),
                          "config": _compared(first.get("_params", {}))})  # fmt: skip
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


def report_folder(experiment: str, sweep: str | None) -> Path:
    """``outputs/reports/<experiment>/``, or ``.../sweeps/<sweep>/`` for one sweep's report (it
    never overwrites the experiment-wide files)."""
    base = Path("outputs") / "reports" / experiment
    return base if not sweep else base / "sweeps" / "_".join(Path(sweep).parts[-2:]).replace(":", "_")


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2: nothing to report)."""
    parser = argparse.ArgumentParser(prog="python -m kd.report", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=None, help="tracking URI (default: as a run resolves it)")
    parser.add_argument("--experiment", default="kd", help="MLflow experiment name (default: kd)")
    parser.add_argument("--sweep", default=None, help="only runs whose tag kd.sweep equals this")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/reports/<experiment>[/sweeps/<sweep>]")
    parser.add_argument("--metric", default="test/acc", help="metric to compare (default: test/acc)")
    parser.add_argument("--ui", default="http://127.0.0.1:5000", help="the MLflow UI report.html links to")
    parser.add_argument("--no-log", dest="log", action="store_false", help="do not log the files to an MLflow run")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri, Path("outputs"))
    console = Console()
    where = f"experiment '{args.experiment}'" + (f", sweep '{args.sweep}'" if args.sweep else "")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        rows = []  # opening a missing SQLite store would create an empty one
    else:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(args.experiment)
        dead = close_dead_runs(client, found.experiment_id) if found is not None else []
        if dead:
            console.print(f"closed {len(dead)} run(s) whose process is gone: KILLED, the reason in the tag kd.failure")
        rows = load_runs(client, args.experiment, args.sweep, args.metric)
    summary = summarise(rows, args.metric)
    if not summary:
        why = f"{len(rows)} student run(s), none FINISHED with {args.metric}" if rows else "no student runs"
        console.print(f"kd.report: nothing to report: {why} ({where} in {uri})", soft_wrap=True, highlight=False)
        return 2

    out = args.out if args.out is not None else report_folder(args.experiment, args.sweep)
    out.mkdir(parents=True, exist_ok=True)
    differing = differing_keys(summary)
    labels = {s["group"]: group_label(s, differing) for s in summary}
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", summary)
    header, cells = table_rows(summary, args.metric, differing)
    (out / "summary.md").write_text(write_markdown(header, cells, args.metric))

    table = Table(title=f"kd report: {where}", title_justify="left", caption=f"{args.metric}: {NOTE}", caption_justify="left")
    for i, column in enumerate(header):
        key = i < len(header) - 6
        table.add_column(column, justify="left" if key else "right", no_wrap=key)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    console.print(f"store: {uri}", soft_wrap=True)
    left_out = [r for r in rows if r["status"] != "FINISHED"]
    if left_out:
        counts = {s: sum(r["status"] == s for r in left_out) for s in sorted({r["status"] for r in left_out})}
        running = " (RUNNING: alive, or on another host, where kd cannot tell)" if "RUNNING" in counts else ""
        console.print("not in the statistics: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + running)
    png = heatmap(rows, summary, args.metric, args.experiment, out / "heatmap.png")
    console.print(f"heatmap: {png}" if png else "heatmap: skipped (no temperature x alpha grid of otherwise equal configs)", soft_wrap=True)
    trade = tradeoff(rows, summary, args.metric, args.experiment, out / "tradeoff.png", labels)
    console.print(f"accuracy vs size: {trade}" if trade else "accuracy vs size: skipped (every config has the same size)", soft_wrap=True)
    curve = curves(client, rows, summary, args.metric, args.experiment, out / "curves.png", labels)
    console.print(f"training curves: {curve}" if curve else "training curves: skipped (no val/acc history)", soft_wrap=True)
    figures = [p for p in (png, trade, curve) if p]
    page = write_html(out / "report.html", f"kd report: {where}", header, cells, summary, figures, args.ui, f"{args.metric}: {NOTE}")
    console.print(f"tables: {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}; page: {page}", soft_wrap=True)
    if args.log:
        files = [out / n for n in ("runs.csv", "summary.csv", "summary.md", "report.html")] + figures
        console.print(f"logged to MLflow run {log_report(client, args.experiment, args.sweep, files)} (kd.role=report)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

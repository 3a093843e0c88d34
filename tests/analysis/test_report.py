"""``python -m kd.report`` on a small real store: statistics, FAILED runs, files, empty selection."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import matplotlib.image
from mlflow.tracking import MlflowClient

from kd.run.experiment import run
from kd.analysis.report import main, pareto
from kd.tracking.store import resolve_uri

TINY = ["trainer.max_epochs=1", "teacher.max_epochs=1"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_summarises_finished_runs_and_draws_the_heatmap(make_cfg, tmp_path, capsys):
    jobs = [["distill.temperature=2.0", "seed=0"], ["distill.temperature=2.0", "seed=1"],
            ["distill.temperature=8.0", "seed=0"], ["distill=none", "seed=0"]]  # fmt: skip
    for i, overrides in enumerate(jobs):
        cfg = make_cfg(*TINY, *overrides, f"paths.run_dir={tmp_path / f'run{i}'}")
        run(cfg)
    uri = resolve_uri(cfg.tracking.uri, Path(cfg.paths.output_root))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kd")
    students = client.search_runs([experiment.experiment_id], "tags.`kd.role` = 'student'")
    assert len(students) == 4

    # A FAILED job with T=2: it must not move the T=2 statistics.
    failed = client.create_run(experiment.experiment_id, run_name="failed",
                               tags={"kd.role": "student", "kd.objective": "kd T=2 a=0.9"}).info.run_id  # fmt: skip
    for key, value in {"distill.temperature": "2.0", "distill.alpha": "0.9", "seed": "7"}.items():
        client.log_param(failed, key, value)
    client.log_metric(failed, "test/acc", 0.0)
    client.set_terminated(failed, "FAILED")

    out = tmp_path / "report"
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation-selected" in printed and "1 FAILED" in printed and str(out / "heatmap.png") in printed

    # Expected numbers, computed here from what the runs logged.
    by_group: dict[tuple[str, str], list[float]] = {}
    for r in students:
        key = (r.data.params.get("distill.temperature", ""), r.data.params.get("distill.alpha", ""))
        by_group.setdefault(key, []).append(r.data.metrics["test/acc"])
    summary = _read_csv(out / "summary.csv")
    assert len(summary) == 3
    for row in summary:
        key = (f"{float(row['temperature'])}" if row["temperature"] else "", f"{float(row['alpha'])}" if row["alpha"] else "")
        values = by_group[key]
        assert row["objective"] == ("ce" if key == ("", "") else "kd")
        assert int(row["n"]) == len(values)
        assert float(row["mean"]) == statistics.fmean(values)
        assert float(row["std"]) == statistics.pstdev(values)
        best = [r.data.metrics["val/acc_best"] for r in students if (r.data.params.get("distill.temperature", ""),
                r.data.params.get("distill.alpha", "")) == key]  # fmt: skip
        last = [r.data.metrics["val/acc"] for r in students if (r.data.params.get("distill.temperature", ""),
                r.data.params.get("distill.alpha", "")) == key]  # fmt: skip
        assert float(row["val/acc_best_mean"]) == statistics.fmean(best)
        assert float(row["val/acc_last_mean"]) == statistics.fmean(last)  # the last epoch's val/acc

    runs = {r["run_id"]: r for r in _read_csv(out / "runs.csv")}
    assert len(runs) == 5 and runs[failed]["status"] == "FAILED"
    assert all(runs[r.info.run_id]["status"] == "FINISHED" for r in students)
    # the columns are what differs between groups: the method, and T between the two KD groups
    assert (out / "summary.md").read_text().startswith("| objective | distill.temperature | n |")

    png = out / "heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert matplotlib.image.imread(png).ndim >= 2
    curves = out / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(curves).ndim >= 2

    # the files are also in MLflow, on one report run that a second report reuses
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(out)]) == 0
    (report,) = client.search_runs([experiment.experiment_id], "tags.`kd.role` = 'report'")
    logged = {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    assert {"report/summary.csv", "report/heatmap.png", "report/curves.png"} <= logged
    assert len(_read_csv(out / "runs.csv")) == 5  # the report run is not a student
    print(printed)  # shown with -s


def test_empty_selection_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["--uri", uri, "--experiment", "no-such-experiment", "--out", str(out)]) == 2
    assert "nothing to report" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "absent.db").exists()

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("empty")
    assert main(["--uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "empty", "--out", str(out)]) == 2
    assert "no student runs" in capsys.readouterr().out
    assert not out.exists()


def test_pareto_front_keeps_only_undominated_points():
    points = [(10, 0.90), (20, 0.95), (15, 0.85), (30, 0.95), (5, 0.80), (10, 0.90)]
    assert pareto(points) == [0, 1, 4, 5]  # (15, .85) and (30, .95) are beaten; equal points both stay


def test_compression_configs_are_separate_groups_and_get_an_accuracy_vs_size_plot(make_cfg, tmp_path, capsys):
    jobs = [["prune=none"], ["prune=magnitude", "prune.sparsity=0.5"], ["prune=magnitude", "prune.sparsity=0.9"],
            ["prune=magnitude", "prune.sparsity=0.9", "seed=1"]]  # fmt: skip
    for i, overrides in enumerate(jobs):
        cfg = make_cfg("distill=none", "trainer.max_epochs=2", "prune.start=1", *overrides, f"paths.run_dir={tmp_path / f'run{i}'}") \
            if overrides[0] != "prune=none" else make_cfg("distill=none", "trainer.max_epochs=2", f"paths.run_dir={tmp_path / f'run{i}'}")
        run(cfg)
    uri = resolve_uri(cfg.tracking.uri, Path(cfg.paths.output_root))
    out = tmp_path / "report"
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(out)]) == 0
    summary = {row["compression"]: row for row in _read_csv(out / "summary.csv")}
    assert set(summary) == {"none", "magnitude s=0.5", "magnitude s=0.9"}
    assert summary["magnitude s=0.9"]["n"] == "2" and summary["none"]["n"] == "1"
    assert float(summary["magnitude s=0.9"]["nonzero_params"]) < float(summary["magnitude s=0.5"]["nonzero_params"]) \
        < float(summary["none"]["nonzero_params"])
    png = out / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[1] > 1000  # three panels
    assert str(png) in capsys.readouterr().out

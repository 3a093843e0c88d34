"""The report's reading and arithmetic on a store written by hand (no training): which runs it
reads and how, the per-group mean and spread against the formulas, the keys that differ, where
it writes, and the CLI's exit status and messages."""

from __future__ import annotations

import csv
import hashlib
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from kd.analysis import report
from kd.analysis.report import differing_keys, load_runs, log_report, main, report_folder, summarise


def _student(client: MlflowClient, experiment_id: str, *, seed: int, acc: float | None, status: str = "FINISHED",
             group: str | None = "g1", params: dict | None = None, tags: dict | None = None, metrics: dict | None = None) -> str:  # fmt: skip
    base_tags = {"kd.role": "student", "kd.objective": "kd T=4 a=0.9", "kd.compression": "prune magnitude s=0.5",
                 "kd.teacher_fingerprint": "fp1"} | ({"kd.group": group} if group else {}) | (tags or {})  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"s{seed}", tags=base_tags)
    for key, value in ({"seed": seed, "distill.temperature": 4.0, "distill.alpha": 0.9, "paths.run_dir": f"/r/{seed}"} | (params or {})).items():
        client.log_param(run.info.run_id, key, value)
    for key, value in ({"test/acc": acc} if acc is not None else {}).items() | (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    time.sleep(0.002)  # distinct start times: the report reads oldest first
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kd")
    ids = [
        _student(client, exp, seed=0, acc=0.80, metrics={"model/nonzero_params": 100.0, "val/acc_best": 0.81, "teacher/test_acc": 0.95, "custom/x": 3.0}),
        _student(client, exp, seed=1, acc=0.84, metrics={"model/nonzero_params": 120.0, "val/acc_best": 0.85, "teacher/test_acc": 0.97}),
        _student(client, exp, seed=2, acc=0.99, status="FAILED"),
        _student(client, exp, seed=0, acc=0.70, group="g2", params={"distill.temperature": 8.0}, tags={"kd.sweep": "/sweeps/a"}),
        _student(client, exp, seed=0, acc=0.50, tags={"kd.debug": "true"}),
        _student(client, exp, seed=3, acc=None),
    ]
    client.create_run(exp, tags={"kd.role": "teacher"})
    return uri, client, ids


def test_the_report_reads_student_runs_oldest_first_and_leaves_smoke_tests_out(store):
    uri, client, ids = store
    rows = load_runs(client, "kd", metric="custom/x")
    assert [r["run_id"] for r in rows] == [ids[0], ids[1], ids[2], ids[3], ids[5]]
    first = rows[0]
    assert (first["objective"], first["compression"], first["temperature"], first["alpha"], first["seed"]) == ("kd", "magnitude s=0.5", 4.0, 0.9, 0)
    assert first["group"] == "g1" and first["teacher"] == "fp1" and first["status"] == "FINISHED" and first["name"] == "s0"
    assert first["test/acc"] == 0.80 and first["nonzero_params"] == 100.0 and first["custom/x"] == 3.0 and first["params"] is None
    assert rows[2]["status"] == "FAILED" and rows[4]["test/acc"] is None
    assert [r["run_id"] for r in load_runs(client, "kd", sweep="/sweeps/a")] == [ids[3]]
    assert load_runs(client, "nope") == []


def test_a_run_from_before_groups_existed_is_grouped_by_its_params_without_the_seed_and_paths():
    tags, params = {}, {"seed": "1", "paths.run_dir": "/a", "distill.alpha": "0.5", "trainer.max_epochs": "3"}
    kept = sorted([("distill.alpha", "0.5"), ("trainer.max_epochs", "3")])
    assert report._legacy_group(tags, params) == "legacy:" + hashlib.sha256(repr(kept).encode()).hexdigest()[:20]
    assert report._legacy_group(tags, params | {"seed": "2", "paths.run_dir": "/b", "measure.latency": "full"}) == report._legacy_group(tags, params)


def test_groups_pool_the_finished_seeds_with_their_population_spread(store):
    _, client, _ = store
    summary = summarise(load_runs(client, "kd"), "test/acc")
    assert [(s["group"], s["n"]) for s in summary] == [("g1", 2), ("g2", 1)]  # T=4 before T=8; FAILED and metric-less out
    g1 = summary[0]
    assert g1["mean"] == pytest.approx((0.80 + 0.84) / 2) and g1["std"] == pytest.approx(0.02)  # ddof=0
    assert g1["val/acc_best_mean"] == pytest.approx(0.83) and g1["val/acc_best_std"] == pytest.approx(0.02)
    assert g1["val/acc_last_mean"] is None and g1["nonzero_params"] == pytest.approx(110.0)
    assert g1["teacher/test_acc"] == pytest.approx(0.96) and g1["teacher"] == "fp1"
    assert g1["config"] == {"distill.temperature": "4.0", "distill.alpha": "0.9"}  # no seed, no paths
    assert summary[1]["std"] == 0.0 and summary[1]["teacher/test_acc"] is None


def test_groups_sort_by_objective_compression_temperature_and_alpha_with_missing_values_last():
    def row(run_id, objective, t, a, acc=0.5):
        return {"run_id": run_id, "status": "FINISHED", "objective": objective, "compression": "none", "temperature": t,
                "alpha": a, "group": run_id, "test/acc": acc}  # fmt: skip

    rows = [row("e", "kd", None, 0.5), row("d", "kd", 4.0, None), row("c", "kd", 4.0, 0.9), row("b", "kd", 2.0, 0.9), row("a", "ce", None, None)]
    assert [s["group"] for s in summarise(rows, "test/acc")] == ["a", "b", "c", "d", "e"]
    pruned = row("f", "kd", 2.0, 0.9) | {"compression": "structured-l1 s=0.5"}
    legacy = {k: v for k, v in row("g", "kd", 2.0, 0.9).items() if k != "compression"}  # a run logged before compression existed
    summary = summarise([pruned, legacy], "test/acc")
    assert [(s["group"], s["compression"]) for s in summary] == [("g", "none"), ("f", "structured-l1 s=0.5")]  # "none" < "structured"


def test_the_keys_shown_are_those_that_differ_within_a_method():
    def group(objective, **config):
        return {"objective": objective, "compression": "none", "config": {k.replace("_", "."): v for k, v in config.items()}}

    assert differing_keys([group("kd", distill_temperature="4")]) == []
    assert differing_keys([group("kd", distill_temperature="4"), group("kd", distill_temperature="8")]) == ["distill.temperature"]
    # the baseline has no temperature: only the method column differs
    assert differing_keys([group("kd", distill_temperature="4"), group("ce")]) == ["objective"]
    assert differing_keys([group("kd", distill_temperature="4", seed_x="1"), group("kd", distill_temperature="4", seed_x="2")]) == ["seed.x"]
    for prefix in ("prune", "quantize", "factorize"):  # a compression method's keys count between groups of that method only
        same = [dict(group("kd"), compression="m", config={f"{prefix}.k": v}) for v in ("1", "2")]
        assert differing_keys(same) == [f"{prefix}.k"], prefix
        other = [dict(group("kd"), compression="m", config={f"{prefix}.k": "1"}), dict(group("kd"), compression="none", config={})]
        assert differing_keys(other) == ["compression"], prefix


def test_a_sweeps_report_has_a_folder_of_its_own():
    assert report_folder("kd", None) == Path("outputs/reports/kd")
    assert report_folder("kd", "/abs/outputs/sweeps/2026-12-02/10-00-00") == Path("outputs/reports/kd/sweeps/2026-12-02_10-00-00")
    assert report_folder("kd", "c:/x/y") == Path("outputs/reports/kd/sweeps/x_y")
    assert report_folder("kd", "/out/multirun/2026-12-02/10:00:00") == Path("outputs/reports/kd/sweeps/2026-12-02_10_00_00")


def test_the_report_run_is_one_per_scope_and_reused(store, tmp_path):
    _, client, _ = store
    f = tmp_path / "summary.csv"
    f.write_text("a\n")
    first = log_report(client, "kd", None, [f])
    assert log_report(client, "kd", None, [f]) == first
    sweep = log_report(client, "kd", "/sweeps/a", [f])
    assert sweep != first
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["kd.report_scope"] == "all" and run.info.run_name == "report all"
    assert [a.path for a in client.list_artifacts(first, "report")] == ["report/summary.csv"]
    assert client.get_run(sweep).data.tags["kd.report_scope"] == "/sweeps/a"


def test_the_cli_writes_the_tables_and_says_what_it_left_out(store, tmp_path, capsys):
    uri, client, ids = store
    out = tmp_path / "out"
    assert main(["--uri", uri, "--out", str(out), "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "not in the statistics: 1 FAILED" in text and "RUNNING" not in text
    with (out / "runs.csv").open() as handle:
        assert [r["run_id"] for r in csv.DictReader(handle)] == [ids[0], ids[1], ids[2], ids[3], ids[5]]
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["mean"]) for r in rows] == pytest.approx([statistics.fmean([0.80, 0.84]), 0.70])
    assert {p.name for p in out.iterdir()} >= {"runs.csv", "summary.csv", "summary.md", "report.html"}


def test_the_cli_exits_2_when_there_is_nothing_to_report(tmp_path, capsys, store):
    missing = tmp_path / "none" / "mlflow.db"
    assert main(["--uri", f"sqlite:///{missing}", "--no-log"]) == 2
    assert not missing.exists()  # a missing store is not created by looking at it
    assert f"kd.report: nothing to report: no student runs (experiment 'kd' in sqlite:///{missing})" in capsys.readouterr().out
    uri, _, _ = store
    assert main(["--uri", uri, "--metric", "never/logged", "--no-log", "--out", str(tmp_path / "x")]) == 2
    assert "5 student run(s), none FINISHED with never/logged (experiment 'kd' in" in capsys.readouterr().out
    assert main(["--uri", uri, "--sweep", "/nowhere", "--no-log"]) == 2
    assert "no student runs (experiment 'kd', sweep '/nowhere' in" in capsys.readouterr().out


def test_the_cli_says_where_everything_went_and_logs_the_files(store, tmp_path, capsys, monkeypatch):
    uri, client, ids = store
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width: one line per row
    out = tmp_path / "out"
    assert main(["--uri", uri, "--out", str(out), "--ui", "http://ui.example:5000"]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    text = "\n".join(lines)
    assert "kd report: experiment 'kd'" in lines[0]
    assert f"store: {uri}" in lines
    assert f"heatmap: {out / 'heatmap.png'}" in lines and (out / "heatmap.png").is_file()  # T=4 and T=8 of one objective
    assert "accuracy vs size: skipped (every config has the same size)" in lines  # only g1 has a size
    assert "not in the statistics: 1 FAILED" in lines
    assert "training curves: skipped (no val/acc history)" in lines
    assert f"tables: {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}; page: {out / 'report.html'}" in lines
    logged = next(line for line in lines if line.startswith("logged to MLflow run "))
    report_run = logged.removeprefix("logged to MLflow run ").removesuffix(" (kd.role=report)")
    assert {a.path for a in client.list_artifacts(report_run, "report")} >= {"report/runs.csv", "report/summary.csv", "report/summary.md", "report/report.html"}
    assert "test/acc: " in text and "distill.temperature" in text  # the caption names the metric; the differing key is a column
    assert "http://ui.example:5000" in (out / "report.html").read_text()
    assert (out / "summary.md").read_text().startswith("| distill.temperature |")


def test_the_cli_closes_runs_whose_process_is_gone_before_reporting(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kd")
    _student(client, exp, seed=0, acc=0.8)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.create_run(exp, tags={"kd.role": "student", "kd.host": socket.gethostname(), "kd.pid": str(dead.pid)})
    assert main(["--uri", uri, "--out", str(tmp_path / "out"), "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "closed 1 run(s) whose process is gone: KILLED, the reason in the tag kd.failure" in text
    assert "not in the statistics: 1 KILLED" in text


def test_missing_tags_read_as_unknown_and_groups_keep_their_runs_and_experiment(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("kd")
    bare = client.create_run(exp, tags={"kd.role": "student"})  # logged by hand: no kd.* tags at all
    client.log_param(bare.info.run_id, "seed", "0")
    client.log_metric(bare.info.run_id, "test/acc", 0.5)
    client.set_terminated(bare.info.run_id)
    (row,) = load_runs(client, "kd")
    assert (row["objective"], row["compression"], row["teacher"], row["experiment_id"]) == ("?", "none", "", exp)
    assert row["group"] == report._legacy_group({}, {"seed": "0"})
    twin = dict(row, run_id="second")
    (group,) = summarise([row, twin], "test/acc")
    assert group["run_ids"] == f"{row['run_id']} second" and group["experiment_id"] == exp and group["teacher"] == ""
    (alone,) = summarise([{k: v for k, v in row.items() if k not in ("group", "teacher", "experiment_id")}], "test/acc")
    assert (alone["group"], alone["teacher"], alone["experiment_id"]) == ("", "", "")


def test_every_page_of_runs_is_read(monkeypatch):
    class Page(list):
        def __init__(self, runs, token):
            super().__init__(runs)
            self.token = token

    def run(i):
        info = SimpleNamespace(run_id=f"r{i}", run_name=f"n{i}", status="FINISHED", experiment_id="1")
        return SimpleNamespace(info=info, data=SimpleNamespace(params={"seed": str(i)}, tags={"kd.group": "g"}, metrics={"test/acc": 0.5}))

    asked = []

    class Client:
        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="1")

        def search_runs(self, ids, query, view, max_results, order_by, page_token=None):
            asked.append((page_token, max_results, order_by))
            return Page([run(0), run(1)], "next") if page_token is None else Page([run(2)], None)

    assert [r["run_id"] for r in load_runs(Client(), "kd")] == ["r0", "r1", "r2"]
    assert asked == [(None, 1000, ["attributes.start_time ASC"]), ("next", 1000, ["attributes.start_time ASC"])]


def test_the_cli_defaults_read_outputs_and_write_the_experiments_report_folder(store, tmp_path, monkeypatch, capsys):
    import shutil

    uri, client, _ = store
    (tmp_path / "outputs").mkdir()
    shutil.copy(uri.removeprefix("sqlite:///"), tmp_path / "outputs" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--no-log"]) == 0  # experiment kd, metric test/acc, the store under ./outputs
    folder = tmp_path / "outputs" / "reports" / "kd"
    assert (folder / "summary.csv").is_file() and "http://127.0.0.1:5000" in (folder / "report.html").read_text()
    assert "store: sqlite:///" in capsys.readouterr().out


def test_a_running_run_is_left_out_and_said_to_be_alive_or_elsewhere(tmp_path, capsys, monkeypatch):
    import os
    import socket

    monkeypatch.setenv("COLUMNS", "200")  # the message on one line
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kd")
    _student(client, exp, seed=0, acc=0.8)
    client.create_run(exp, tags={"kd.role": "student", "kd.host": socket.gethostname(), "kd.pid": str(os.getpid())})  # this process: alive
    assert main(["--uri", uri, "--out", str(tmp_path / "out"), "--no-log"]) == 0
    assert "not in the statistics: 1 RUNNING (RUNNING: alive, or on another host, where kd cannot tell)" in capsys.readouterr().out


def test_the_help_names_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("usage: python -m kd.report", "--uri URI tracking URI (default: as a run resolves it)",
                   "--experiment EXPERIMENT MLflow experiment name (default: kd)", "--sweep SWEEP only runs whose tag kd.sweep equals this",
                   "--out OUT default: outputs/reports/<experiment>[/sweeps/<sweep>]", "--metric METRIC metric to compare (default: test/acc)",
                   "--ui UI the MLflow UI report.html links to", "--no-log do not log the files to an MLflow run"):  # fmt: skip
        assert phrase in text, phrase


def test_a_sweeps_report_goes_to_its_folder_and_its_own_report_run_and_can_be_redrawn(store, tmp_path, monkeypatch, capsys):
    import shutil

    uri, _, ids = store
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "outputs").mkdir()
    shutil.copy(uri.removeprefix("sqlite:///"), tmp_path / "outputs" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for _ in range(2):  # redrawn into the same folder
        assert main(["--sweep", "/sweeps/a"]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    folder = tmp_path / "outputs" / "reports" / "kd" / "sweeps" / "sweeps_a"
    from kd.analysis.tables import NOTE

    assert (folder / "summary.csv").is_file() and f"test/acc: {NOTE}" in (folder / "summary.md").read_text()
    assert "heatmap: skipped (no temperature x alpha grid of otherwise equal configs)" in lines  # one group: no grid
    logged = [line.removeprefix("logged to MLflow run ").removesuffix(" (kd.role=report)") for line in lines if line.startswith("logged to")]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert len(logged) == 2 and logged[0] == logged[1]  # one report run per scope, reused
    assert client.get_run(logged[0]).data.tags["kd.report_scope"] == "/sweeps/a"


def test_every_status_left_out_is_counted(tmp_path, capsys, monkeypatch):
    import os
    import socket

    monkeypatch.setenv("COLUMNS", "200")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kd")
    _student(client, exp, seed=0, acc=0.8)
    _student(client, exp, seed=1, acc=0.8, status="FAILED")
    client.create_run(exp, tags={"kd.role": "student", "kd.host": socket.gethostname(), "kd.pid": str(os.getpid())})
    assert main(["--uri", uri, "--out", str(tmp_path / "out"), "--no-log"]) == 0
    assert "not in the statistics: 1 FAILED, 1 RUNNING (RUNNING: alive, or on another host, where kd cannot tell)" in capsys.readouterr().out

"""Comparing runs that can be trusted, on a mixed store made by real short runs: groups are runs
equal in everything but the seed, each group has its own teacher reference, smoke tests stay out,
and a sweep's report never overwrites the experiment's."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.analysis.report import main
from kd.run.experiment import run

TINY = ["trainer.max_epochs=1", "teacher.max_epochs=1", "measure.latency=false"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    """Seeds 0 and 1 of one config, the same with 2 epochs, the same with another teacher (2 teacher
    epochs), and a smoke test: what the issue's new user had in one experiment."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, FAST

    root = tmp_path_factory.mktemp("mixed")
    jobs = [["seed=0"], ["seed=1"], ["trainer.max_epochs=2"], ["teacher.max_epochs=2"], ["trainer=debug"]]
    for i, overrides in enumerate(jobs):
        paths = [f"paths.output_root={root / 'outputs'}", f"paths.run_dir={root / f'run{i}'}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            run(compose("config", overrides=[*FAST, *TINY, *paths, *overrides]))
    uri = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def test_groups_are_configs_equal_but_for_the_seed_each_with_its_own_teacher(mixed_store, tmp_path):
    uri, client = mixed_store
    out = tmp_path / "report"
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(out), "--no-log"]) == 0
    students = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.role` = 'student'")
    assert len(students) == 4  # the smoke test went to kd-debug
    summary = _read_csv(out / "summary.csv")
    assert sorted(int(s["n"]) for s in summary) == [1, 1, 2]  # 30-epoch-style and 2-epoch runs never pooled

    def params(run) -> tuple[str, str]:
        return run.data.params["trainer.max_epochs"], run.data.params["teacher.max_epochs"]

    for s in summary:  # expected values computed here from what each run logged
        members = [r for r in students if r.info.run_id in s["run_ids"].split()]
        assert len({params(r) for r in members}) == 1 and len(members) == int(s["n"])
        assert float(s["mean"]) == pytest.approx(statistics.fmean(r.data.metrics["test/acc"] for r in members))
        assert float(s["teacher/test_acc"]) == pytest.approx(members[0].data.metrics["teacher/test_acc"])
        assert s["teacher"] == members[0].data.tags["kd.teacher_fingerprint"]
    assert len({s["teacher"] for s in summary}) == 2  # two teachers, each group's reference its own

    table = (out / "summary.md").read_text()
    header = table.splitlines()[0].split(" | ")
    varied = [h.strip("| ") for h in header[: header.index("n")]]
    # only the keys that differ: the two epoch counts varied here, and the cosine schedules that follow them
    assert sorted(varied) == ["student.scheduler.T_max", "teacher.max_epochs", "teacher.scheduler.T_max", "trainer.max_epochs"]
    n_at = header.index("n") + 1  # cells of a row split on "|" start with an empty one
    rows = [line.split("|") for line in table.splitlines()[2:] if line.startswith("|")]
    assert sorted(r[n_at].strip() for r in rows) == ["1", "1", "2"]
    assert all(("±" in r[n_at + 1]) == (r[n_at].strip() == "2") for r in rows)  # n = 1: no "± 0.00%"

    page = (out / "report.html").read_text()
    assert page.count("<tr>") == len(summary) + 1 and "data:image/png;base64," in page
    links = re.findall(r'href="http://127\.0\.0\.1:5000/#/experiments/\d+/runs/([0-9a-f]{32})"', page)
    assert sorted(links) == sorted(r.info.run_id for r in students)


def test_smoke_tests_are_never_compared(mixed_store, tmp_path):
    uri, client = mixed_store
    (debug,) = client.search_runs([client.get_experiment_by_name("kd-debug").experiment_id], "tags.`kd.role` = 'student'")
    assert debug.data.tags["kd.debug"] == "true"
    out = tmp_path / "report"
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(out), "--no-log"]) == 0
    assert debug.info.run_id not in {r["run_id"] for r in _read_csv(out / "runs.csv")}
    # asked for explicitly, the debug experiment's runs are still left out: they saw 3 batches
    assert main(["--uri", uri, "--experiment", "kd-debug", "--out", str(tmp_path / "dbg"), "--no-log"]) == 2


def test_a_sweep_report_writes_to_its_own_folder(mixed_store, tmp_path, monkeypatch):
    uri, client = mixed_store
    monkeypatch.chdir(tmp_path)
    experiment = client.get_experiment_by_name("kd").experiment_id
    students = client.search_runs([experiment], "tags.`kd.role` = 'student'")
    sweep = "outputs/multirun/2026-12-01/10-00-00-1"
    for r in students[:2]:  # as if two of the runs were one sweep's jobs
        client.set_tag(r.info.run_id, "kd.sweep", sweep)
    assert main(["--uri", uri, "--experiment", "kd", "--no-log"]) == 0
    whole = tmp_path / "outputs" / "reports" / "kd"
    before = {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()}
    assert main(["--uri", uri, "--experiment", "kd", "--sweep", sweep, "--no-log"]) == 0
    assert {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()} == before  # untouched
    own = whole / "sweeps" / "2026-12-01_10-00-00-1"
    assert {r["run_id"] for r in _read_csv(own / "runs.csv")} == {r.info.run_id for r in students[:2]}

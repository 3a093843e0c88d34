"""The new local store migrated in a child process while the job starts (kd.tracking.store)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from kd.tracking import store
from kd.tracking.tracker import Tracker


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as connection:
        return {row[0] for row in connection.execute("select name from sqlite_master where type='table'")}


def test_a_staged_store_is_the_one_the_tracker_opens_and_nothing_is_left_behind(tmp_path):
    db = tmp_path / "out" / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert store.stage_in_background(uri)
    staged = store._staged[db]
    assert not store.stage_in_background(uri)  # one child per store
    tracker = Tracker(uri, "e", tmp_path / "out" / "mlartifacts")
    assert staged.child.returncode == 0 and not staged.folder.exists()  # waited for, its folder removed
    assert db not in store._staged
    assert {"runs", "metrics", "experiments", "alembic_version"} <= _tables(db)
    with tracker.open_run("r", {}) as run_id:
        tracker.log_metrics(run_id, {"m": 1.0})
    assert tracker.client.get_run(run_id).data.metrics == {"m": 1.0}
    default = tracker.client.get_experiment("0")  # MLflow's default experiment keeps artifacts beside the store
    assert Path(default.artifact_location.removeprefix("file://")) == tmp_path / "out" / "mlartifacts" / "0"
    assert not list(db.parent.glob(".mlflow.db.*"))  # no temporary copy beside it


def test_a_job_that_never_connects_leaves_no_store(tmp_path):
    db = tmp_path / "mlflow.db"
    assert store.stage_in_background(f"sqlite:///{db}")
    staged = store._staged[db]
    store._discard_all()  # what the process does at exit
    assert staged.child.returncode is not None and not staged.folder.exists() and not db.exists()


def test_a_failed_child_leaves_the_tracker_to_create_the_store(tmp_path, monkeypatch, caplog):
    db = tmp_path / "mlflow.db"
    assert store.stage_in_background(f"sqlite:///{db}")
    staged = store._staged[db]
    staged.child.kill()  # dies before it writes the store
    staged.child.wait()
    tracker = Tracker(f"sqlite:///{db}", "e")
    assert "background creation failed" in caplog.text and "runs" in _tables(db)
    assert tracker.experiment_id and not staged.folder.exists()


@pytest.mark.parametrize("uri", ["http://localhost:5000", "postgresql://u@h/db", "file:/tmp/x"])
def test_only_a_new_local_sqlite_store_is_staged(uri, tmp_path, monkeypatch):
    assert not store.stage_in_background(uri)
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"")
    assert not store.stage_in_background(f"sqlite:///{existing}")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a secondary DDP rank logs nothing
    assert not store.stage_in_background(f"sqlite:///{tmp_path / 'other.db'}")


def test_the_cli_with_a_bad_value_leaves_no_store(run_py, tmp_path):
    done = subprocess.run(run_py("factorize=svd", "factorize.energy=1.5"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "factorize.energy must be a fraction" in done.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists() and not list((tmp_path / "outputs").glob(".mlflow*"))

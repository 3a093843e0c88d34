"""Interrupts and SIGTERM at any moment: every MLflow run ends FINISHED or FAILED (never RUNNING),
and a terminated process exits non-zero (143 for SIGTERM)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event

from kd.tracking.tracker import Tracker

QUICK = ["teacher.max_epochs=1", "measure.latency=false"]


@pytest.mark.parametrize("statement", ["INSERT INTO metrics", "INSERT INTO latest_metrics", "UPDATE runs"])
def test_an_interrupt_inside_an_mlflow_write_still_closes_the_run_failed(tmp_path, statement):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "kd", tmp_path / "artifacts")
    armed = {"on": False}

    def interrupt(conn, cursor, sql, params, context, executemany):  # Ctrl-C in the middle of a write
        if armed["on"] and sql.startswith(statement):
            armed["on"] = False
            raise KeyboardInterrupt

    event.listen(tracker.client._tracking_client.store.engine, "after_cursor_execute", interrupt)
    with pytest.raises(KeyboardInterrupt):
        with tracker.open_run("victim", {"kd.role": "student"}) as run_id:
            armed["on"] = True
            tracker.log_metrics(run_id, {"train/loss": 1.0})  # "UPDATE runs": the FINISHED write itself
    assert not armed["on"]  # the interrupt did happen inside that statement
    run = MlflowClient(uri).get_run(run_id)  # a fresh connection: nothing holds the write lock
    assert run.info.status == "FAILED" and run.data.tags["kd.failure"].startswith("interrupted (KeyboardInterrupt")


def _runs(output_root: Path, experiment: str = "kd") -> list:
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _signal_when(process: subprocess.Popen, ready, sig: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the moment to signal never came"
        time.sleep(0.2)
    process.send_signal(sig)


def test_sigterm_during_fit_exits_143_and_closes_every_run_failed(run_py, tmp_path):
    output_root = tmp_path / "outputs"
    process = subprocess.Popen(run_py(*QUICK, "trainer.max_epochs=300"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip

    def student_trains() -> bool:  # the student's first checkpoint: an epoch has ended (the store is left alone)
        return any(output_root.glob("runs/*/*/checkpoints/*.ckpt"))

    _signal_when(process, student_trains, signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    runs = _runs(output_root)
    assert {r.data.tags["kd.role"] for r in runs} == {"student", "teacher"}
    student = next(r for r in runs if r.data.tags["kd.role"] == "student")
    assert student.info.status == "FAILED" and "interrupted" in student.data.tags["kd.failure"]
    assert {r.info.status for r in runs if r.data.tags["kd.role"] == "teacher"} == {"FINISHED"}  # it had finished


def test_sigterm_after_fit_exits_143_and_closes_the_run_failed(run_py, tmp_path):
    output_root = tmp_path / "outputs"
    # a long measurement (latency at a large batch), so the signal lands after fit and test
    process = subprocess.Popen(run_py("teacher.max_epochs=1", "measure.latency=true", "measure.large_batch=16384"),
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen: list[str] = []

    def measuring() -> bool:
        line = process.stderr.readline()
        seen.append(line)
        return "kd: measuring" in line

    _signal_when(process, measuring, signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    (student,) = [r for r in _runs(output_root) if r.data.tags["kd.role"] == "student"]
    assert student.info.status == "FAILED" and student.data.tags["kd.failure"] == "interrupted (Terminated: SIGTERM)"


@pytest.mark.slow
def test_twenty_signals_at_random_moments_never_leave_a_run_running(run_py, tmp_path):
    seed = int(os.environ.get("KD_SIGNAL_SEED", random.randrange(10**6)))
    print(f"signal test seed {seed} (replay: KD_SIGNAL_SEED={seed})")
    rng = random.Random(seed)
    output_root = tmp_path / "outputs"
    counts = {"interrupted": 0, "finished before the signal": 0}
    for i in range(20):
        # a fresh teacher every fourth run, so signals also land in teacher fits and cache writes
        teacher = [f"teacher.seed={i // 4}", "teacher.max_epochs=2"]
        # the full latency benchmark: a measuring phase of a few seconds, so signals land there too
        process = subprocess.Popen(run_py(*teacher, "trainer.max_epochs=3", "measure.latency=full", "measure.large_batch=2048"),
                                   cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(2.0, 14.0))  # across start-up, teacher fit, student fit, test, measurement, logging
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        finished = process.poll() is not None
        if not finished:
            process.send_signal(sig)
        code = process.wait(timeout=120)
        counts["finished before the signal" if finished else "interrupted"] += 1
        assert finished == (code == 0), (i, sig, code)  # an interrupted run never exits 0
    print(counts)
    assert all(r.info.status in ("FINISHED", "FAILED") for r in _runs(output_root)), seed
    done = subprocess.run(run_py("teacher.max_epochs=2", "trainer.max_epochs=1"), cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == 0  # the store, the cache and the folders are fine for the next run


def test_runs_whose_process_is_gone_are_closed_killed_by_the_next_run_and_the_report(tmp_path):
    import socket

    from kd.analysis.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("kd")
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid names no process now (as after a SIGKILL or the OOM killer)
    dead_pid = str(ended.pid)
    here = socket.gethostname()
    runs = {
        "dead": {"kd.host": here, "kd.pid": dead_pid, "kd.role": "student"},
        "alive": {"kd.host": here, "kd.pid": str(os.getpid()), "kd.role": "student"},  # this process
        "elsewhere": {"kd.host": here + "-other", "kd.pid": dead_pid, "kd.role": "student"},
    }
    ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in runs.items()}
    Tracker(uri, "kd", tmp_path / "artifacts")  # the next run against the store
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert dead_pid in client.get_run(ids["dead"]).data.tags["kd.failure"]
    another = client.create_run(experiment, run_name="dead2", tags=runs["dead"]).info.run_id
    assert main(["--uri", uri, "--experiment", "kd", "--out", str(tmp_path / "report"), "--no-log"]) == 2  # nothing FINISHED
    assert client.get_run(another).info.status == "KILLED"  # the report closed it too


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_whose_exception_was_swallowed_is_raised_when_the_run_ends(sig, raised):
    from kd.run.signals import sigterm_ends_the_run

    with pytest.raises(raised):
        with sigterm_ends_the_run():
            try:  # what Python does to an exception raised inside a finalizer: drops it
                os.kill(os.getpid(), sig)
                time.sleep(1)
            except BaseException:
                pass
    with sigterm_ends_the_run():  # a later run starts clean
        pass

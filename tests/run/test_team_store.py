"""A real team store: a throwaway PostgreSQL cluster, ``mlflow server`` on it with an artifact
root of its own, and a 4-job joblib sweep sent there with one job killed midway.

Slow. Needs Debian's ``postgresql`` (``apt-get install -y postgresql``) and ``psycopg2-binary``
(in the dev extra): ``.venv/bin/python -m pytest -m slow tests/run/test_team_store.py``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.analysis.report import main as report

pytestmark = pytest.mark.slow
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(ready, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.5)


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's postgres user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a free port (user ``kd``, trust auth); yields the port."""
    if PG_BIN is None:
        pytest.skip("no PostgreSQL: apt-get install -y postgresql")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (the dev extra has it)")
    base = Path(tempfile.mkdtemp(prefix="kd-pg-"))  # not under pytest's folder: that is private to root
    base.chmod(0o755)
    cluster, sockets = base / "pg", base / "sock"
    cluster.mkdir()
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(cluster, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    subprocess.run(_as_postgres([f"{PG_BIN}/initdb", "-D", str(cluster), "-A", "trust", "-U", "kd"]), check=True,
                   capture_output=True)  # fmt: skip
    pg_port = _free_port()
    subprocess.run(_as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(cluster), "-l", str(cluster / "log"), "-w", "-o",
                                 f"-p {pg_port} -k {sockets} -c listen_addresses=127.0.0.1", "start"]), check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield pg_port
    finally:
        subprocess.run(_as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(cluster), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def team_server(postgres, tmp_path):
    pg_port, port = postgres, _free_port()
    server = None
    try:
        subprocess.run([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "kd", "mlflow"], check=True)
        env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                                   f"postgresql+psycopg2://kd@127.0.0.1:{pg_port}/mlflow", "--artifacts-destination",
                                   str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        _wait_for(healthy, "mlflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_two_workers_share_one_optuna_study_in_postgres(postgres, run_py, tmp_path):
    import optuna

    subprocess.run([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(postgres), "-U", "kd", "optuna"], check=True)
    url = f"postgresql+psycopg2://kd@127.0.0.1:{postgres}/optuna"
    search = ["hparams_search=student_pareto", "hydra.sweeper.sampler.population_size=2", "hydra.sweeper.n_trials=4",
              f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=team"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(run_py(*search, f"hydra.sweep.dir={tmp_path / f'worker{i}'}", multirun=True), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    for worker in workers:
        assert worker.wait(timeout=900) == 0, worker.stderr.read()[-3000:]
    trials = optuna.load_study(study_name="team", storage=url).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5 and len(complete) == len(trials)  # each checks the shared count before asking; none left running
    assert all((tmp_path / f"worker{i}" / "0" / "student.pt").is_file() for i in range(2))  # both trained trials of it
    assert all((tmp_path / f"worker{i}" / "pareto_front.csv").is_file() for i in range(2))  # and wrote the study's front


def test_a_joblib_sweep_against_postgres_with_one_job_killed_leaves_every_run_closed(team_server, run_py, tmp_path):
    client = MlflowClient(team_server)
    env = os.environ | {"MLFLOW_TRACKING_URI": team_server}
    sweep = ["distill.temperature=2,4", "seed=0,1", "trainer.max_epochs=40", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    process = subprocess.Popen(run_py(*sweep, multirun=True), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    victim: dict[str, str] = {}

    def a_student_trains() -> bool:
        experiment = client.get_experiment_by_name("kd")
        if experiment is None:
            return False
        running = client.search_runs([experiment.experiment_id], "tags.`kd.role` = 'student' and attributes.status = 'RUNNING'")
        started = [r for r in running if "val/acc" in r.data.metrics]
        if started:
            victim.update(run_id=started[0].info.run_id, pid=started[0].data.tags["kd.pid"])
        return bool(started)

    _wait_for(a_student_trains, "a training job", timeout=300)
    os.kill(int(victim["pid"]), signal.SIGKILL)  # as the out-of-memory killer would
    process.wait(timeout=600)
    out = tmp_path / "report"
    assert report(["--uri", team_server, "--experiment", "kd", "--out", str(out), "--no-log"]) in (0, 2)

    experiment = client.get_experiment_by_name("kd").experiment_id
    runs = client.search_runs([experiment])
    assert runs and all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    killed = client.get_run(victim["run_id"])
    assert killed.info.status == "KILLED" and victim["pid"] in killed.data.tags["kd.failure"]
    (parent,) = [r for r in runs if r.data.tags["kd.role"] == "sweep"]
    assert parent.info.status == "FAILED"  # a job of it died
    for student in [r for r in runs if r.data.tags["kd.role"] == "student" and r.info.status == "FINISHED"]:
        assert student.data.params["distill.temperature"] in ("2", "4") and 0 < student.data.metrics["test/acc"] <= 1
        assert (Path(client.download_artifacts(student.info.run_id, "student.pt", str(tmp_path))).stat().st_size > 1000)

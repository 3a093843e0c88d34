"""The same run against a real `mlflow server` on a loopback port, artifacts proxied."""

import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest
from mlflow.tracking import MlflowClient

from kd.run.experiment import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_run_against_a_tracking_server(make_cfg, tmp_path):
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        metrics = run(make_cfg(f"tracking.uri={uri}", "distill=none"))
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("kd")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's, not ours
        (student,) = client.search_runs([experiment.experiment_id])
        assert student.info.status == "FINISHED"
        assert student.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
        assert {"config.yaml", "student.pt"} <= {a.path for a in client.list_artifacts(student.info.run_id)}
        assert list((tmp_path / "server-artifacts").rglob("student.pt"))  # uploaded through the server
    finally:
        server.terminate()
        server.wait(timeout=30)

"""In a real browser (Debian's chromium, headless): ``report.html`` renders with its table and
figures, and the MLflow UI itself shows a sweep's parent run and its jobs by their swept values.

Slow (a browser, a server, a 2x2 sweep): ``apt-get install -y chromium`` once, then
``.venv/bin/python -m pytest -m slow tests/analysis/test_browser.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.image
import pytest
from mlflow.tracking import MlflowClient

from kd.analysis.report import main

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2 sweep (temperature x seed) through the real CLI: its parent run and four jobs."""
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install -y chromium")
    from tests.conftest import FAST, ROOT

    root = tmp_path_factory.mktemp("sweep")
    argv = [sys.executable, str(ROOT / "run.py"), "-m", *FAST, f"paths.output_root={root / 'outputs'}",
            "trainer.max_epochs=1", "teacher.max_epochs=1", "distill.temperature=2,4", "seed=0,1"]  # fmt: skip
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "outputs"


def test_report_html_renders_with_its_table_and_figures(sweep_store, tmp_path):
    out = tmp_path / "report"
    assert main(["--uri", f"sqlite:///{sweep_store / 'mlflow.db'}", "--experiment", "kd", "--out", str(out), "--no-log"]) == 0
    page = (out / "report.html").as_uri()
    dom = subprocess.run([*BROWSER, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr>") == 3 and "<img" in dom and "distill.temperature" in dom  # two groups + the header
    shot = tmp_path / "shot.png"
    subprocess.run([*BROWSER, f"--screenshot={shot}", page], capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 500 and float(pixels[..., :3].std()) > 0.05  # not a blank page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_mlflow_ui_shows_the_sweep_and_its_jobs_by_their_swept_values(sweep_store):
    client = MlflowClient(f"sqlite:///{sweep_store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kd")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`kd.role` = 'sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                  "and tags.`kd.role` = 'student'")  # fmt: skip
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(f"T={t} seed={s} · mlp_small<-mlp kd a=0.9" for t in (2, 4) for s in (0, 1))
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{sweep_store / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        def dom(route: str) -> str:  # a React app: give it virtual time to fetch and render
            page = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}{route}"
            return subprocess.run([*BROWSER, "--virtual-time-budget=30000", "--dump-dom", page], capture_output=True, text=True,
                                  timeout=180).stdout  # fmt: skip

        table = dom("/runs")  # the runs table: the sweep is one row (its jobs folded under it), a training experiment
        assert parent.info.run_name in table and "Training runs" in table and "Traces" not in table.split("Training runs")[1]
        for name in names:
            assert name.replace("<", "&lt;") not in table, name  # folded, not flat beside the parent
        page = dom(f"/runs/{parent.info.run_id}")  # the parent's page lists its child runs by name
        assert "Child runs" in page
        for name in names:
            assert name.replace("<", "&lt;") in page, name
    finally:
        server.terminate()
        server.wait(timeout=30)

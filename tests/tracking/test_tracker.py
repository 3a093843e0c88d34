"""The MLflow tracker on its own, against a real SQLite store: where the store is, how a run
ends (FINISHED, FAILED with its reason and traceback), batching of params and metrics, the
resume lookup, the UI command, and the errors a bad store gives."""

from __future__ import annotations

import os
import socket
import time
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from kd.tracking import run_logger
from kd.tracking import tracker as tracking
from kd.tracking.store import resolve_uri
from kd.tracking.tracker import EXPERIMENT_KIND, PARENT_ENV, PARENT_TAG, RunLogger, Tracker



@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One SQLite store for the module (creating one runs MLflow's migrations: about a second)."""
    root = tmp_path_factory.mktemp("store")
    return f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts"


@pytest.fixture
def tracker(store: tuple[str, Path], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Tracker:
    monkeypatch.delenv(PARENT_ENV, raising=False)
    uri, artifacts = store
    return Tracker(uri, request.node.name, artifacts)


def _run(tracker: Tracker, run_id: str):
    return tracker.client.get_run(run_id)


def _artifact_text(tracker: Tracker, run_id: str, name: str) -> str:
    return Path(tracker.client.download_artifacts(run_id, name)).read_text()


# ---- where the store is ----------------------------------------------------------------------
def test_the_uri_is_the_setting_else_the_environment_else_a_sqlite_file_under_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri("http://set:5000", tmp_path) == "http://set:5000"
    assert resolve_uri(None, tmp_path) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(None, Path("rel")) == f"sqlite:///{Path('rel').resolve() / 'mlflow.db'}"
    assert resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_a_new_experiment_has_its_kind_and_our_artifact_root(tracker, store):
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.name == tracker.experiment_name
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    assert experiment.artifact_location == store[1].resolve().as_uri()
    again = Tracker(store[0], tracker.experiment_name, store[1])
    assert again.experiment_id == tracker.experiment_id  # found, not created twice


def test_an_experiment_made_before_kd_set_its_kind_gets_it(store, request):
    client = MlflowClient(tracking_uri=store[0])
    name = request.node.name
    experiment_id = client.create_experiment(name)
    assert EXPERIMENT_KIND[0] not in client.get_experiment(experiment_id).tags
    assert Tracker(store[0], name, store[1]).experiment_id == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    other = client.create_experiment(f"{name}-genai", tags={EXPERIMENT_KIND[0]: "genai_development"})
    Tracker(store[0], f"{name}-genai", store[1])
    assert client.get_experiment(other).tags[EXPERIMENT_KIND[0]] == "genai_development"  # the user's choice stays


def test_a_server_store_keeps_its_own_artifact_location(monkeypatch):
    made = {}

    class Client:
        def __init__(self, tracking_uri):
            pass

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location, tags):
            made.update(name=name, location=artifact_location, tags=tags)
            return "7"

    monkeypatch.setattr(tracking, "MlflowClient", Client)
    assert Tracker("http://host:5000", "e", Path("/somewhere")).experiment_id == "7"
    assert made == {"name": "e", "location": None, "tags": dict([EXPERIMENT_KIND])}
    assert Tracker("file:///tmp/x", "e", Path("/somewhere")).experiment_id == "7"
    assert made["location"] == Path("/somewhere").resolve().as_uri()
    assert Tracker("/tmp/folder-store", "e", Path("/somewhere")).experiment_id == "7"
    assert made["location"] == Path("/somewhere").resolve().as_uri()


def test_a_parallel_job_that_created_the_experiment_first_is_found(monkeypatch):
    from mlflow.exceptions import MlflowException

    asked = []

    class Client:
        def __init__(self, tracking_uri):
            pass

        def get_experiment_by_name(self, name):
            asked.append(name)
            return None if len(asked) == 1 else SimpleNamespace(experiment_id="9")

        def create_experiment(self, name, artifact_location, tags):
            raise MlflowException("already exists")

    monkeypatch.setattr(tracking, "MlflowClient", Client)
    assert Tracker("http://host:5000", "sweep", None).experiment_id == "9"
    assert asked == ["sweep", "sweep"]


# ---- how a run ends ----------------------------------------------------------------------
def test_a_run_that_returns_is_finished_with_its_tags_and_owner(tracker):
    with tracker.open_run("first", {"kd.role": "student"}) as run_id:
        assert _run(tracker, run_id).info.status == "RUNNING"
    run = _run(tracker, run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.tags["kd.role"] == "student"
    assert run.data.tags["kd.pid"] == str(os.getpid()) and run.data.tags["kd.host"] == socket.gethostname()
    assert PARENT_TAG not in run.data.tags


def test_a_sweep_job_is_the_child_of_the_sweeps_run_unless_told_otherwise(tracker, monkeypatch):
    monkeypatch.setenv(PARENT_ENV, "parent-id")
    with tracker.open_run("child", {}) as child:
        pass
    with tracker.open_run("other", {PARENT_TAG: "mine"}) as other:
        pass
    assert _run(tracker, child).data.tags[PARENT_TAG] == "parent-id"
    assert _run(tracker, other).data.tags[PARENT_TAG] == "mine"


def test_a_run_that_raises_is_failed_with_the_reason_and_the_traceback(tracker, caplog):
    with pytest.raises(ValueError, match="boom") as caught, tracker.open_run("bad", {}) as run_id:
        raise ValueError("boom")
    run = _run(tracker, run_id)
    assert run.info.status == "FAILED" and run.data.tags["kd.failure"] == "ValueError: boom"
    text = _artifact_text(tracker, run_id, "traceback.txt")
    assert text.startswith("Traceback (most recent call last):\n  File ") and text.endswith("ValueError: boom\n")
    assert 'raise ValueError("boom")' in text
    assert f"MLflow run {run_id} marked FAILED: ValueError: boom" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    ("error", "reason"),
    [(KeyboardInterrupt(), "interrupted (KeyboardInterrupt)"), (SystemExit(143), "interrupted (SystemExit: 143)"),
     (RuntimeError(), "RuntimeError"), (ValueError("axis X"), "ValueError: axis X")],
)  # fmt: skip
def test_an_interrupt_is_named_as_one(tracker, error, reason):
    with pytest.raises(type(error)), tracker.open_run("cut", {}) as run_id:
        raise error
    assert _run(tracker, run_id).data.tags["kd.failure"] == reason
    assert _run(tracker, run_id).info.status == "FAILED"


def test_lightnings_exit_on_ctrl_c_is_reported_as_the_keyboard_interrupt(tracker):
    with pytest.raises(SystemExit), tracker.open_run("ctrl-c", {}) as run_id:
        try:
            raise KeyboardInterrupt("pressed")
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning does with it
    assert _run(tracker, run_id).data.tags["kd.failure"] == "interrupted (KeyboardInterrupt: pressed)"


def test_a_reason_is_cut_at_5000_characters(tracker):
    with pytest.raises(ValueError), tracker.open_run("long", {}) as run_id:
        raise ValueError("x" * 6000)
    assert _run(tracker, run_id).data.tags["kd.failure"] == "ValueError: " + "x" * (5000 - len("ValueError: "))


def test_a_run_failed_early_stays_failed_when_its_block_ends(tracker):
    with tracker.open_run("student 3 of a pack", {}) as run_id:
        tracker.fail(run_id, RuntimeError("diverged"))
        assert _run(tracker, run_id).info.status == "FAILED"
    run = _run(tracker, run_id)
    assert run.info.status == "FAILED" and run.data.tags["kd.failure"] == "RuntimeError: diverged"
    with pytest.raises(KeyError), tracker.open_run("again", {}) as second:
        tracker.fail(second, RuntimeError("first"))
        raise KeyError("second")
    assert _run(tracker, second).data.tags["kd.failure"] == "RuntimeError: first"  # not overwritten


def test_the_users_tracking_uri_is_put_back_after_a_run(tracker, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://users:5000")
    with tracker.open_run("a", {}):
        os.environ["MLFLOW_TRACKING_URI"] = tracker.uri  # what Lightning's logger does
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://users:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError), tracker.open_run("b", {}):
        os.environ["MLFLOW_TRACKING_URI"] = tracker.uri
        raise ValueError
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_write_that_fails_once_is_retried_after_dropping_the_stores_connections(tracker):
    engine = tracker.client._tracking_client.store.engine
    disposed, calls = [], []
    original = engine.dispose
    engine.dispose = lambda: (disposed.append(1), original())[1]  # type: ignore[method-assign]

    def write():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    try:
        tracker._retrying(write)
    finally:
        del engine.dispose
    assert len(calls) == 2 and disposed == [1]


def test_a_store_without_an_engine_does_not_retry(tracker, monkeypatch):
    monkeypatch.setattr(tracker.client, "_tracking_client", type("Rest", (), {})())  # no store: not a SQL one

    def write():
        raise RuntimeError("server said no")

    with pytest.raises(RuntimeError, match="server said no"):
        tracker._retrying(write)


# ---- what a run holds ----------------------------------------------------------------------
def test_params_are_batched_and_a_value_too_long_says_where_it_is(tracker, caplog):
    params = {f"p{i:03d}": i for i in range(tracking.MAX_PARAMS_TAGS_PER_BATCH * 2 + 5)}
    params |= {"list": [1, 2], "dict": {"a": 1}, "long": "y" * (tracking.MAX_PARAM_VAL_LENGTH + 1),
               "edge": "z" * tracking.MAX_PARAM_VAL_LENGTH}  # fmt: skip
    with tracker.open_run("params", {}) as run_id:
        tracker.log_params(run_id, params)
    logged = _run(tracker, run_id).data.params
    assert len(logged) == len(params)
    assert logged["p000"] == "0" and logged["p204"] == "204"
    assert logged["list"] == "[1, 2]" and logged["dict"] == '{"a": 1}'
    assert logged["long"] == f"<{tracking.MAX_PARAM_VAL_LENGTH + 1} characters: see the config.yaml artifact>"
    assert logged["edge"] == "z" * tracking.MAX_PARAM_VAL_LENGTH
    assert "param long is 6001 characters, over MLflow's 6000: see config.yaml" in [r.getMessage() for r in caplog.records]


def test_metrics_are_batched_at_their_step(tracker):
    metrics = {f"m/{i}": i / 2 for i in range(1003)}
    with tracker.open_run("metrics", {}) as run_id:
        tracker.log_metrics(run_id, metrics, step=4)
        tracker.log_metrics(run_id, {})
        tracker.log_metrics(run_id, {"once": 2.0})  # at step 0 unless told
    logged = _run(tracker, run_id).data.metrics
    assert logged == metrics | {"once": 2.0}
    assert [m.step for m in tracker.client.get_metric_history(run_id, "once")] == [0]
    history = tracker.client.get_metric_history(run_id, "m/1002")
    assert [(m.step, m.value) for m in history] == [(4, 501.0)]
    assert abs(history[0].timestamp - time.time() * 1000) < 60_000  # milliseconds since the epoch, now


def test_the_config_becomes_params_and_a_yaml_artifact_without_the_papers_facts(tracker):
    config = {"seed": 3, "distill": {"temperature": 4.0},
              "reproduce": {"paper": "hinton2015", "setting": "mnist", "rows": [1, 2], "claims": {"a": 1}}}  # fmt: skip
    with tracker.open_run("config", {}) as run_id:
        tracker.log_config(run_id, config)
        tracker.set_tags(run_id, {"kd.config_hash": 12})
    run = _run(tracker, run_id)
    assert run.data.params == {"seed": "3", "distill.temperature": "4.0", "reproduce.paper": "hinton2015", "reproduce.setting": "mnist"}
    assert run.data.tags["kd.config_hash"] == "12"
    text = _artifact_text(tracker, run_id, "config.yaml")
    assert "temperature: 4.0" in text and "claims:" in text


def test_resume_finds_only_a_finished_student_with_the_same_hash(tracker):
    with tracker.open_run("done", {"kd.config_hash": "abc"}) as done:
        tracker.log_metrics(done, {"test/acc": 0.75})
    with pytest.raises(ValueError), tracker.open_run("failed", {"kd.config_hash": "def"}):
        raise ValueError
    assert tracker.finished_run("abc") == {"test/acc": 0.75, "run_id": done}
    assert tracker.finished_run("def") is None
    assert tracker.finished_run("xyz") is None


def test_the_lightning_logger_writes_into_the_trackers_run_and_never_ends_it(tracker):
    with tracker.open_run("lightning", {}) as run_id:
        logger = tracker.lightning_logger(run_id)
        assert isinstance(logger, RunLogger) and logger.run_id == run_id
        logger.log_metrics({"train/loss": 0.5}, step=1)
        logger.finalize("success")
        assert _run(tracker, run_id).info.status == "RUNNING"
    assert _run(tracker, run_id).data.metrics == {"train/loss": 0.5}


def test_a_disabled_tracker_writes_nothing(tmp_path):
    off = Tracker(f"sqlite:///{tmp_path / 'dir' / 'mlflow.db'}", "e", enabled=False)
    assert off.client is None and off.experiment_id == ""
    with off.open_run("x", {}) as run_id:
        off.log_params(run_id, {"a": 1})
        off.log_config(run_id, {"a": 1})
        off.log_metrics(run_id, {"a": 1.0})
        off.set_tags(run_id, {"a": "b"})
        off.log_text(run_id, "t", "t.txt")
        off.log_artifact(run_id, Path("/nope"))
    assert run_id == "" and off.finished_run("h") is None and off.lightning_logger("") is False
    assert not (tmp_path / "dir").exists()


def test_an_artifact_goes_where_it_is_told(tracker, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    with tracker.open_run("artifacts", {}) as run_id:
        tracker.log_artifact(run_id, path, "tables")
        tracker.log_artifact(run_id, path)
    assert sorted(a.path for a in tracker.client.list_artifacts(run_id)) == ["table.csv", "tables"]
    assert _artifact_text(tracker, run_id, "tables/table.csv") == "a,b\n1,2\n"


def test_the_ui_command_opens_this_store(tracker, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow = Path(sys.executable).parent / "mlflow"
    expected = mlflow if mlflow.exists() else "mlflow"
    assert tracker.ui_command() == f"MLFLOW_DISABLE_TELEMETRY=true {expected} ui --backend-store-uri {tracker.uri}"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    assert tracker.ui_command() == f"{expected} ui --backend-store-uri {tracker.uri}"
    monkeypatch.setattr(sys, "executable", "/nowhere/bin/python")  # no mlflow beside the interpreter
    assert tracker.ui_command() == f"mlflow ui --backend-store-uri {tracker.uri}"
    for uri in ("https://team:443", "http://team:5000"):
        tracker.uri = uri
        assert tracker.ui_command() == f"open {uri}"


# ---- a bad store -----------------------------------------------------------------------------
def test_a_damaged_sqlite_store_names_the_file_and_the_fix(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(RuntimeError) as caught:
        Tracker(f"sqlite:///{db}", "e")
    assert str(caught.value) == (
        f"the MLflow store {db} cannot be read (file is not a database). Move it aside and start a new, empty store: "
        f"mv {db} {db}.broken (its runs' artifacts stay under {tmp_path / 'mlartifacts'}), or point tracking.uri elsewhere"
    )


def test_a_new_sqlite_store_may_sit_in_folders_that_do_not_exist_yet(tmp_path):
    db = tmp_path / "a" / "b" / "mlflow.db"
    Tracker(f"sqlite:///{db}", "e")
    assert db.is_file()


def test_a_store_of_no_known_kind_lists_the_kinds(tmp_path):
    with pytest.raises(ValueError) as caught:
        Tracker("ftp://x", "e")
    assert str(caught.value) == ("tracking.uri 'ftp://x' is not a store MLflow can use: sqlite:///<file>, http(s)://<server>, "
                                 "postgresql://..., mysql://... or a folder (MLflow's deprecated file store)")


@pytest.mark.parametrize(
    ("uri", "package", "hint"),
    [("postgresql+psycopg2://u@127.0.0.1:1/db", "psycopg2", "pip install psycopg2-binary (in kd's dev extra)"),
     ("postgresql+psycopg://u@127.0.0.1:1/db", "psycopg", "pip install psycopg, or name the driver kd's dev extra installs: postgresql+psycopg2://..."),
     ("mysql+pymysql://u@127.0.0.1:1/db", "pymysql", "pip install pymysql")],
)  # fmt: skip
def test_a_database_without_its_driver_says_what_to_install(monkeypatch, uri, package, hint):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError) as caught:
        Tracker(uri, "e")
    assert str(caught.value) == f"tracking.uri {uri} needs the Python package {package!r}, which is not installed: {hint}"
    assert caught.value.name == package


def test_the_next_run_against_a_store_closes_runs_whose_process_is_gone(tracker, store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tracker.client.create_run(tracker.experiment_id, tags={"kd.host": socket.gethostname(), "kd.pid": str(dead.pid)})
    alive = tracker.client.create_run(tracker.experiment_id, tags={"kd.host": socket.gethostname(), "kd.pid": str(os.getpid())})
    Tracker(store[0], tracker.experiment_name, store[1])
    closed = tracker.client.get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and f"pid {dead.pid}" in closed.data.tags["kd.failure"]
    assert tracker.client.get_run(alive.info.run_id).info.status == "RUNNING"
    tracker.client.set_terminated(alive.info.run_id)


def test_hydra_context_names_the_choices_and_groups_a_sweeps_jobs():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    assert tracking.hydra_context() == {"choices": {}, "tags": {}}  # composed without @hydra.main
    conf = Path(__file__).parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["distill=dkd", "seed=3"], return_hydra_config=True)
    try:
        HydraConfig.instance().set_config(cfg)
        context = tracking.hydra_context()
        assert context["choices"]["distill"] == "dkd" and context["tags"] == {"kd.overrides": "distill=dkd seed=3"}
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.job.num, cfg.hydra.sweep.dir = RunMode.MULTIRUN, 4, "/sweeps/x"
            cfg.hydra.overrides.task = []
        HydraConfig.instance().set_config(cfg)
        assert tracking.hydra_context()["tags"] == {"kd.overrides": "(defaults)", "kd.sweep": "/sweeps/x", "kd.job": "4"}
    finally:
        HydraConfig.instance().cfg = None


def test_a_store_whose_creation_was_interrupted_is_created_again(tmp_path, monkeypatch):
    import mlflow.store.db.utils as db_utils

    real = db_utils._upgrade_db

    def interrupted(engine):
        raise KeyboardInterrupt  # Ctrl-C halfway through MLflow's migrations

    monkeypatch.setattr(db_utils, "_upgrade_db", interrupted)
    db = tmp_path / "outputs" / "mlflow.db"
    with pytest.raises(KeyboardInterrupt):
        Tracker(f"sqlite:///{db}", "e")
    assert not db.exists() and not [p for p in db.parent.iterdir() if p.name.endswith(".creating")]
    monkeypatch.setattr(db_utils, "_upgrade_db", real)
    tracker = Tracker(f"sqlite:///{db}", "e")  # the next run: a complete store
    with tracker.open_run("after", {}) as run_id:
        pass
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


def test_the_lightning_logger_writes_metrics_in_batches_and_all_of_them_at_the_end(tracker, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(run_logger.time, "monotonic", lambda: clock[0])
    with tracker.open_run("batched", {}) as run_id:
        logger = tracker.lightning_logger(run_id)
        writes: list[int] = []
        real = logger.experiment.log_batch
        monkeypatch.setattr(logger.experiment, "log_batch", lambda **kw: (writes.append(len(kw["metrics"])), real(**kw)))
        logger.log_metrics({"train/loss": 0.5, "train/acc": 0.25}, step=1)
        clock[0] += 1.0  # within flush_every_s (2 s): kept
        logger.log_metrics({"val/acc": 0.75}, step=1)
        assert writes == [] and _run(tracker, run_id).data.metrics == {}
        clock[0] += 1.5  # 2.5 s since the last write: this call writes all three
        logger.log_metrics({"train/loss": 0.4}, step=2)
        assert writes == [4]
        logger.log_metrics({"train/loss": 0.3, "bad key!": 1.0}, step=3)
        logger.finalize("failed")  # a fit that ends, or fails, writes what is left
        assert writes == [4, 2]
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert _run(tracker, run_id).data.metrics == {"train/loss": 0.3, "train/acc": 0.25, "val/acc": 0.75, "bad key": 1.0}

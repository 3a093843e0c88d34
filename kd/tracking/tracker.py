"""MLflow specifics: the store, run lifecycle, params from the config, artifacts.

The MLflow client API is used throughout instead of the fluent ``mlflow.start_run``: a job
opens two runs at once (the student's and, when it trains one, the teacher's), and the
fluent API's single global active run would tangle them.

Every run this module opens ends FINISHED, or FAILED with the reason in the tag
``kd.failure`` and the traceback as an artifact: ``open_run`` closes it on any exception,
``KeyboardInterrupt`` and the ``SystemExit`` Lightning raises on Ctrl-C included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import OmegaConf

from kd.tracking.keys import flatten
from kd.tracking.liveness import close_dead_runs, owner_tags
from kd.tracking.run_logger import RunLogger
from kd.tracking.store import create_store, take_staged

log = logging.getLogger(__name__)


_REPRODUCE_PARAMS = ("reproduce.paper", "reproduce.setting")


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and an empty or
# young experiment opens on the GenAI (traces) page instead of the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_TAG = "mlflow.parentRunId"  # what the UI nests runs by
PARENT_ENV = "KD_SWEEP_RUN_ID"  # set by the sweep's callback (kd.run.sweep) in the launching process; workers inherit it


class Tracker:
    """One MLflow experiment in one store.

    Args:
        uri: tracking URI (``sqlite:///...``, ``http://host:5000``, ``file:...``).
        experiment: experiment name; all jobs of a sweep share it.
        artifact_root: where a *new* experiment keeps artifacts, for a local store; a server
            chooses its own.
        enabled: False on non-zero DDP ranks: nothing is written.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None, enabled: bool = True) -> None:
        self.uri = uri
        self.experiment_name = experiment
        self.enabled = enabled
        self.client: MlflowClient | None = None
        self._failed: set[str] = set()
        self.experiment_id = self._connect(artifact_root) if enabled else ""

    def _connect(self, artifact_root: Path | None) -> str:
        if self.uri.startswith("sqlite:///"):
            # Parallel jobs (joblib launcher) would race MLflow's schema migration of a new
            # SQLite file; the first to take the lock creates it, the others find it ready.
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{db}.lock"):
                if not db.exists() and not take_staged(db):
                    create_store(db)
                try:
                    return self._get_or_create_experiment(artifact_root)
                except sqlalchemy.exc.DatabaseError as err:  # not an SQLite file, or a damaged one
                    raise RuntimeError(
                        f"the MLflow store {db} cannot be read ({err.orig}). Move it aside and start a new, empty "
                        f"store: mv {db} {db}.broken (its runs' artifacts stay under {db.parent / 'mlartifacts'}), "
                        "or point tracking.uri elsewhere"
                    ) from err
        try:
            return self._get_or_create_experiment(artifact_root)
        except ModuleNotFoundError as err:  # a database URI without its driver
            hint = {
                "psycopg": "pip install psycopg, or name the driver kd's dev extra installs: postgresql+psycopg2://...",
                "psycopg2": "pip install psycopg2-binary (in kd's dev extra)",
            }.get(str(err.name), f"pip install {err.name}")
            raise ModuleNotFoundError(f"tracking.uri {self.uri} needs the Python package {err.name!r}, which is not installed: {hint}",
                                      name=err.name) from err
        except MlflowException as err:
            if "unsupported URI" not in str(err):
                raise
            raise ValueError(
                f"tracking.uri {self.uri!r} is not a store MLflow can use: sqlite:///<file>, "
                "http(s)://<server>, postgresql://..., mysql://... or a folder (MLflow's deprecated file store)"
            ) from err

    def _get_or_create_experiment(self, artifact_root: Path | None) -> str:
        self.client = MlflowClient(tracking_uri=self.uri)
        existing = self.client.get_experiment_by_name(self.experiment_name)
        if existing is not None:
            if existing.tags.get(EXPERIMENT_KIND[0]) is None:  # a store kd made before it set the kind
                self.client.set_experiment_tag(existing.experiment_id, *EXPERIMENT_KIND)
            close_dead_runs(self.client, existing.experiment_id)  # the next run against the store closes dead ones
            return existing.experiment_id
        local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        # a server keeps artifacts where it was told to (proxied); only a local store gets ours
        location = artifact_root.resolve().as_uri() if artifact_root is not None and local else None
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # a parallel job created it first
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    @contextmanager
    def open_run(self, name: str, tags: Mapping[str, str]) -> Iterator[str]:
        """Create a run, yield its id, and always terminate it: FINISHED or FAILED."""
        if not self.enabled:
            yield ""
            return
        parent = os.environ.get(PARENT_ENV)  # a job of a sweep: a child of the sweep's run
        tags = owner_tags() | dict(tags) | ({PARENT_TAG: parent} if parent and PARENT_TAG not in tags else {})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        # Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which writes
        # $MLFLOW_TRACKING_URI; put the user's value back so a later run in this process (or a
        # child it starts) resolves its own store.
        saved_env = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            yield run_id
            if run_id not in self._failed:  # a pack's student that failed alone stays FAILED
                self.client.set_terminated(run_id, "FINISHED")  # inside: a signal during this write still fails the run
        except BaseException as err:
            if run_id not in self._failed:
                self._fail(run_id, err)
            raise
        finally:
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env

    def fail(self, run_id: str, err: BaseException) -> None:
        """End the open run ``run_id`` FAILED now, with ``err`` as the reason (one student of a
        pack); its ``open_run`` then leaves it so."""
        self._fail(run_id, err)

    def _fail(self, run_id: str, err: BaseException) -> None:
        self._failed.add(run_id)
        cause = err
        if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
            cause = err.__context__  # Lightning turns Ctrl-C into sys.exit(1)
        reason = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            reason = f"interrupted ({reason})"
        try:
            self._retrying(lambda: self.client.set_tag(run_id, "kd.failure", reason[:5000]))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "traceback.txt"
                path.write_text("".join(traceback.format_exception(err)))
                self.client.log_artifact(run_id, str(path))
        finally:
            self._retrying(lambda: self.client.set_terminated(run_id, "FAILED"))
            log.error("MLflow run %s marked FAILED: %s", run_id, reason)

    def _retrying(self, write: Any) -> None:
        """A write that closes a failed run. An interrupt inside an earlier SQL write can leave this
        process's own connection holding the store's write lock ("database is locked"): drop the
        store's pooled connections (their transactions roll back) and write once more."""
        try:
            write()
        except Exception:
            engine = getattr(getattr(self.client._tracking_client, "store", None), "engine", None)  # SQL stores only
            if engine is None:
                raise
            engine.dispose()
            write()

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches. A value longer than MLflow allows is not truncated silently:
        the param says where the full value is (the ``config.yaml`` artifact) and a warning is logged."""
        if not self.enabled:
            return
        entries = []
        for key, value in params.items():
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                log.warning("param %s is %d characters, over MLflow's %d: see config.yaml", key, len(text), MAX_PARAM_VAL_LENGTH)
                text = f"<{len(text)} characters: see the config.yaml artifact>"
            entries.append(Param(key, text))
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_config(self, run_id: str, container: dict[str, Any]) -> None:
        """The resolved config (a plain container): flattened into params, and whole as ``config.yaml``."""
        if not self.enabled:
            return
        # a reproduce block's paper facts (rows, claims) describe the paper, not the run: the
        # run keeps reproduce.paper and reproduce.setting (also tags), config.yaml keeps all
        params = {k: v for k, v in flatten(container).items() if not k.startswith("reproduce.") or k in _REPRODUCE_PARAMS}
        self.log_params(run_id, params)
        self.log_text(run_id, OmegaConf.to_yaml(container), "config.yaml")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.enabled or not metrics:
            return
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if self.enabled and tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finished_run(self, config_hash: str) -> dict[str, float] | None:
        """The metrics of a FINISHED student run of this experiment with ``config_hash``, if any."""
        if not self.enabled:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`kd.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return dict(runs[0].data.metrics) | {"run_id": runs[0].info.run_id} if runs else None

    def lightning_logger(self, run_id: str) -> RunLogger | bool:
        """A Lightning logger writing into ``run_id``, or False (no logger) when disabled."""
        if not self.enabled:
            return False
        return RunLogger(experiment_name=self.experiment_name, tracking_uri=self.uri, run_id=run_id)

    def ui_command(self) -> str:
        """The command that opens this store in the MLflow UI."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        beside = Path(sys.executable).parent / "mlflow"  # the virtualenv's own mlflow, if any
        telemetry = "MLFLOW_DISABLE_TELEMETRY=true " if os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true" else ""
        return f"{telemetry}{beside if beside.exists() else 'mlflow'} ui --backend-store-uri {self.uri}"


def hydra_context() -> dict[str, Any]:
    """What Hydra knows about this job: the config-group choices (for run names) and, in a
    multirun, tags that group the sweep's jobs (``kd.sweep``, ``kd.job``, ``kd.overrides``).
    Empty when the config was composed without ``@hydra.main`` (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"choices": {}, "tags": {}}
    hc = HydraConfig.get()
    tags = {"kd.overrides": " ".join(hc.overrides.task) or "(defaults)"}
    if hc.mode == RunMode.MULTIRUN:
        tags |= {"kd.sweep": str(hc.sweep.dir), "kd.job": str(hc.job.num)}
    return {"choices": dict(hc.runtime.choices), "tags": tags}

"""A multirun as one MLflow parent run: a Hydra callback (``hydra.callbacks.sweep_run`` in
``conf/config.yaml``) that, in the launching process, opens the sweep's run before any job
starts, and closes it when the sweep ends: FINISHED when every job finished, FAILED (with how
many did not) otherwise, also when the sweep is interrupted. Every run a job opens, students and
the teachers they train, becomes its child (``mlflow.parentRunId``, through ``$KD_SWEEP_RUN_ID``,
which joblib and submitit workers inherit). The same for the basic, joblib and submitit
launchers and the Optuna sweeper: they all start from this process.

The parent records the command, the swept keys and their values; the jobs' names lead with the
swept values (``$KD_SWEPT_KEYS``); the sweep ends with a table of its jobs and the ``kd.report``
command that compares them.
"""

from __future__ import annotations

import atexit
import os
import shlex
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import ViewType
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from kd.run.config import experiment_name
from kd.tracking import keys
from kd.tracking.store import resolve_uri
from kd.tracking.tracker import PARENT_ENV, PARENT_TAG, Tracker

SWEPT_ENV = "KD_SWEPT_KEYS"
SHORT = {"distill.temperature": "T", "distill.alpha": "a"}  # as the objective describes itself


def short_name(key: str) -> str:
    """How a run name spells a swept key: ``distill.temperature`` -> ``T``, ``prune.sparsity`` -> ``sparsity``."""
    return SHORT.get(key, key.rsplit(".", 1)[-1])


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: command-line sweeps (``a=1,2``, ``range(...)``) and the
    Optuna sweeper's search space (``hydra.sweeper.params``)."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    found = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([*found, *(str(k) for k in params)]))


class SweepRun(Callback):
    """The sweep's parent run (see the module docstring)."""

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.run_id = ""
        self.swept: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        output_root = Path(config.paths.output_root)
        self.tracker = Tracker(resolve_uri(config.tracking.uri, output_root), experiment_name(config), output_root / "mlartifacts")
        self.swept = swept_keys(config)
        overrides = list(config.hydra.overrides.task)
        sweep = str(config.hydra.sweep.dir)
        name = "sweep " + (" × ".join(short_name(k) for k in self.swept) or "(no swept keys)") + f" · {Path(sweep).name}"
        tags = {"kd.role": "sweep", "kd.sweep": sweep, "kd.swept": ",".join(self.swept),
                "kd.command": shlex.join(["python", "run.py", "-m", *overrides])}  # fmt: skip
        self.run_id = self.tracker.client.create_run(self.tracker.experiment_id, run_name=name, tags=tags).info.run_id
        values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
        self.tracker.log_params(self.run_id, {f"sweep.{k}": values.get(k, "(searched)") for k in self.swept})
        os.environ[PARENT_ENV], os.environ[SWEPT_ENV] = self.run_id, ",".join(self.swept)
        atexit.register(self._close, interrupted=True)  # Ctrl-C or a failed job: the parent still ends

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(interrupted=False)

    def _close(self, interrupted: bool) -> None:
        if self.tracker is None or not self.run_id:
            return
        run_id, self.run_id = self.run_id, ""
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        client = self.tracker.client
        children = client.search_runs([self.tracker.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", ViewType.ACTIVE_ONLY,
                                      order_by=["attributes.start_time ASC"])  # fmt: skip
        students = [r for r in children if r.data.tags.get("kd.role") == "student"]
        failed = sum(r.info.status != "FINISHED" for r in students)
        ok = bool(students) and not failed and not interrupted
        client.set_tag(run_id, "kd.jobs", f"{len(students) - failed} of {len(students)} finished" + (" (the sweep ended early)" if interrupted else ""))
        if failed or interrupted:
            client.set_tag(run_id, "kd.failed_jobs", str(failed))
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
        _print_jobs(students, self.swept, run_id, self.tracker, client.get_run(run_id).data.tags["kd.sweep"], ok)


def _print_jobs(students: list, swept: list[str], run_id: str, tracker: Tracker, sweep: str, ok: bool) -> None:
    table = Table(title=f"sweep: {len(students)} job(s), parent run {run_id} ({'FINISHED' if ok else 'FAILED'})", title_justify="left")
    for column in ["job", "status", *swept, keys.TEST_ACC, keys.VAL_ACC_BEST]:
        table.add_column(column, justify="left" if column in ("job", "status") else "right")
    for r in sorted(students, key=lambda r: int(r.data.tags.get("kd.job", "0"))):
        metrics = r.data.metrics
        table.add_row(r.data.tags.get("kd.job", "?"), r.info.status, *(r.data.params.get(k, "?") for k in swept),
                      *(f"{metrics[k]:.2%}" if k in metrics else "-" for k in (keys.TEST_ACC, keys.VAL_ACC_BEST)))  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"compare: .venv/bin/python -m kd.report --experiment {tracker.experiment_name} --sweep {sweep}", soft_wrap=True)
    console.print(f"MLflow: {tracker.ui_command()}", soft_wrap=True)

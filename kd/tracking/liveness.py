"""Runs whose process is gone: a run records where it runs (host, pid, the process's start time),
and :func:`close_dead_runs` marks KILLED the RUNNING runs of this host whose process no longer
exists (SIGKILL, the out-of-memory killer, a reboot), with the reason in ``kd.failure``."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc``), "" where unknown: with
    the pid it names one process, so a reused pid is not taken for the run's own."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid: alive, and not ours to judge
    return not started or _started(pid) in ("", started)


def owner_tags() -> dict[str, str]:
    """Where a run's process lives: what :func:`close_dead_runs` checks later."""
    return {"kd.host": socket.gethostname(), "kd.pid": str(os.getpid()), "kd.pid_start": _started(os.getpid())}


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED, with the reason in ``kd.failure``, the RUNNING runs of this host whose process
    is gone (SIGKILL, out of memory, a reboot); returns their ids. Runs of other hosts are left
    alone: from here nothing tells whether their process lives."""
    host, closed = socket.gethostname(), []
    running = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`kd.host` = '{host}'", ViewType.ACTIVE_ONLY)
    for run in running:
        tags = run.data.tags
        if not tags.get("kd.pid", "").isdigit() or _alive(int(tags["kd.pid"]), tags.get("kd.pid_start", "")):
            continue
        client.set_tag(run.info.run_id, "kd.failure", f"its process ({host}, pid {tags['kd.pid']}) ended without closing the run "
                                                      "(killed by SIGKILL or out of memory, or the machine went down)")  # fmt: skip
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d MLflow run(s) whose process is gone (KILLED): %s", len(closed), ", ".join(closed))
    return closed

"""One line per phase of a run after training (testing, the compression stages, measuring,
logging), with its time, so the minute between the last epoch and the summary is never silent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console

_console = Console(stderr=True, highlight=False)


@contextmanager
def phase(what: str) -> Iterator[None]:
    """``with phase("testing the selected epoch"): ...`` prints ``what ...``, then ``what: <seconds> s`` (rank zero only)."""
    if rank_zero_only.rank != 0:
        yield
        return
    start = time.perf_counter()
    _console.print(f"[dim]kd:[/dim] {what} ...")  # a line of its own: Lightning may log in between
    try:
        yield
    except BaseException:
        _console.print(f"[dim]kd:[/dim] {what}: failed after {time.perf_counter() - start:.1f} s")
        raise
    _console.print(f"[dim]kd:[/dim] {what}: {time.perf_counter() - start:.1f} s")

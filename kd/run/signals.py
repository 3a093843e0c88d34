"""SIGTERM (a scheduler's stop, ``kill``) ends a run the way Ctrl-C does: every MLflow run it opened
closes FAILED with the reason, and the process exits with status 143 (128 + 15), so
``run.py && next`` and schedulers never read a killed run as a success.

Lightning installs its own handler during fit and raises its ``SIGTERMException``, a
``SystemExit`` without a code (exit status 0); outside fit (testing, measuring, logging) it
restores the previous handler, which without this was the default: the process died with its
runs left RUNNING."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pytorch_lightning.utilities.exceptions import SIGTERMException

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """Raised where the process was when SIGTERM arrived; exits with status 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_STATUS)

    def __str__(self) -> str:
        return "SIGTERM"


def _raise(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_ends_the_run() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (open runs close FAILED), and Lightning's
    ``SIGTERMException`` becomes one (status 143)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    except SIGTERMException as err:
        raise Terminated() from err
    finally:
        signal.signal(signal.SIGTERM, previous)

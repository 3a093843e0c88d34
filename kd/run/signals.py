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


_received: list[int] = []  # the signals that reached the run (see sigterm_ends_the_run)


def _raise(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Terminated()


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler


@contextmanager
def sigterm_ends_the_run() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (open runs close FAILED), and Lightning's
    ``SIGTERMException`` becomes one (status 143).

    A signal's exception is raised wherever the main thread is, and Python drops one raised inside
    a finalizer or a weakref callback ("Exception ignored in ..."): the signal test caught Ctrl-C
    landing in SQLAlchemy's garbage-collection hook while MLflow created its store, and the run
    carried on and exited 0. So the handlers also record the signal, and a block that completes
    after one was received re-raises it at its end: the work done is kept (its runs may be
    FINISHED), the exit status says it was interrupted."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous, previous_int = signal.signal(signal.SIGTERM, _raise), signal.signal(signal.SIGINT, _interrupt)
    del _received[:]
    try:
        yield
    except SIGTERMException as err:
        raise Terminated() from err
    else:
        if _received:  # a signal whose exception something swallowed
            raise Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

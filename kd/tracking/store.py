"""The tracking store's location and the creation of a new local one.

A job's first run against a new SQLite store waits for MLflow to migrate an empty database
through its whole schema history (2-3 s on a 2-core CPU, a tenth of the default job). The
migration needs nothing from the job, so ``stage_in_background`` starts it in a child process
the moment the config is composed (a Hydra callback, ``kd.run.early_store``), on another core
while this process imports torch and Lightning. The child migrates a file in the temporary
folder; ``Tracker`` takes it (``take_staged``) when it first connects, under the store's lock,
or creates the store itself when no child ran or it failed. A job that stops before its tracker
connects (a bad value in the config) leaves no store behind: the staged file is removed at exit.

Imports only the standard library: this runs before the heavy imports it overlaps with.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STAGE_TIMEOUT_S = 120.0  # a child slower than this is abandoned; the tracker creates the store itself


def resolve_uri(uri: str | None, output_root: Path) -> str:
    """The tracking URI: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    file under ``output_root`` (the embedded default: no server)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(output_root / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def migrate_new_store(path: Path, artifact_root: Path) -> None:
    """Let MLflow create and migrate an empty store at ``path`` (which must not exist), its
    default experiment's artifacts under ``artifact_root``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{path}", str(artifact_root))
    store.engine.dispose()


def _replace_atomically(db: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` creates a complete store at a new path beside ``db``, which then replaces
    ``db`` in one rename. A signal meanwhile leaves a stray temporary file, never a half-written
    store that every later run would fail on."""
    fd, name = tempfile.mkstemp(dir=db.parent, prefix=f".{db.name}.", suffix=".creating")  # a new name each time:
    os.close(fd)  # MLflow keeps an engine per URI, and a failed attempt's must not be reused
    beside = Path(name)
    beside.unlink()  # write() creates the file itself, with the umask's mode
    try:
        write(beside)
        os.replace(beside, db)
    finally:
        beside.unlink(missing_ok=True)


def create_store(db: Path) -> None:
    """Create a new SQLite store at ``db`` here, atomically."""
    _replace_atomically(db, lambda path: migrate_new_store(path, db.parent / "mlartifacts"))


class _Staged:
    """A child process migrating a new store for ``db`` into a temporary folder."""

    def __init__(self, db: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kd-store-"))
        self.file = self.folder / db.name
        command = [sys.executable, "-m", "kd.tracking.store", str(self.file), str(db.parent / "mlartifacts")]
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def take(self, db: Path) -> bool:
        """Wait for the child; move its store to ``db`` (atomically: a copy beside ``db``, then
        a rename) and return True, or return False when it failed or took too long."""
        try:
            _, err = self.child.communicate(timeout=STAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.communicate()
            log.warning("the MLflow store's background creation took over %.0f s: creating it here", STAGE_TIMEOUT_S)
            return False
        if self.child.returncode != 0 or not self.file.is_file():
            last = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            log.warning("the MLflow store's background creation failed (exit %s%s): creating it here",
                        self.child.returncode, f": {last[0]}" if last else "")  # fmt: skip
            return False
        _replace_atomically(db, lambda path: shutil.copyfile(self.file, path))
        log.info("MLflow store %s: migrated in the background while the job started", db)
        return True

    def discard(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.communicate()
        shutil.rmtree(self.folder, ignore_errors=True)


_staged: dict[Path, _Staged] = {}


def _discard_all() -> None:
    for staged in _staged.values():
        staged.discard()
    _staged.clear()


atexit.register(_discard_all)


def stage_in_background(uri: str) -> bool:
    """Start migrating a new store for ``uri`` in a child process when it is a local SQLite file
    that does not exist yet (and this is not a secondary DDP rank, which logs nothing). True
    when a child was started."""
    db = sqlite_path(uri)
    if db is None or db.exists() or db in _staged or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    try:
        _staged[db] = _Staged(db)
    except OSError as err:  # no temporary folder, no fork: the tracker creates the store later
        log.debug("no background creation of the MLflow store: %s", err)
        return False
    return True


def take_staged(db: Path) -> bool:
    """Put the store staged for ``db`` in place (see ``_Staged.take``); False when none was
    staged or it failed. The caller holds the store's lock and has seen that ``db`` does not exist."""
    staged = _staged.pop(db, None)
    if staged is None:
        return False
    try:
        return staged.take(db)
    finally:
        staged.discard()


if __name__ == "__main__":  # the child: python -m kd.tracking.store <new file> <artifact root>
    migrate_new_store(Path(sys.argv[1]), Path(sys.argv[2]))

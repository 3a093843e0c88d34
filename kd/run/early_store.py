"""A Hydra callback (``hydra.callbacks.early_store`` in ``conf/config.yaml``, listed first) that
starts migrating a new local MLflow store as soon as the config is composed, before Hydra
imports the other callbacks and the job imports torch and Lightning (``kd.tracking.store``).
Light on purpose: it imports no torch, Lightning or MLflow."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from kd.tracking.store import resolve_uri, stage_in_background


class EarlyStore(Callback):
    """Stage a new store for ``uri`` (``tracking.uri``; null: the default under ``output_root``)."""

    def __init__(self, uri: str | None, output_root: str) -> None:
        stage_in_background(resolve_uri(uri, Path(output_root)))

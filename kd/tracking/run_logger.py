"""The Lightning logger of a run that ``kd.tracking.tracker.Tracker`` owns: Lightning's MLflow
logger, its metrics written in batches, the run's status left to the tracker."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from lightning_fabric.utilities.logger import _add_prefix
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_METRICS_PER_BATCH
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger attached to a run that ``Tracker`` owns.

    ``MLFlowLogger.finalize`` marks the run FINISHED when ``trainer.fit`` returns, before the
    test stage and the measurements are logged; the run's status is the tracker's business.
    Here ``finalize`` (Lightning calls it when a fit or test ends, and when one fails) only
    writes what is buffered.

    Metrics are written in batches: every ``log_metrics`` call is kept (its values, step and
    timestamp, as Lightning would write them) and the buffer goes to MLflow in one ``log_batch``
    once ``flush_every_s`` have passed since the last write. A SQL store spends about 10 ms of
    CPU per write whatever its size, and Lightning writes twice per epoch (training, validation):
    on the default job that was 1.5 s of 20. The MLflow UI lags the training by at most
    ``flush_every_s``.
    """

    def __init__(self, *args: Any, flush_every_s: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flush_every_s = flush_every_s
        self._pending: list[Metric] = []
        self._last_write = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        for key, value in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, str):  # as Lightning's own logger: strings are not metrics
                log.warning("Discarding metric with string value %s=%s.", key, value)
                continue
            clean = re.sub("[^a-zA-Z0-9_/. -]+", "", key)  # the characters MLflow allows in a key, as Lightning's
            if clean != key:
                log.warning("MLflow allows only '_', '/', '.' and ' ' in metric names: %s logged as %s", key, clean)
            self._pending.append(Metric(clean, float(value), now, step or 0))
        if len(self._pending) >= MAX_METRICS_PER_BATCH or time.monotonic() - self._last_write >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Write the buffered metrics now (in batches of MLflow's maximum)."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.experiment.log_batch(run_id=self.run_id, metrics=pending[start : start + MAX_METRICS_PER_BATCH])
        self._last_write = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()

"""The warnings and log lines a correct run triggers, filtered narrowly in one place (applied at
import of ``kd.run.experiment``; the tests apply them again inside pytest's per-test capture)."""

from __future__ import annotations

import logging
import warnings


class _NoAdverts(logging.Filter):
    """Lightning 2.6 logs an advert for its cloud logger at every Trainer construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())


def ignore_known_warnings() -> None:
    """Filter, narrowly, the warnings a correct run triggers (called at import; tests call it
    again inside pytest's per-test warning capture)."""
    # Lightning reports the frozen teacher as "modules in eval mode" at fit start: intended.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # Loss terms and metrics are logged per epoch, so a short epoch is no reason to warn.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; not ours to fix.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # torch 2.14 deprecates torch.ao.quantization (FX) for torchao's PT2E; it is still the path with
    # int8 CPU kernels here (callbacks/quantization.py keeps it behind one function to move later).
    warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
    # torch.load(weights_only=True) of quantized tensors goes through a TypedStorage path of torch's own
    warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")


ignore_known_warnings()

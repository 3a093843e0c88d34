"""The metric keys a run writes, named once: the run, the stages, the summary, the report and the
registry all spell them from here, so a key renamed here is renamed everywhere (and a typo is a
NameError, not a silently empty column).

A key is ``family/name``. The families:

- ``train/``, ``val/``, ``test/``: Lightning's per-epoch logs of the student (``val/acc`` per
  epoch, ``val/acc_best`` of the selected epoch, ``test/acc`` of that epoch);
- ``model/``: the student as saved (``student.pt``): sizes, MACs, latency, sparsity;
- ``dense/``: the student before the stage that reshaped it (pruning, factorisation) changed it;
  ``<stage>/*_reduction`` are ``dense/*`` over ``model/*``;
- ``teacher/``: the teacher, measured like the student;
- ``quant/``, ``prune/``, ``factorize/``: what each compression stage reports about itself;
- ``omit/``: the omitted-classes experiment (Hinton et al. 2015, section 3);
- ``export/``: the exported files checked in onnxruntime (``export/float/*``, ``export/int8/*``);
- ``exit/``: a multi-exit student's early exits (``exit/<name>/*`` per exit, the chosen
  threshold's test accuracy and average MACs).

Params are the resolved config flattened (:func:`flatten`: ``distill.temperature``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODEL, DENSE, TEACHER, QUANT, PRUNE, FACTORIZE, OMIT = "model", "dense", "teacher", "quant", "prune", "factorize", "omit"
EXPORT, EXIT = "export", "exit"

VAL_ACC = "val/acc"  # per epoch
VAL_ACC_BEST = "val/acc_best"  # the validation-selected epoch's: what a sweeper optimises
TEST_ACC = "test/acc"  # of the validation-selected epoch (or of the stage-changed model)
SELECTION = "val/acc_at_target"  # val/acc in epochs every stage counts, 0 in the others (ModelCheckpoint monitors it)
TEACHER_TEST_ACC = "teacher/test_acc"
COMPRESSION_RATIO = "model/compression_ratio"  # teacher params / student params
SIZE_RATIO = "model/size_ratio"
MACS_RATIO = "model/macs_ratio"
PARAMS, NONZERO, SIZE, SIZE_ZIP, SIZE_SPARSE, MACS = "params", "nonzero_params", "size_bytes", "size_bytes_zip", "size_bytes_sparse", "macs"
LATENCY = "latency_ms_b"  # + batch size: latency_ms_b1, latency_ms_b256


def key(family: str, name: str) -> str:
    """``family/name``."""
    return f"{family}/{name}"


def prefixed(family: str, values: Mapping[str, float]) -> dict[str, float]:
    """``values`` under ``family/`` (a measurement's ``params`` -> ``model/params``)."""
    return {key(family, name): value for name, value in values.items()}


def latency_batches(metrics: Mapping[str, float], family: str | None = None) -> list[str]:
    """The batch sizes (as written in the key: ``"1"``, ``"256"``) whose latency ``metrics``
    holds under ``family/`` (None: a measurement's own, unprefixed keys)."""
    start = LATENCY if family is None else key(family, LATENCY)
    return [k.removeprefix(start) for k in metrics if k.startswith(start)]


def reduction_ratios(metrics: Mapping[str, float], stage: str) -> dict[str, float]:
    """``stage/*_reduction`` and ``stage/speedup_b*``: the dense student over the saved one."""
    dense, model = (lambda name: metrics[key(DENSE, name)]), (lambda name: metrics[key(MODEL, name)])
    ratios = {
        key(stage, "param_reduction"): dense(PARAMS) / model(PARAMS),
        key(stage, "nonzero_reduction"): dense(PARAMS) / max(model(NONZERO), 1),
        key(stage, "size_reduction_zip"): dense(SIZE) / model(SIZE_ZIP),
        key(stage, "size_reduction_sparse"): dense(SIZE) / model(SIZE_SPARSE),
    }
    if metrics.get(key(MODEL, MACS)):
        ratios[key(stage, "mac_reduction")] = dense(MACS) / model(MACS)
    for batch in latency_batches(metrics, DENSE):
        ratios[key(stage, f"speedup_b{batch}")] = dense(LATENCY + batch) / model(LATENCY + batch)
    return ratios


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay whole)."""
    flat: dict[str, Any] = {}
    for part, value in tree.items():
        name = f"{prefix}{part}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

"""The metric-key schema (kd/tracking/keys.py) against hand-written keys and ratios."""

from __future__ import annotations

import pytest

from kd.tracking import keys


def test_families_and_fixed_keys_are_spelled_as_runs_and_reports_read_them():
    assert (keys.MODEL, keys.DENSE, keys.TEACHER, keys.QUANT, keys.PRUNE, keys.FACTORIZE, keys.OMIT) == (
        "model", "dense", "teacher", "quant", "prune", "factorize", "omit")  # fmt: skip
    assert (keys.VAL_ACC, keys.VAL_ACC_BEST, keys.TEST_ACC, keys.SELECTION, keys.TEACHER_TEST_ACC) == (
        "val/acc", "val/acc_best", "test/acc", "val/acc_at_target", "teacher/test_acc")  # fmt: skip
    assert (keys.COMPRESSION_RATIO, keys.SIZE_RATIO, keys.MACS_RATIO) == ("model/compression_ratio", "model/size_ratio", "model/macs_ratio")
    assert (keys.PARAMS, keys.NONZERO, keys.SIZE, keys.SIZE_ZIP, keys.SIZE_SPARSE, keys.MACS, keys.LATENCY) == (
        "params", "nonzero_params", "size_bytes", "size_bytes_zip", "size_bytes_sparse", "macs", "latency_ms_b")  # fmt: skip


def test_key_and_prefixed_put_a_measurement_under_its_family():
    assert keys.key("model", "params") == "model/params"
    assert keys.prefixed("teacher", {"params": 3, "macs": 7}) == {"teacher/params": 3, "teacher/macs": 7}
    assert keys.prefixed("model", {}) == {}


def test_latency_batches_reads_the_batch_sizes_of_one_family_only():
    metrics = {"model/latency_ms_b1": 1.0, "model/latency_ms_b256": 2.0, "dense/latency_ms_b64": 3.0, "latency_ms_b8": 4.0,
               "model/latency_spread_b1": 0.1, "model/params": 9}  # fmt: skip
    assert keys.latency_batches(metrics, "model") == ["1", "256"]
    assert keys.latency_batches(metrics, "dense") == ["64"]
    assert keys.latency_batches(metrics) == ["8"]  # a measurement's own, unprefixed keys
    assert keys.latency_batches({}, "model") == []


def test_reduction_ratios_are_the_dense_student_over_the_saved_one():
    dense = {"params": 1000, "size_bytes": 4000, "macs": 900, "latency_ms_b1": 2.0, "latency_ms_b256": 10.0}
    saved = {"params": 400, "nonzero_params": 100, "size_bytes_zip": 800, "size_bytes_sparse": 500, "macs": 300,
             "latency_ms_b1": 1.0, "latency_ms_b256": 4.0}  # fmt: skip
    metrics = keys.prefixed("dense", dense) | keys.prefixed("model", saved)
    assert keys.reduction_ratios(metrics, "prune") == {
        "prune/param_reduction": 1000 / 400, "prune/nonzero_reduction": 1000 / 100, "prune/size_reduction_zip": 4000 / 800,
        "prune/size_reduction_sparse": 4000 / 500, "prune/mac_reduction": 900 / 300,
        "prune/speedup_b1": 2.0 / 1.0, "prune/speedup_b256": 10.0 / 4.0,
    }  # fmt: skip


def test_reduction_ratios_survive_a_student_with_no_weights_left_and_no_macs():
    metrics = keys.prefixed("dense", {"params": 10, "size_bytes": 40}) | keys.prefixed(
        "model", {"params": 10, "nonzero_params": 0, "size_bytes_zip": 8, "size_bytes_sparse": 4, "macs": 0})
    found = keys.reduction_ratios(metrics, "factorize")
    assert found["factorize/nonzero_reduction"] == 10 / 1  # max(non-zeros, 1): no division by zero
    assert "factorize/mac_reduction" not in found and not any("speedup" in k for k in found)
    one = keys.reduction_ratios(metrics | {"model/nonzero_params": 1}, "factorize")
    assert one["factorize/nonzero_reduction"] == 10 / 1


@pytest.mark.parametrize(("tree", "flat"), [
    ({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}, {"a.b": 1, "a.c.d": "x", "e": [1, 2]}),
    ({"a": {}, "b": None}, {"a": {}, "b": None}),  # an empty group stays a value (a param "{}")
    ({}, {}),
])  # fmt: skip
def test_flatten_joins_nested_keys_with_dots_and_keeps_lists_whole(tree, flat):
    assert keys.flatten(tree) == flat
    assert keys.flatten({"x": 1}, "pre.") == {"pre.x": 1}

"""Measurement against hand counts: parameters, non-zeros, the sparse format's bytes, layer
sparsity, MACs, accuracy and agreement (each boundary on both sides)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.tracking.measure import (Measurement, accuracy, agreement, count_macs, count_nonzero, count_params, layer_sparsity,
                                 measure, sparse_bytes)  # fmt: skip


def _mlp(zero_first: int = 0) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        model[0].weight.view(-1)[:zero_first] = 0.0
    return model


def test_parameters_and_non_zeros_are_counted_element_by_element():
    assert count_params(_mlp()) == 3 * 4 + 4 + 4 * 2 + 2 == 26
    assert count_nonzero(_mlp()) == 26
    assert count_nonzero(_mlp(zero_first=5)) == 21


REST = 4 * (4 + 8 + 2)  # the first layer's bias, the second layer: dense float32


@pytest.mark.parametrize(("zeros", "expected"), [
    (0, 4 * 12 + REST),  # 12 non-zeros: dense (48 bytes) beats values + 1-byte indices (60)
    (6, 6 * (4 + 1) + REST),  # 6 non-zeros: 30 bytes sparse beats 48 dense
    (11, 1 * (4 + 1) + REST),  # one non-zero left
    (12, 0 + REST),  # an emptied tensor stores nothing
])  # fmt: skip
def test_each_tensor_is_stored_dense_or_as_values_and_indices_whichever_is_smaller(zeros, expected):
    assert sparse_bytes(_mlp(zero_first=zeros)) == expected


def test_the_index_width_grows_with_the_tensor():
    big = nn.Linear(300, 1, bias=False)  # 300 elements: indices need 2 bytes (> 255)
    with torch.no_grad():
        big.weight.zero_()[0, :10] = 1.0
    assert sparse_bytes(big) == 10 * (4 + 2)
    small = nn.Linear(256, 1, bias=False)  # 256 elements: indices 0..255 fit one byte
    with torch.no_grad():
        small.weight.zero_()[0, :10] = 1.0
    assert sparse_bytes(small) == 10 * (4 + 1)


def test_buffers_count_dense():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    buffers = 2 * 4 + 2 * 4 + 8  # running mean, running var (float32), num_batches_tracked (int64)
    # the linear weight and BN's weight (ones) dense; BN's bias starts at zero: stored as nothing
    assert sparse_bytes(model) == 4 * 4 + 2 * 4 + 0 + buffers


def test_layer_sparsity_is_the_zero_fraction_of_each_weight():
    model = _mlp(zero_first=3)
    assert layer_sparsity(model) == {"0": 3 / 12, "2": 0.0}


def test_macs_of_linear_layers_are_in_times_out():
    assert count_macs(_mlp(), (3,)) == 3 * 4 + 4 * 2


def test_measure_reports_every_quantity_and_latency_only_when_asked():
    model = _mlp(zero_first=6)
    quiet = measure(model, (3,), latency=False)
    assert quiet["params"] == 26 and quiet["nonzero_params"] == 20 and quiet["sparsity_all"] == pytest.approx(6 / 26)
    assert quiet["macs"] == 20 and quiet["size_bytes_sparse"] == sparse_bytes(model) and "latency_ms_b1" not in quiet
    timed = Measurement(large_batch=8, latency=True)(model, (3,))
    assert {"latency_ms_b1", "latency_ms_b8"} <= set(timed) and timed["latency_ms_b8"] > 0
    assert measure(nn.Sequential(), (3,), latency=False)["sparsity_all"] == 0.0  # no parameters: not a division by zero


def test_accuracy_and_agreement_against_hand_counts():
    x = torch.eye(3)
    identity = nn.Identity()
    assert accuracy(identity, x, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(identity, x, torch.tensor([0, 1, 2]), batch_size=2) == 1.0  # batches add up
    shifted = nn.Sequential(nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        shifted[0].weight.copy_(torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0.5]]))  # logits row i = column i of W
    found = agreement(identity, shifted, x)
    with torch.no_grad():
        z, zq = torch.eye(3), shifted(torch.eye(3))
    assert found["argmax_agreement"] == pytest.approx(float((z.argmax(1) == zq.argmax(1)).float().mean()))
    assert found["logit_rel_error"] == pytest.approx(float((zq - z).norm() / z.norm()))


def test_sizes_on_disk_grow_with_the_weights_and_zeros_compress():
    from kd.tracking.measure import state_dict_bytes, zip_bytes

    empty, small, large = nn.Sequential(), nn.Linear(4, 4), nn.Linear(64, 64)
    assert state_dict_bytes(empty) < state_dict_bytes(small) < state_dict_bytes(large)
    assert state_dict_bytes(large) > 64 * 64 * 4  # the float32 weights are in the file
    zeros = nn.Linear(64, 64)
    with torch.no_grad():
        zeros.weight.zero_()
    assert zip_bytes(zeros) < zip_bytes(large) / 4 and zip_bytes(empty) < zip_bytes(small)


def test_macs_of_a_convolution_count_every_output_position():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    macs = count_macs(model, (1, 8, 8))
    assert macs == 2 * 6 * 6 * 9 + 72 * 4 and isinstance(macs, int)  # one sample of the batch dimension


def test_measuring_leaves_the_model_as_it_was_and_names_every_quantity():
    model = _mlp(zero_first=6).train()
    found = measure(model, (3,), large_batch=4)  # latency on by default
    assert all(m.training for m in model.modules())  # measured on a copy in eval mode
    assert set(found) == {"params", "nonzero_params", "sparsity_all", "size_bytes", "size_bytes_zip", "size_bytes_sparse",
                          "macs", "latency_ms_b1", "latency_ms_b4", "latency_spread_b1", "latency_spread_b4"}  # fmt: skip
    assert "latency_ms_b256" in measure(model, (3,))  # the default large batch
    assert not any(k.startswith("latency") for k in Measurement(large_batch=4, latency=False)(model, (3,)))


def test_a_quantized_model_is_measured_by_its_file_and_latency():
    from kd.tracking.measure import measure_quantized, state_dict_bytes, zip_bytes

    model = _mlp()
    sizes = {"size_bytes": state_dict_bytes(model), "size_bytes_zip": zip_bytes(model)}
    assert measure_quantized(model, (3,), large_batch=4, latency=False) == sizes
    timed = Measurement(large_batch=4).quantized(model, (3,))
    assert set(timed) == {*sizes, "latency_ms_b1", "latency_ms_b4", "latency_spread_b1", "latency_spread_b4"}
    assert all(timed[k] > 0 for k in timed if "spread" not in k)
    assert "latency_ms_b256" in measure_quantized(model, (3,)) and "latency_ms_b4" not in Measurement(4, False).quantized(model, (3,))


def test_latency_is_the_forward_pass_in_milliseconds():
    import time

    from kd.tracking.measure import latency_ms

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    x = torch.randn(64, 256)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(50):
            model(x)
        by_hand = (time.perf_counter() - start) / 50 * 1e3
    measured = latency_ms(model, (256,), 64)
    assert by_hand / 10 < measured < by_hand * 10  # the same order: milliseconds of this forward, not of `pass`
    assert measure(model, (256,), large_batch=64)["latency_ms_b1"] > 0


class _Clocked(nn.Module):
    """A forward pass that takes the next of ``durations`` (seconds) on a fake clock, and notes
    the thread count it ran with."""

    def __init__(self, durations: list[float]) -> None:
        super().__init__()
        self.now, self.durations, self.threads = 0.0, list(durations), []

    def clock(self) -> float:
        return self.now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.now += self.durations.pop(0)
        self.threads.append(torch.get_num_threads())
        return x


def test_quick_timing_reports_the_median_and_the_interquartile_spread_of_its_passes():
    from kd.tracking.measure import MIN_REPEATS, WARMUP, time_forward

    timed = [0.001, 0.002, 0.003, 0.004, 0.005]  # ms 1..5: median 3, quartiles 2 and 4 (inclusive)
    model = _Clocked([0.5] * (1 + WARMUP) + timed + [1.0] * 10)  # one untimed first pass, then the warm-up
    timing = time_forward(model, (3,), 1, budget_s=0.0, clock=model.clock)
    assert timing.repeats == MIN_REPEATS == 5  # a spent budget still times MIN_REPEATS passes
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.spread == pytest.approx((4.0 - 2.0) / 3.0)
    steady = _Clocked([0.001] * (1 + WARMUP + 40))  # 1 ms passes within a 25 ms budget: about 25 of them
    found = time_forward(steady, (3,), 1, budget_s=0.025, clock=steady.clock)
    assert 24 <= found.repeats <= 26 and found.spread == 0.0 and found.median_ms == pytest.approx(1.0)
    fast = _Clocked([5.0] + [0.0001] * 1000)  # a 5 s first pass (a compile), then 0.1 ms passes: five to a block of BLOCK_S = 0.5 ms
    timing = time_forward(fast, (3,), 1, budget_s=0.0, clock=fast.clock)
    assert timing.repeats == MIN_REPEATS * 5 and timing.median_ms == pytest.approx(0.1)
    assert 1000 - 25 - len(fast.durations) in (100, 101)  # warm-up: WARMUP_S = 10 ms of passes (float sums), then 5 blocks of 5


def test_timing_runs_with_the_thread_count_asked_and_restores_the_callers():
    from kd.tracking.measure import time_forward

    before = torch.get_num_threads()
    model = _Clocked([0.001] * 20)
    time_forward(model, (3,), 1, threads=1, budget_s=0.0, clock=model.clock)
    assert set(model.threads) == {1} and torch.get_num_threads() == before


def test_every_latency_comes_with_its_spread_and_a_noisy_one_is_named():
    from kd.tracking.measure import NOISY, noisy_latencies

    found = measure(_mlp(), (3,), large_batch=4)
    assert {"latency_spread_b1", "latency_spread_b4"} <= set(found) and all(found[k] >= 0 for k in ("latency_spread_b1", "latency_spread_b4"))
    spreads = {"model/latency_spread_b1": NOISY + 0.01, "teacher/latency_spread_b256": NOISY, "model/latency_ms_b1": 9.0}
    assert noisy_latencies(spreads) == ["model/latency_ms_b1"]  # above NOISY only, strictly


@pytest.mark.parametrize(("kwargs", "words"), [({"latency": "yes"}, "measure.latency must be one of true, false, quick, full, got 'yes'"),
                                               ({"latency": 1}, "measure.latency"), ({"threads": 0}, "measure.threads must be an integer >= 1, got 0"),
                                               ({"large_batch": 2.5}, "measure.large_batch must be an integer >= 1, got 2.5")])  # fmt: skip
def test_bad_measurement_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError) as err:
        Measurement(**kwargs)
    assert words in str(err.value)


def test_a_run_timed_on_a_busy_machine_is_flagged(make_cfg, monkeypatch):
    from mlflow.tracking import MlflowClient

    from kd.run.experiment import run
    from kd.tracking import measure as measuring

    monkeypatch.setattr(measuring, "NOISY", -1.0)  # every spread counts as large
    cfg = make_cfg("measure.latency=true", "measure.large_batch=8")
    metrics = run(cfg)
    assert metrics["model/latency_ms_b8"] > 0 and "teacher/latency_spread_b1" in metrics
    client = MlflowClient(f"sqlite:///{cfg.paths.output_root}/mlflow.db")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name("kd").experiment_id]) if r.data.tags.get("kd.role") == "student"]
    assert set(student.data.tags["kd.latency_noisy"].split(",")) == {"model/latency_ms_b1", "model/latency_ms_b8", "teacher/latency_ms_b1", "teacher/latency_ms_b8"}

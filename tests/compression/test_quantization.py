"""Quantization, on both flows (torchao's PT2E, the default, and torch's FX graph mode): PTQ with
each range estimator and dynamic quantization give real int8 models; QAT trains fake-quantized,
keeps validation out of its ranges, resumes, and converts to an int8 model that agrees with it;
the int8 model is tested, measured, saved and reloaded by a run; the FX flow is chosen only where
PT2E cannot do the run's quantization."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from callbacks import PostTrainingQuantization, QuantizationAwareTraining
from callbacks.observers import EntropyObserver, PercentileObserver
from callbacks.quant_engine import load_quantized
from kd.tracking.measure import accuracy, int8_ops
from kd.run.experiment import run
from kd.tracking.measure import state_dict_bytes
from kd.models import LeNet5
from tests.compression.pruning_helpers import digits, module, trained_lenet5, trainer, uninterrupted_and_resumed

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def trained() -> LeNet5:
    from kd.run.experiment import ignore_known_warnings

    ignore_known_warnings()  # a module fixture runs before the per-test autouse filters
    return trained_lenet5()


def _quantized_types(model: torch.nn.Module) -> set[str]:
    return {type(m).__module__ for m in model.modules()}


def _graph_ops(model: torch.nn.Module) -> set[str]:
    return {str(n.target) for n in model.graph.nodes if n.op == "call_function"}


def _int8_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The int8 weight tensors a PT2E graph reads (what the saved file holds)."""
    return [b for b in model.buffers() if b.dtype == torch.int8]


ENGINES = ["pt2e", "fx"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram", "percentile", "entropy"])
def test_ptq_gives_a_real_int8_model_close_to_the_float_one(trained, observer, engine):
    data = digits()
    int8 = PostTrainingQuantization(observer=observer, calibration_batches=8, engine=engine).convert(trained, data)
    if engine == "fx":
        assert "torch.ao.nn.intrinsic.quantized.modules.conv_relu" in _quantized_types(int8)  # int8 kernels (conv+relu fused)
    else:  # a reference graph: every conv and linear weight stored int8, activations quantized between them
        assert {"quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_channel.default"} <= _graph_ops(int8)
        assert sorted(w.numel() for w in _int8_weights(int8)) == sorted(m.weight.numel() for m in trained.modules() if hasattr(m, "weight"))
        assert not any(p.dtype == torch.float32 and p.dim() > 1 for p in int8.parameters())  # no float weights left behind
    assert state_dict_bytes(int8) < 0.45 * state_dict_bytes(trained)
    float_acc = accuracy(trained, data.test.x, data.test.y)
    tolerance = 0.03 if engine == "fx" else 0.01  # PT2E: within one point of float (the bar)
    assert float_acc > 0.8 and accuracy(int8, data.test.x, data.test.y) >= float_acc - tolerance
    assert next(trained.parameters()).dtype == torch.float32  # the float model is left as it was


@pytest.mark.parametrize("engine", ENGINES)
def test_dynamic_quantization_turns_linear_layers_int8_and_needs_no_calibration(trained, engine):
    int8 = PostTrainingQuantization(dynamic=True, engine=engine).convert(trained, digits())
    if engine == "fx":
        assert "torch.ao.nn.quantized.dynamic.modules.linear" in _quantized_types(int8)
    else:  # the activations' ranges are chosen at run time, per batch
        assert "quantized_decomposed.choose_qparams.tensor" in _graph_ops(int8)
    assert accuracy(int8, digits().test.x, digits().test.y) > accuracy(trained, digits().test.x, digits().test.y) - 0.03


def _observer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("min_val", "max_val"))}


@pytest.mark.parametrize("engine", ENGINES)
def test_qat_trains_fake_quantized_and_validation_never_moves_the_ranges(trained, engine):
    pl.seed_everything(0, verbose=False)
    lit = module(LeNet5(10, SHAPE))
    cb = QuantizationAwareTraining(freeze_observers_epoch=2, engine=engine)
    snapshots: list[dict[str, torch.Tensor]] = []

    class Spy(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            snapshots.append(_observer_state(pl_module.model))

        def on_validation_epoch_end(self, trainer, pl_module):
            snapshots.append(_observer_state(pl_module.model))

    trainer([cb, Spy()], max_epochs=4, num_sanity_val_steps=0).fit(lit, datamodule=digits())
    assert isinstance(lit.model, torch.fx.GraphModule) and any("FakeQuantize" in type(m).__name__ for m in lit.model.modules())
    for before, after in zip(snapshots[::2], snapshots[1::2]):  # across each validation run
        assert all(torch.equal(before[k], after[k]) for k in before)
    moved = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots[1::2], snapshots[2::2])]
    assert moved == [True, False, False]  # training epoch 1 moves them; from epoch 2 they are frozen


@pytest.mark.parametrize("engine", ENGINES)
def test_the_int8_model_agrees_with_the_fake_quantized_one(engine):
    pl.seed_everything(0, verbose=False)
    lit = module(LeNet5(10, SHAPE))
    cb = QuantizationAwareTraining(engine=engine, freeze_bn_epoch=2)
    trainer([cb], max_epochs=3).fit(lit, datamodule=digits())
    data = digits()
    int8 = cb.convert(lit.model, data)
    with torch.no_grad(), int8_ops():  # the tests' trainers turn on deterministic algorithms
        fake = lit.model.eval()(data.test.x).argmax(1)
        real = int8(data.test.x).argmax(1)
    assert float((fake == real).float().mean()) > 0.99  # the reduce_range trap would break this
    assert float((real == data.test.y).float().mean()) >= float((fake == data.test.y).float().mean()) - 0.01


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("engine", ENGINES)
def test_qat_resumes_from_a_checkpoint_with_its_prepared_graph(tmp_path, engine):
    make = lambda: [QuantizationAwareTraining(engine=engine, freeze_observers_epoch=2, freeze_bn_epoch=2)]  # noqa: E731
    full, resumed = uninterrupted_and_resumed(lambda: LeNet5(10, SHAPE), make, tmp_path, 3)
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))


def test_pt2e_batch_norm_freezes_and_stays_frozen_through_train_and_eval():
    from callbacks import pt2e_quant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    cb = QuantizationAwareTraining(engine="pt2e")
    graph = pt2e_quant.prepare_for_qat(model, cb.recipe(), torch.randn(4, *SHAPE))
    stats = lambda: {k: v.clone() for k, v in graph.state_dict().items() if "running_mean" in k}  # noqa: E731
    x = torch.randn(16, *SHAPE)
    before = stats()
    graph.train()
    graph(x)
    assert not all(torch.equal(before[k], v) for k, v in stats().items())  # training updates the statistics
    pt2e_quant.freeze_bn(graph)
    frozen = stats()
    graph.eval()
    graph.train()  # torchao's switch back to training rewrites the batch norms: they stay frozen
    graph(x)
    assert all(torch.equal(frozen[k], v) for k, v in stats().items())
    assert graph.training and all(m.training for m in graph.modules())


def test_a_quantized_run_tests_measures_and_saves_a_reloadable_int8_model(make_cfg):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=ptq", "quantize.calibration_batches=4", "trainer.max_epochs=3")
    metrics = run(cfg)
    assert metrics["quant/size_reduction"] > 2.5 and abs(metrics["quant/acc_delta"]) < 0.05
    assert metrics["quant/argmax_agreement"] > 0.95 and 0 < metrics["quant/logit_rel_error"] < 0.1
    assert metrics["quant/bits_per_weight"] == 8
    path = Path(cfg.paths.run_dir) / "student_int8.pt"
    assert torch.load(path, weights_only=True)["kd.quantization"]["engine"] == "pt2e"
    reloaded = load_quantized(LeNet5(10, SHAPE), path, SHAPE)
    assert accuracy(reloaded, digits().test.x, digits().test.y) == pytest.approx(metrics["quant/test_acc"])
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                  if r.data.tags.get("kd.role") == "student"]  # fmt: skip
    assert student.data.tags["kd.quant_engine"] == "pt2e"


def test_structured_pruning_then_qat_fine_tunes_the_thinned_model_and_saves_a_reloadable_int8_one(make_cfg):
    cfg = make_cfg("model@student.model=lenet5", "trainer.max_epochs=4", "prune=structured", "prune.start=1",
                   "prune.sparsity=0.25", "quantize=qat", "quantize.finetune_epochs=2")  # distill=kd: the teacher teaches the fine-tune too
    metrics = run(cfg)
    assert metrics["model/params"] < 0.9 * metrics["dense/params"]  # channels are gone from the quantized model
    assert metrics["quant/argmax_agreement"] > 0.95 and metrics["quant/size_reduction"] > 2.5
    assert metrics["quant/qat_finetune_epochs"] == 2
    saved = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)["state_dict"]
    assert any("activation_post_process" in k for k in saved)  # the saved float model is the fine-tuned fake-quant graph
    reloaded = load_quantized(LeNet5(10, SHAPE), Path(cfg.paths.run_dir) / "student_int8.pt", SHAPE)
    assert accuracy(reloaded, digits().test.x, digits().test.y) == pytest.approx(metrics["quant/test_acc"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantize=ptq", "quantize.backend=tpu"], "quantize.backend must be one of"),
        (["quantize=ptq", "quantize.observer=kl"], "quantize.observer must be one of"),
        (["quantize=qat", "quantize.finetune_epochs=0"], "quantize.finetune_epochs must be >= 1"),
        (["quantize=qat", "prune=lottery"], "quantize=qat with LotteryTicket is not supported"),
        (["quantize=qat", "distill=ofd", "model@student.model=lenet5"], r"conv1 \(fused with its ReLU: no pre-activation"),
        (["quantize=ptq", "quantize.engine=onnx"], r"quantize.engine must be one of \('auto', 'pt2e', 'fx'\), got 'onnx'"),
        (["quantize=qat", "quantize.engine=pt2e", "distill=fitnets"], "quantize.engine=pt2e cannot do this run's quantization: distillation-aware QAT"),
        (["quantize=qat", "quantize.engine=pt2e", "prune=magnitude"], "quantize.engine=pt2e cannot do this run's quantization: QAT with pruning"),
    ],
)
def test_bad_quantization_config_fails_before_anything_is_written(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception, match=message):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()


QAT_DISTILL = [
    ("hint", ["distill=fitnets"]),
    ("at", ["distill=at", "model@student.model=lenet5", "model@teacher.model=lenet5"]),  # AT needs maps on both sides
    ("crd", ["distill=crd", "model@student.model=lenet5", "distill.terms.crd.nce_k=64"]),
]


@pytest.mark.parametrize(("term", "overrides"), QAT_DISTILL, ids=[t for t, _ in QAT_DISTILL])
def test_distillation_aware_qat_trains_every_objective_inside_the_fake_quant_graph(make_cfg, term, overrides):
    # QAT fuses a linear layer with its ReLU: the MLP's post-activation stage (layers.1) is read
    # from the fused module; LeNet's conv1:relu spec from the fused conv. Then int8 as usual.
    cfg = make_cfg("quantize=qat", *overrides)
    metrics = run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                  if r.data.tags.get("kd.role") == "student"]  # fmt: skip
    history = client.get_metric_history(student.info.run_id, f"train/loss_{term}")
    assert len(history) == cfg.trainer.max_epochs and history[-1].value > 0
    assert metrics["quant/argmax_agreement"] > 0.9 and metrics["quant/size_reduction"] > 2.0


def _with_outliers() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g).abs()  # a post-ReLU-like activation
    x[:5] = 1000.0  # five outliers stretch the min/max range 200-fold
    return x


@pytest.mark.parametrize("observer", [PercentileObserver(99.9, quant_min=0, quant_max=255), EntropyObserver(quant_min=0, quant_max=255)])
def test_percentile_and_entropy_clip_outliers_that_minmax_keeps(observer):
    x = _with_outliers()
    minmax = torch.ao.quantization.MinMaxObserver(quant_min=0, quant_max=255)
    minmax(x), observer(x)
    low, high = observer._non_linear_param_search()
    assert float(high) < 0.05 * 1000.0  # the outliers are clipped, not spread over the 256 levels
    assert float(high) > float(torch.quantile(x[5:][:16_000_000], 0.99))  # the body of the distribution is kept
    assert float(observer.calculate_qparams()[0]) < 0.05 * float(minmax.calculate_qparams()[0])


def test_compare_converts_with_every_estimator_and_writes_a_table(trained, tmp_path):
    ptq = PostTrainingQuantization(calibration_batches=4, compare=True)
    ptq.convert(trained, digits())
    assert set(ptq.comparison) == {"minmax", "moving_average", "histogram", "percentile", "entropy", "dynamic"}
    assert all(acc > 0.7 for acc in ptq.comparison.values())
    (table,) = ptq.artifacts(tmp_path)
    assert table.read_text().splitlines()[0] == "estimator,int8_test_acc" and len(table.read_text().splitlines()) == 7


def test_low_bit_qat_simulates_its_width_and_the_run_says_it_made_no_integer_model(make_cfg):
    pl.seed_everything(0, verbose=False)
    lit = module(LeNet5(10, SHAPE))
    cb = QuantizationAwareTraining(bits=4, engine="fx")  # the FX graph names its fake-quant modules after the layers
    trainer([cb], max_epochs=2).fit(lit, datamodule=digits())
    fake_quant = lit.model.conv2.weight_fake_quant
    with torch.no_grad():
        w = fake_quant(lit.model.conv2.weight) / fake_quant.scale.view(-1, 1, 1, 1)  # integer grid per channel
    assert w.round().min() >= -8 and w.round().max() <= 7 and not cb.converts  # 16 levels: 4 bits
    assert _activation_ranges(lit.model) == {(0, 15)}  # activations narrowed alike by default

    metrics = run(make_cfg("distill=none", "model@student.model=lenet5", "quantize=qat", "quantize.bits=4", "quantize.activation_bits=8"))
    assert metrics["quant/bits"] == 4 and metrics["quant/activation_bits"] == 8 and "quant/test_acc" not in metrics


def _activation_ranges(model: torch.nn.Module) -> set[tuple[int, int]]:
    return {(m.quant_min, m.quant_max) for name, m in model.named_modules()
            if isinstance(m, torch.ao.quantization.FakeQuantize) and not name.endswith("weight_fake_quant")}  # fmt: skip


def test_weights_and_activations_take_their_own_widths():
    from callbacks import pt2e_quant
    from callbacks.fx_quant import prepare_for_qat

    cb = QuantizationAwareTraining(bits=4, activation_bits=8, engine="fx")
    model = prepare_for_qat(LeNet5(10, SHAPE), cb.recipe(), torch.zeros(1, *SHAPE))
    assert (model.conv1.weight_fake_quant.quant_min, model.conv1.weight_fake_quant.quant_max) == (-8, 7)
    assert _activation_ranges(model) == {(0, 255)}
    graph = pt2e_quant.prepare_for_qat(LeNet5(10, SHAPE), QuantizationAwareTraining(bits=4, activation_bits=8).recipe(), torch.zeros(2, *SHAPE))
    ranges = {(m.quant_min, m.quant_max) for m in graph.modules() if "FakeQuantize" in type(m).__name__}
    assert ranges == {(-8, 7), (0, 255)}  # the weights' 16 levels, the activations' 256
    assert not cb.converts and cb.describe() == "w4a8 qat (simulated)"
    assert QuantizationAwareTraining(bits=8, activation_bits=8).converts
    with pytest.raises(ValueError, match="activation_bits"):
        QuantizationAwareTraining(bits=4, activation_bits=1)


def test_kmeans_finds_the_two_clumps():
    from callbacks.clustering import kmeans_1d

    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 2.0)]) + torch.linspace(-0.01, 0.01, 80)
    centroids, assignment = kmeans_1d(values, 2)
    assert sorted(float(c) for c in centroids) == pytest.approx([-1.0, 2.0], abs=0.01)
    assert int((assignment == assignment[0]).sum()) == 50


def test_clustering_keeps_at_most_2_to_the_bits_values_per_layer_through_training(trained):
    import copy

    from callbacks import WeightClustering

    pl.seed_everything(0, verbose=False)
    model = copy.deepcopy(trained).train()
    cb = WeightClustering(bits=3, start=0)
    trainer([cb], max_epochs=2).fit(module(model, lr=0.01), datamodule=digits())  # SGD, momentum, weight decay
    for name in ("conv1", "conv2", "fc1", "fc3"):
        assert torch.unique(getattr(model, name).weight).numel() <= 8, name
    data = digits()
    assert accuracy(model.eval(), data.test.x, data.test.y) > accuracy(trained, data.test.x, data.test.y) - 0.1
    expected = sum(m.weight.numel() * 3 / 8 + 4 * 8 for m in cb._targets.values())
    expected += sum(4 * p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert cb.coded_bytes(model) == pytest.approx(expected)


def test_prune_then_cluster_in_one_run_keeps_the_zeros(make_cfg):
    cfg = make_cfg("distill=none", "prune=magnitude", "prune.sparsity=0.8", "prune.start=1",
                   "quantize=cluster", "quantize.bits=2", "quantize.start=2", "trainer.max_epochs=4")  # fmt: skip
    metrics = run(cfg)
    assert metrics["model/sparsity_all"] > 0.7 and metrics["quant/bits"] == 2
    assert metrics["quant/size_bytes_coded"] < 0.2 * metrics["dense/size_bytes"]
    # Deep Compression's stages each shrink the model further, and are tabled per layer
    assert metrics["dc/ratio_huffman"] > metrics["dc/ratio_quantized"] > metrics["dc/ratio_pruned"] > 1
    table = (Path(cfg.paths.run_dir) / "deep_compression.csv").read_text().splitlines()
    assert table[0].startswith("layer,params,nonzero") and table[-1].startswith("total")
    state = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)["state_dict"]
    for name, w in state.items():
        if name.endswith("weight"):  # pruned and clustered: zero is one of the 2**bits codes
            assert 0.0 in w and torch.unique(w).numel() <= 4, name
    # the logged storage is that of the saved model, recomputed from its weights
    from kd.compression.deep_compression import storage_report
    from kd.models import MLP

    saved = MLP(10, SHAPE, hidden=list(cfg.student.model.hidden), dropout=cfg.student.model.dropout)
    saved.load_state_dict(state)
    _, totals = storage_report(saved, index_bits_conv=8, index_bits_fc=5)
    assert metrics["dc/size_bytes_huffman"] == pytest.approx(totals["huffman"])
    assert metrics["dc/size_bytes_dense"] == 4 * sum(p.numel() for p in saved.parameters())
    with pytest.raises(ValueError, match="must come after the last pruning event"):
        run(make_cfg("distill=none", "prune=magnitude", "prune.start=1", "quantize=cluster", "quantize.start=1"))


def test_every_weight_of_a_cluster_gets_the_clusters_summed_gradient():
    from callbacks import WeightClustering

    layer = torch.nn.Linear(4, 1, bias=False)
    cb = WeightClustering(bits=1, centroid_gradient="sum")
    layer.register_buffer("weight_cluster", torch.tensor([[0, 1, 0, 2]]))  # 2: the zero cluster
    cb._targets, cb._clustered = {"fc": layer}, True
    layer.weight.grad = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cb.on_after_backward(None, None)
    assert layer.weight.grad.tolist() == [[4.0, 2.0, 4.0, 0.0]]  # eq. 3 of Deep Compression; zeros frozen


def test_agreement_measures_prediction_and_logit_differences():
    from kd.tracking.measure import agreement

    reference = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    scaled = torch.nn.Sequential(reference, torch.nn.Identity())
    assert agreement(reference, reference, x) == {"argmax_agreement": 1.0, "logit_rel_error": 0.0}

    class Times(torch.nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.factor * scaled(x)

    bigger = agreement(reference, Times(1.1), x)  # same argmax, logits 10% off
    assert bigger["argmax_agreement"] == 1.0 and bigger["logit_rel_error"] == pytest.approx(0.1, rel=1e-5)
    assert agreement(reference, Times(-1.0), x)["argmax_agreement"] < 0.5  # the argmax becomes the argmin


def test_qat_with_gradual_pruning_gives_a_sparse_int8_model(make_cfg):
    cfg = make_cfg("distill=kd", "model@student.model=lenet5", "quantize=qat", "prune=agp", "prune.sparsity=0.75",
                   "prune.start=0", "prune.end=2", "prune.every=1", "trainer.max_epochs=4")  # fmt: skip
    metrics = run(cfg)
    saved = torch.load(Path(cfg.paths.run_dir) / "student_int8.pt", weights_only=True)
    assert saved["kd.quantization"]["engine"] == "fx"  # the pruner's masks sit on the FX graph's layers
    assert metrics["model/sparsity_all"] > 0.7  # the masked weights of the fake-quant graph (biases are dense)
    assert metrics["quant/argmax_agreement"] > 0.95 and abs(metrics["quant/acc_delta"]) < 0.03
    int8 = load_quantized(LeNet5(10, SHAPE), Path(cfg.paths.run_dir) / "student_int8.pt", SHAPE)
    weights = [m.weight() for m in int8.modules() if hasattr(m, "weight") and callable(m.weight)]
    zeros = sum(int((w.int_repr() == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.749  # the pruned weights (75% of each layer, rounded) are int8 zeros


def test_qat_with_pruning_resumes_with_masks_on_the_prepared_graph(tmp_path):
    from callbacks import MagnitudePruning

    def callbacks() -> list:
        return [QuantizationAwareTraining(), MagnitudePruning(0.6, schedule="agp", start=0, end=3, every=1)]

    full, resumed = uninterrupted_and_resumed(lambda: LeNet5(10, SHAPE), callbacks, tmp_path, 4)
    state = dict(resumed.model.state_dict())
    assert any(k.endswith("weight_mask") for k in state) and any("activation_post_process" in k for k in state)
    torch.testing.assert_close(dict(full.model.state_dict()), state)


def test_auto_backend_is_x86_only_where_its_int8_kernels_do_not_saturate(monkeypatch):
    from callbacks import fx_quant
    from callbacks.quant_engine import resolve_backend

    monkeypatch.setattr(fx_quant, "has_vnni", lambda: False)  # e.g. an AVX2-only CPU: 94.4% agreement on x86 (FX)
    assert resolve_backend("auto", "fx") == "qnnpack" and resolve_backend("x86", "fx") == "x86"
    assert resolve_backend("xnnpack", "fx") == "qnnpack"
    assert QuantizationAwareTraining(engine="fx").recipe()["backend"] == "qnnpack"
    monkeypatch.setattr(fx_quant, "has_vnni", lambda: True)
    assert resolve_backend("auto", "fx") == "x86"


def test_pt2e_backend_follows_the_machine_and_names_both_quantizers(monkeypatch):
    import platform

    from callbacks.quant_engine import resolve_backend

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert resolve_backend("auto", "pt2e") == "x86" and resolve_backend("fbgemm", "pt2e") == "x86"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert resolve_backend("auto", "pt2e") == "xnnpack" and resolve_backend("qnnpack", "pt2e") == "xnnpack"
    with pytest.raises(ValueError, match=r"quantize.backend must be one of \('auto', 'x86', 'fbgemm', 'qnnpack', 'xnnpack'\), got 'tpu'"):
        resolve_backend("tpu", "pt2e")


def test_xnnpack_quantizes_with_signed_activations_and_symmetric_weights(trained):
    data = digits()
    int8 = PostTrainingQuantization(observer="minmax", calibration_batches=4, backend="xnnpack").convert(trained, data)
    assert accuracy(int8, data.test.x, data.test.y) >= accuracy(trained, data.test.x, data.test.y) - 0.02
    assert all(int(w.min()) >= -127 for w in _int8_weights(int8))

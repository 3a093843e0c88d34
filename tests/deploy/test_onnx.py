"""ONNX export checked in onnxruntime: float, thinned, factorised and int8 (PT2E's QDQ graph and
onnxruntime's static quantization) students predict in onnxruntime what they predict in torch;
a run with export=onnx writes, checks, logs and tags the files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from callbacks import PostTrainingQuantization, StructuredPruning
from kd.compression.factorize import factorize_conv, factorize_linear
from kd.deploy import onnx
from kd.run import export as run_export
from kd.run.experiment import run
from kd.tracking.measure import Measurement
from tests.compression.pruning_helpers import digits, trained_lenet5

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def trained():
    from kd.run.experiment import ignore_known_warnings

    ignore_known_warnings()
    return trained_lenet5()


def _exported(model: torch.nn.Module, tmp_path: Path, name: str = "m.onnx") -> onnx.OnnxModule:
    return onnx.OnnxModule(onnx.export(model, SHAPE, tmp_path / name))


def test_a_float_student_predicts_in_onnxruntime_what_it_predicts_in_torch_at_any_batch(trained, tmp_path):
    runtime = _exported(trained, tmp_path)
    found = onnx.check(trained, runtime, digits().test.x)
    assert found["argmax_agreement"] >= onnx.FLOAT_AGREEMENT and found["max_logit_diff"] < 1e-4
    for batch in (1, 7):  # the batch dimension is dynamic
        x = digits().test.x[:batch]
        torch.testing.assert_close(runtime(x), trained.eval()(x).detach(), rtol=1e-4, atol=1e-4)
    assert trained.training is False and next(trained.parameters()).requires_grad  # the model itself untouched


def test_a_thinned_and_a_factorised_student_export_alike(trained, tmp_path):
    import copy

    thinned = copy.deepcopy(trained)
    pruner = StructuredPruning(0.5, layers=["conv2", "fc1"])
    pruner.fold(pruner.apply(thinned, SHAPE))
    assert thinned.conv2.out_channels == 8
    factorised = copy.deepcopy(trained)
    factorised.fc1 = factorize_linear(factorised.fc1, 8)
    factorised.conv2 = factorize_conv(factorised.conv2, 4, "channel")
    for name, model in (("thinned", thinned), ("factorised", factorised)):
        found = onnx.check(model, _exported(model, tmp_path, f"{name}.onnx"), digits().test.x)
        assert found["argmax_agreement"] >= onnx.FLOAT_AGREEMENT and found["max_logit_diff"] < 1e-4, name


def test_the_pt2e_int8_model_exports_as_a_qdq_graph_that_agrees_with_it(trained, tmp_path):
    import onnx as onnx_format

    int8 = PostTrainingQuantization(calibration_batches=8).convert(trained, digits())
    path = onnx.export(int8, SHAPE, tmp_path / "int8.onnx")
    ops = {node.op_type for node in onnx_format.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    found = onnx.check(int8, onnx.OnnxModule(path), digits().test.x)
    assert found["argmax_agreement"] >= onnx.INT8_AGREEMENT
    assert path.stat().st_size < 0.7 * onnx.export(trained, SHAPE, tmp_path / "float.onnx").stat().st_size


def test_onnxruntime_static_quantization_of_the_float_graph_agrees_with_the_float_model(trained, tmp_path):
    from kd.data import calibration_batches

    float_path = onnx.export(trained, SHAPE, tmp_path / "float.onnx")
    path = onnx.quantize_static(float_path, tmp_path / "static.onnx", calibration_batches(digits(), 8))
    found = onnx.check(trained, onnx.OnnxModule(path), digits().test.x)
    assert found["argmax_agreement"] >= 0.98 and path.stat().st_size < 0.5 * float_path.stat().st_size
    assert not (tmp_path / "static.pre.onnx").exists()


def test_an_export_below_its_bar_is_named_and_tagged(trained, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(onnx, "FLOAT_AGREEMENT", 1.01)  # a bar no export reaches
    found, tags, files = run_export.export_student(trained, None, None, digits(), Measurement(latency=False), tmp_path, {})
    assert [f.name for f in files] == ["model.onnx"] and found["export/float/argmax_agreement"] == 1.0
    assert tags == {"kd.export_mismatch": "float agrees on 100.00% (needs 101.0%)"}
    assert "the ONNX export does not predict what kd measured" in caplog.text


def test_an_fx_int8_model_is_exported_through_onnxruntimes_quantization(trained, tmp_path):
    fx = PostTrainingQuantization(calibration_batches=8, engine="fx").convert(trained, digits())
    found, tags, files = run_export.export_student(trained, fx, "fx", digits(), Measurement(latency=False), tmp_path, {})
    assert [f.name for f in files] == ["model.onnx", "model_int8.onnx"]
    assert tags["kd.export_int8"].startswith("onnxruntime's static quantization of model.onnx (32 calibration batches)")
    assert found["export/int8/argmax_agreement"] >= 0.97  # against the FX int8 model kd tested


def test_a_run_exports_checks_and_logs_both_files(make_cfg):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=ptq", "quantize.calibration_batches=4",
                   "trainer.max_epochs=3", "export=onnx", "measure.latency=quick", "measure.large_batch=32")  # fmt: skip
    metrics = run(cfg)
    assert metrics["export/float/argmax_agreement"] >= onnx.FLOAT_AGREEMENT
    assert metrics["export/int8/argmax_agreement"] >= onnx.INT8_AGREEMENT
    assert metrics["export/float/ort_latency_ms_b32"] > 0 and metrics["export/int8/ort_speedup_b1"] > 0
    assert metrics["export/int8/size_bytes"] < metrics["export/float/size_bytes"]
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                  if r.data.tags.get("kd.role") == "student"]  # fmt: skip
    assert {"model.onnx", "model_int8.onnx"} <= {a.path for a in client.list_artifacts(student.info.run_id)}
    assert student.data.tags["kd.export_int8"] == "the PT2E int8 model exported as a QDQ graph"
    assert "kd.export_mismatch" not in student.data.tags


def test_a_finished_run_exports_from_its_folder_or_its_run_id_and_bad_sources_are_named(make_cfg, tmp_path, capsys):
    from kd.run.export import main

    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=ptq", "quantize.calibration_batches=4", "trainer.max_epochs=2")
    run(cfg)
    folder = Path(cfg.paths.run_dir)
    (folder / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))  # what the Hydra folder holds as .hydra/config.yaml
    assert main([str(folder), "--latency", "false"]) == 0
    assert (folder / "model.onnx").is_file() and (folder / "model_int8.onnx").is_file()
    assert "kd.export_int8: the PT2E int8 model exported as a QDQ graph" in capsys.readouterr().out
    uri = f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}"
    client = MlflowClient(uri)
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                  if r.data.tags.get("kd.role") == "student"]  # fmt: skip
    out = tmp_path / "exports"
    assert main([student.info.run_id, "--uri", uri, "--out", str(out), "--latency", "false"]) == 0
    assert {"model.onnx", "model_int8.onnx"} <= {a.path for a in client.list_artifacts(student.info.run_id)}
    assert client.get_run(student.info.run_id).data.metrics["export/float/argmax_agreement"] >= onnx.FLOAT_AGREEMENT
    capsys.readouterr()
    for source, message in (("nope", "'nope' is neither a run folder nor an MLflow run id (32 hexadecimal characters)"),
                            ("0" * 32, f"no MLflow run {'0' * 32} in {uri}"),
                            (str(tmp_path), f"{tmp_path} is not a finished run's folder: it needs student.pt")):  # fmt: skip
        assert main([source, "--uri", uri]) == 2
        assert message in capsys.readouterr().err


def test_a_qat_run_exports_its_int8_model_and_says_why_not_the_fake_quant_graph(make_cfg):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=qat", "trainer.max_epochs=2", "export=onnx")
    metrics = run(cfg)
    assert metrics["export/int8/argmax_agreement"] >= onnx.INT8_AGREEMENT and "export/float/argmax_agreement" not in metrics
    assert not any(k.startswith("quant/speedup") for k in metrics)  # no float model to time the int8 one against
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                  if r.data.tags.get("kd.role") == "student"]  # fmt: skip
    assert student.info.status == "FINISHED"
    assert student.data.tags["kd.export_float"].startswith("not exported: the student is QAT's fake-quant graph")
    folder = Path(cfg.paths.run_dir)  # the CLI on the finished run: the int8 model alone
    (folder / "model_int8.onnx").unlink()
    (folder / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))
    assert run_export.main([str(folder), "--latency", "false"]) == 0
    assert (folder / "model_int8.onnx").is_file() and not (folder / "model.onnx").exists()


def test_the_cli_says_why_a_qat_run_below_8_bits_has_nothing_to_export(make_cfg, capsys):
    cfg = make_cfg("distill=none", "model@student.model=lenet5", "quantize=qat", "quantize.bits=4", "trainer.max_epochs=1")
    run(cfg)
    folder = Path(cfg.paths.run_dir)
    (folder / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))
    capsys.readouterr()
    assert run_export.main([str(folder), "--latency", "false"]) == 2
    assert "it is a QAT run below 8 bits, whose student.pt is its fake-quant graph" in capsys.readouterr().err


def test_an_exporter_failure_is_tagged_and_the_run_goes_on(trained, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX function found for some op\nmore")

    monkeypatch.setattr(onnx, "export", broken)
    found, tags, files = run_export.export_student(trained, None, None, digits(), Measurement(latency=False), tmp_path, {})
    assert files == [] and found == {}
    assert tags == {"kd.export_float": "failed: RuntimeError: no ONNX function found for some op"}

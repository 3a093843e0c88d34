"""Registering the best student of a small real store in the MLflow model registry."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd.run.experiment import run
from kd.models import MLP
from kd.analysis.registry import best_run, main
from kd.tracking.store import resolve_uri


def test_best_run_uses_finished_runs_only_and_the_chosen_direction():
    rows = [
        {"run_id": "a", "status": "FINISHED", "val/acc_best": 0.90},
        {"run_id": "b", "status": "FAILED", "val/acc_best": 0.99},
        {"run_id": "c", "status": "FINISHED", "val/acc_best": 0.95},
        {"run_id": "d", "status": "FINISHED", "val/acc_best": None},
    ]
    assert best_run(rows, "val/acc_best")["run_id"] == "c"
    assert best_run(rows, "val/acc_best", mode="min")["run_id"] == "a"
    with pytest.raises(LookupError, match="no FINISHED student run"):
        best_run(rows[1:2], "val/acc_best")


def test_the_best_student_is_registered_with_its_measurements_and_command(make_cfg, tmp_path, capsys):
    for seed in (0, 1):
        cfg = make_cfg("distill=none", "trainer.max_epochs=1", f"seed={seed}", f"paths.run_dir={tmp_path / f'run{seed}'}")
        run(cfg)
    uri = resolve_uri(cfg.tracking.uri, Path(cfg.paths.output_root))
    assert main(["--uri", uri, "--experiment", "kd", "--name", "digits-student"]) == 0
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name='digits-student'")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    top = max(r.data.metrics["val/acc_best"] for r in runs)
    best = min((r for r in runs if r.data.metrics["val/acc_best"] == top), key=lambda r: r.info.start_time)
    assert version.run_id == best.info.run_id  # the best by validation; of equals, the oldest
    assert float(version.tags["test/acc"]) == pytest.approx(best.data.metrics["test/acc"], rel=1e-5)
    assert int(float(version.tags["model/params"])) == 2410 and version.tags["kd.command"].startswith("python run.py")
    local = client.download_artifacts(version.run_id, "student.pt")
    MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32]).load_state_dict(torch.load(local, weights_only=True))
    assert "registered digits-student version 1" in capsys.readouterr().out
    assert main(["--uri", uri, "--experiment", "nope", "--name", "x"]) == 2  # nothing to register: a message, exit 2


def test_an_exported_student_registers_as_an_onnx_model_with_its_signature_that_predicts_like_the_student(make_cfg, tmp_path, capsys):
    import mlflow.pyfunc
    import numpy as np

    cfg = make_cfg("distill=none", "trainer.max_epochs=1", "export=onnx", f"paths.run_dir={tmp_path / 'run'}")
    run(cfg)
    uri = resolve_uri(cfg.tracking.uri, Path(cfg.paths.output_root))
    assert main(["--uri", uri, "--experiment", "kd", "--name", "digits-onnx"]) == 0
    assert "as an MLflow ONNX model: model.onnx (inside too: student.pt)" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name='digits-onnx'")
    assert version.source.endswith("/registered_model")
    info = mlflow.models.get_model_info(f"models:/digits-onnx/{version.version}")
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inputs.name, inputs.shape, outputs.shape) == ("x", (-1, 1, 8, 8), (-1, 10))
    student = MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32])
    student.load_state_dict(torch.load(client.download_artifacts(version.run_id, "student.pt", str(tmp_path)), weights_only=True))
    x = torch.randn(7, 1, 8, 8)
    predicted = mlflow.pyfunc.load_model(f"models:/digits-onnx/{version.version}").predict(x.numpy())["logits"]
    np.testing.assert_allclose(predicted, student.eval()(x).detach().numpy(), atol=1e-5)
    inside = client.download_artifacts(version.run_id, "registered_model/extra_files/student.pt", str(tmp_path / "inside"))
    assert torch.load(inside, weights_only=True).keys() == student.state_dict().keys()

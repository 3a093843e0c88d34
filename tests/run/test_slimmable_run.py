"""A slimmable run on digits: every width validated each epoch, then tested, measured and saved
as a plain model that loads into the architecture of the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd.deploy.onnx import FLOAT_AGREEMENT
from kd.models import LeNet5
from kd.run.experiment import run
from kd.tracking.measure import accuracy
from kd.train.checkpoint import load_weights
from tests.compression.pruning_helpers import digits


def _lenet_macs(c1: int, c2: int, h1: int, h2: int) -> int:
    """LeNet-5 on 8x8 digits (padding 2): two 5x5 convolutions (8x8, then 4x4 maps) and three linear layers."""
    return c1 * 25 * 64 + c2 * c1 * 25 * 16 + c2 * 4 * h1 + h1 * h2 + h2 * 10


def test_a_slimmable_run_tests_measures_and_saves_every_width(make_cfg):
    widths = [0.5, 0.75, 1.0]
    cfg = make_cfg("student=slimmable", "model@student.model=lenet5", f"student.widths=[{','.join(map(str, widths))}]", "distill=none",
                   "export=onnx")  # fmt: skip
    metrics = run(cfg)
    data = digits()
    for w in widths:
        c1, c2, h1, h2 = (int(w * c) for c in (6, 16, 120, 84))
        assert metrics[f"width/{w:g}/macs"] == _lenet_macs(c1, c2, h1, h2)
        plain = load_weights(LeNet5(num_classes=10, input_shape=(1, 8, 8)), Path(cfg.paths.run_dir) / f"student_w{w:g}.pt",
                             input_shape=(1, 8, 8))  # the config's architecture, thinned as the file says  # fmt: skip
        assert (plain.conv1.out_channels, plain.conv2.out_channels, plain.fc1.out_features, plain.fc2.out_features) == (c1, c2, h1, h2)
        assert accuracy(plain.eval(), data.test.x, data.test.y) == pytest.approx(metrics[f"width/{w:g}/test_acc"])
        assert metrics[f"width/{w:g}/params"] == sum(p.numel() for p in plain.parameters())
    assert metrics["width/1/test_acc"] == pytest.approx(metrics["test/acc"])  # the widest is the tested student
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name("kd").experiment_id]) if r.data.tags["kd.role"] == "student"]
    epochs = cfg.trainer.max_epochs
    for w in widths[:-1]:  # every narrower width validated every epoch, and trained (its loss)
        assert len(client.get_metric_history(student.info.run_id, f"width/{w:g}/val_acc")) == epochs
        assert f"train/width/{w:g}/loss" in student.data.metrics
    assert {"widths.csv", "widths.png", "student_w0.5.pt"} <= {a.path for a in client.list_artifacts(student.info.run_id)}
    assert torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True).keys() >= {"backbone.conv1.weight"}
    for name in ("float", "w0.5", "w0.75"):  # the widest as model.onnx, each narrower width as model_w<w>.onnx
        assert metrics[f"export/{name}/argmax_agreement"] >= FLOAT_AGREEMENT, name
    assert (Path(cfg.paths.run_dir) / "model_w0.5.onnx").is_file()

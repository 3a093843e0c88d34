"""A multi-exit run on digits: every exit trained (its loss and weight logged), the threshold
chosen on validation as the cheapest within the allowed drop, tested, tabled and plotted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.run.experiment import run


def test_a_multi_exit_run_trains_every_exit_and_chooses_its_threshold_on_validation(make_cfg):
    weights = [0.2, 0.3, 0.5]
    cfg = make_cfg("student=multi_exit", "model@student.model=lenet5", "trainer.max_epochs=3", "student.exits.max_drop=0.05",
                   f"student.exits.loss_weights=[{','.join(map(str, weights))}]")  # fmt: skip
    metrics = run(cfg)
    names = ["conv1", "conv2", "final"]
    assert [metrics[f"exit/{n}/weight"] for n in names] == weights
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs([client.get_experiment_by_name("kd").experiment_id]) if r.data.tags["kd.role"] == "student"]
    logged = student.data.metrics  # the last epoch's means: the loss is the weighted sum of the exits' terms
    assert logged["train/loss"] == pytest.approx(sum(w * logged[f"train/exit/{n}/loss"] for w, n in zip(weights, names)), rel=1e-5)
    assert {"exits.csv", "exits.png"} <= {a.path for a in client.list_artifacts(student.info.run_id)}
    rows = list(csv.DictReader((Path(cfg.paths.run_dir) / "exits.csv").read_text().splitlines()))
    final_val = float(rows[-1]["val_acc"])  # threshold 1: every input at the final exit
    assert float(rows[-1]["share_final"]) == 1.0 and float(rows[0]["share_conv1"]) == 1.0  # threshold 1, threshold 0
    within = [r for r in rows if float(r["val_acc"]) >= final_val - 0.05 - 1e-9]
    cheapest = min(float(r["val_macs"]) for r in within)
    (chosen,) = [r for r in rows if r["chosen"] == "True"]
    assert float(chosen["val_macs"]) == cheapest and float(chosen["threshold"]) == metrics["exit/threshold"]
    assert metrics["exit/test_acc"] == pytest.approx(float(chosen["test_acc"])) and metrics["exit/macs_avg"] == pytest.approx(float(chosen["test_macs"]))
    assert metrics["exit/macs_ratio"] == pytest.approx(metrics["exit/final/macs"] / metrics["exit/macs_avg"])
    assert metrics["exit/final/test_acc"] == pytest.approx(metrics["test/acc"])  # the final exit is the tested student

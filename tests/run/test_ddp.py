"""Lightning DDP, run for real on two CPU processes (gloo): the same command as on GPUs."""

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_ddp_on_two_processes_logs_once_from_rank_zero(run_py, tmp_path):
    argv = run_py("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    roles = sorted(r.data.tags["kd.role"] for r in runs)
    assert roles == ["student", "teacher"]  # rank 1 opened no runs of its own
    assert {r.info.status for r in runs} == {"FINISHED"}
    (student,) = [r for r in runs if r.data.tags["kd.role"] == "student"]
    # 359 digits test images, split over two ranks without padding: the accuracy is k / 359
    correct = student.data.metrics["test/acc"] * 359
    assert abs(correct - round(correct)) < 1e-3
    assert len(client.get_metric_history(student.info.run_id, "val/acc")) == 2  # once per epoch, not per rank
    assert Path(tmp_path / "outputs" / "teachers").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("prune", [["prune=structured", "prune.importance=taylor", "model@student.model=lenet5"],
                                   ["prune=agp", "prune.start=0", "prune.end=1"]])  # fmt: skip
def test_pruning_runs_under_ddp_and_reaches_its_target(run_py, tmp_path, prune):
    argv = run_py("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "distill=none", "trainer.max_epochs=3", *prune)
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (student,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert student.info.status == "FINISHED"
    # every rank computes its masks from the same replica weights and the same calibration batches
    if "prune=agp" in prune:
        assert client.get_metric_history(student.info.run_id, "model/sparsity")[-1].value == pytest.approx(0.5, abs=1e-3)
    else:
        assert student.data.metrics["model/params"] < 0.5 * student.data.metrics["dense/params"]

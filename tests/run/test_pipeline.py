"""The whole pipeline on digits: every number lands in MLflow, runs always close, the teacher
is reused by fingerprint, and bad input fails before anything trains."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd.data import DataNotFoundError
from kd.run.experiment import run
from kd.models import MLP
from kd.train.modules import ClassifierModule, DistillationModule


def _client(cfg) -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")


def _runs(cfg, role: str | None = None):
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if role is None or r.data.tags.get("kd.role") == role]


def test_distillation_run_lands_every_number_in_mlflow(make_cfg):
    cfg = make_cfg("distill.temperature=3.0", "distill.alpha=0.8")
    metrics = run(cfg)
    assert metrics["test/acc"] > 0.5 and metrics["teacher/test_acc"] > 0.5  # chance is 0.1
    assert metrics["model/compression_ratio"] == pytest.approx(metrics["teacher/params"] / metrics["model/params"])

    (student,) = _runs(cfg, "student")
    (teacher,) = _runs(cfg, "teacher")
    assert student.info.status == teacher.info.status == "FINISHED"
    assert student.data.params["distill.temperature"] == "3.0"
    assert student.data.params["distill.alpha"] == "0.8"
    assert student.data.params["student.optimizer.lr"] == "0.05"  # nested keys are flattened
    assert student.data.tags["kd.teacher_source"] == "trained"
    assert student.data.tags["kd.teacher_logits"] == "cached"
    assert student.data.tags["kd.teacher_run_id"] == teacher.info.run_id
    for key in ("train/loss", "train/loss_kd", "train/loss_ce", "train/acc", "val/acc", "val/loss"):
        history = _client(cfg).get_metric_history(student.info.run_id, key)
        assert len(history) == cfg.trainer.max_epochs, key  # once per epoch
    for key in ("test/acc", "model/params", "model/nonzero_params", "model/size_bytes", "model/macs",
                "teacher/params", "teacher/test_acc", "model/compression_ratio"):  # fmt: skip
        assert key in student.data.metrics, key
    assert student.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])

    artifacts = {a.path for a in _client(cfg).list_artifacts(student.info.run_id)}
    assert {"config.yaml", "student.pt", "summary.yaml"} <= artifacts
    local = _client(cfg).download_artifacts(student.info.run_id, "student.pt")
    state = torch.load(local, weights_only=True)
    MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32]).load_state_dict(state)


def test_second_run_reuses_the_teacher_by_fingerprint(make_cfg):
    first = run(make_cfg())
    cfg = make_cfg("distill.temperature=8", "seed=1")  # student-side changes only
    second = run(cfg)
    assert len(_runs(cfg, "teacher")) == 1
    sources = sorted(r.data.tags["kd.teacher_source"] for r in _runs(cfg, "student"))
    assert sources == ["cache", "trained"]
    assert second["teacher/test_acc"] == pytest.approx(first["teacher/test_acc"])
    run(make_cfg("teacher.max_epochs=2"))  # a different teacher recipe trains a new teacher
    assert len(_runs(cfg, "teacher")) == 2


def test_a_teacher_can_train_on_augmented_data_while_the_student_does_not(make_cfg, monkeypatch):
    import kd.data.base as base

    calls: list[str] = []
    original = base.random_crop_flip
    monkeypatch.setattr(base, "random_crop_flip", lambda x, p, f: calls.append(f"{p},{f}") or original(x, p, f))
    cfg = make_cfg("teacher.augment=true")
    run(cfg)
    assert calls and set(calls) == {"2,False"}  # the teacher's batches: jitter of 2 pixels, no flips
    (student,) = _runs(cfg, "student")
    assert student.data.tags["kd.teacher_logits"] == "cached"  # the student's inputs are deterministic
    (teacher,) = _runs(cfg, "teacher")
    assert teacher.data.params["teacher.data.augment"] == "True" and teacher.data.params["teacher.data.augment_padding"] == "2"
    run(make_cfg())  # the same teacher without augmentation is another teacher
    assert len(_runs(cfg, "teacher")) == 2


def test_baseline_has_no_teacher(make_cfg):
    cfg = make_cfg("distill=none")
    metrics = run(cfg)
    assert "teacher/params" not in metrics
    (student,) = _runs(cfg)
    assert "train/loss_kd" not in student.data.metrics and "train/loss_ce" in student.data.metrics


def test_a_job_that_raises_leaves_its_run_failed_with_the_reason(make_cfg, monkeypatch):
    def boom(self, batch, batch_idx):
        raise RuntimeError("boom in the training step")

    monkeypatch.setattr(DistillationModule, "training_step", boom)
    cfg = make_cfg()
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    (student,) = _runs(cfg, "student")
    assert student.info.status == "FAILED"
    assert "boom in the training step" in student.data.tags["kd.failure"]
    assert "traceback.txt" in {a.path for a in _client(cfg).list_artifacts(student.info.run_id)}


def test_a_teacher_that_fails_to_train_is_not_cached(make_cfg, monkeypatch):
    def boom(self, batch, batch_idx):
        raise RuntimeError("teacher diverged")

    monkeypatch.setattr(ClassifierModule, "training_step", boom)
    cfg = make_cfg()
    with pytest.raises(RuntimeError, match="diverged"):
        run(cfg)
    assert {r.info.status for r in _runs(cfg)} == {"FAILED"} and len(_runs(cfg)) == 2
    assert not list(Path(cfg.paths.teacher_cache).glob("*/teacher.pt"))


def test_an_interrupted_job_is_failed_not_left_running(make_cfg, monkeypatch):
    def interrupt(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillationModule, "training_step", interrupt)
    cfg = make_cfg()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(cfg)
    (student,) = _runs(cfg, "student")
    assert student.info.status == "FAILED"
    assert student.data.tags["kd.failure"].startswith("interrupted (KeyboardInterrupt")


def test_missing_dataset_fails_before_training_with_instructions(make_cfg, tmp_path):
    cfg = make_cfg("data=mnist", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DataNotFoundError, match="data.download=true"):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()


def test_a_run_leaves_the_tracking_uri_environment_as_it_found_it(make_cfg):
    import os

    run(make_cfg("distill=none"))
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the next run resolves its own store


def test_resume_skips_finished_configs_and_reruns_failed_ones(make_cfg, monkeypatch):
    first = run(make_cfg("resume=true"))
    again = run(make_cfg("resume=true", "trainer.enable_progress_bar=true"))  # display switches do not count
    assert again["test/acc"] == pytest.approx(first["test/acc"])
    cfg = make_cfg("resume=true")
    assert len(_runs(cfg, "student")) == 1  # skipped: no second run

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(DistillationModule, "training_step", boom)
        with pytest.raises(RuntimeError):
            run(make_cfg("resume=true", "seed=5"))
    run(make_cfg("resume=true", "seed=5"))  # the FAILED config runs again
    statuses = sorted(r.info.status for r in _runs(cfg, "student"))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]
    run(make_cfg("resume=false"))  # resume off: always a new run
    assert len(_runs(cfg, "student")) == 4


def test_a_debug_run_goes_to_its_own_experiment_and_its_teacher_is_never_reused_by_a_real_run(make_cfg):
    cfg = make_cfg("trainer=debug", "teacher.max_epochs=3")
    run(cfg)
    assert _runs(cfg) == []  # nothing of a smoke test in the real experiment ...
    debug = _runs(make_cfg("tracking.experiment=kd-debug"))
    assert sorted(r.data.tags["kd.role"] for r in debug) == ["student", "teacher"]  # ... it is in <experiment>-debug
    assert {r.data.tags.get("kd.debug") for r in debug if r.data.tags["kd.role"] == "student"} == {"true"}
    real = make_cfg("teacher.max_epochs=3", "trainer.enable_progress_bar=true")  # display switches do not count
    run(real)
    assert len(_runs(cfg, "teacher")) == 1  # the real run trained its own teacher
    run(make_cfg("teacher.max_epochs=3"))
    assert len(_runs(cfg, "teacher")) == 1  # ... and the same real recipe is reused


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_a_damaged_cached_teacher_is_moved_aside_and_trained_again(make_cfg, damage, caplog):
    cfg = make_cfg()
    run(cfg)
    (weights,) = Path(cfg.paths.teacher_cache).glob("*/teacher.pt")
    blob = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(bytes(blob[: len(blob) // 2]))
    else:  # still a loadable file: only the checksum tells
        blob[-200] ^= 0x01
        weights.write_bytes(bytes(blob))
    again = make_cfg("seed=1")
    metrics = run(again)
    assert metrics["teacher/test_acc"] > 0.5
    assert "is damaged" in caplog.text and str(weights) in caplog.text
    assert len(list(Path(cfg.paths.teacher_cache).glob("*.damaged-*"))) == 1  # kept for a look, out of the way
    teachers = [r for r in _runs(again) if r.data.tags.get("kd.role") == "teacher"]
    assert len(teachers) == 2 and {r.info.status for r in _runs(again)} == {"FINISHED"}  # trained again
    run(make_cfg("seed=2"))  # and the new entry is reused
    assert len([r for r in _runs(again) if r.data.tags.get("kd.role") == "teacher"]) == 2


def test_a_damaged_mlflow_store_is_named_with_the_fix_before_anything_trains(make_cfg):
    cfg = make_cfg()
    store = Path(cfg.paths.output_root) / "mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not a database" * 500)
    with pytest.raises(RuntimeError, match=r"the MLflow store .*mlflow\.db cannot be read .*mv .*mlflow\.db .*mlflow\.db\.broken"):
        run(cfg)
    assert not (Path(cfg.paths.output_root) / "teachers").exists()

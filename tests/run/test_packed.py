"""Packed sweeps (kd/train/packed.py, kd/run/pack.py, hydra/launcher=packed): students trained
together equal the same jobs run alone, each keeps its own MLflow run and files, and what a pack
cannot carry runs alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from kd.run.experiment import run
from kd.run.pack import Job, alone_reason, pack_key, run_pack
from kd.train.packed import PackBatches, unpackable_reason
from kd.data.batches import EpochShuffleSampler


def _student_runs(root: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    return client, [r for r in runs if r.data.tags.get("kd.role") == "student"]


def _history(client, run, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


VARIANTS = [("seed=0", "distill.temperature=4"), ("seed=1", "distill.temperature=2", "distill.alpha=0.5"),
            ("seed=2", "student.optimizer.lr=0.1")]  # fmt: skip


@pytest.mark.parametrize("teacher_logits", ["cached", "online"])
def test_packed_students_equal_the_same_jobs_run_alone(make_cfg, tmp_path, teacher_logits):
    extra = ("trainer.max_epochs=3",) + (("distill_cache=false",) if teacher_logits == "online" else ())
    packed = [make_cfg(*v, *extra, f"paths.run_dir={tmp_path / f'pack{i}'}", f"paths.output_root={tmp_path / 'pack'}") for i, v in enumerate(VARIANTS)]
    assert len({pack_key(c) for c in packed}) == 1  # seeds, temperatures, alphas, learning rates: one pack
    results = run_pack([Job(c, {"choices": {}, "tags": {}}) for c in packed])
    client, runs = _student_runs(tmp_path / "pack")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" and r.data.tags["kd.teacher_logits"] == teacher_logits for r in runs)
    by_hash = {r.data.tags["kd.config_hash"]: r for r in runs}
    for i, v in enumerate(VARIANTS):
        lone = make_cfg(*v, *extra, f"paths.run_dir={tmp_path / f'alone{i}'}", f"paths.output_root={tmp_path / 'alone'}")
        alone = run(lone)
        for key in ("val/acc_best", "test/acc", "teacher/test_acc", "model/params"):
            assert results[i][key] == pytest.approx(alone[key], abs=1e-6), key
        mine, theirs = torch.load(tmp_path / f"pack{i}" / "student.pt"), torch.load(tmp_path / f"alone{i}" / "student.pt")
        assert mine.keys() == theirs.keys() and all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in mine)
        lone_client, lone_runs = _student_runs(tmp_path / "alone")
        lone_run = max(lone_runs, key=lambda r: r.info.start_time)  # the run just made
        packed_run = by_hash[lone_run.data.tags["kd.config_hash"]]  # the same config hash: resume treats them alike
        for key in ("val/acc", "train/loss", "train/loss_kd"):
            assert _history(client, packed_run, key) == pytest.approx(_history(lone_client, lone_run, key), abs=1e-5), key


def test_each_student_follows_the_data_order_it_has_alone():
    torch.manual_seed(7)  # EpochShuffleSampler reads the seed torch was given
    alone = EpochShuffleSampler(list(range(50)))
    pack = PackBatches([3, 7], 50, 16)
    for epoch in (0, 4):
        alone.set_epoch(epoch)
        pack.set_epoch(epoch)
        batches = list(pack)
        assert [b.shape for b in batches] == [(2, 16)] * 3 + [(2, 2)]  # (students, batch); the last batch partial
        assert torch.cat(batches, dim=1)[1].tolist() == list(alone)  # student 1 (seed 7): its lone order
        assert sorted(torch.cat(batches, dim=1)[0].tolist()) == list(range(50))


def test_what_a_pack_cannot_carry_is_named():
    from kd.losses import CrossEntropy

    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert unpackable_reason(plain, CrossEntropy()) is None
    assert unpackable_reason(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)), CrossEntropy()) is None  # packs carry batch norm
    assert "dropout (1)" in unpackable_reason(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)), CrossEntropy())


@pytest.mark.parametrize(("override", "words"), [("prune=magnitude", "prune=MagnitudePruning"), ("quantize=ptq", "quantize=PostTrainingQuantization"),
                                                  ("data.augment=true", "random augmentation"), ("compile=true", "compile=true"),
                                                  ("+trainer.gradient_clip_val=1.0", "gradient_clip_val"), ("trainer.devices=2", "more than one device")])  # fmt: skip
def test_a_job_a_pack_cannot_carry_runs_alone_with_the_reason(make_cfg, override, words):
    cfg = make_cfg(override)
    assert pack_key(cfg) is None and words in alone_reason(cfg)
    assert pack_key(make_cfg()) is not None


def test_jobs_that_differ_in_what_shapes_the_computation_are_not_packed_together(make_cfg):
    base = pack_key(make_cfg())
    assert pack_key(make_cfg("seed=3", "distill.alpha=0.2", "student.optimizer.momentum=0.8")) == base
    for override in ("data.batch_size=32", "trainer.max_epochs=3", "model@student.model=lenet5", "student.optimizer._target_=torch.optim.Adam"):
        assert pack_key(make_cfg(override)) != base, override


def test_one_diverging_student_fails_its_own_run_and_not_the_others(make_cfg, tmp_path):
    cfgs = [make_cfg(f"paths.run_dir={tmp_path / f'job{i}'}", *v) for i, v in enumerate([("seed=0",), ("seed=1", "student.optimizer.lr=1e12")])]
    results = run_pack([Job(c, {"choices": {}, "tags": {}}) for c in cfgs])
    assert isinstance(results[1], FloatingPointError) and "diverged" in str(results[1])
    assert results[0]["test/acc"] > 0.5
    client, runs = _student_runs(Path(cfgs[0].paths.output_root))
    status = {r.info.run_name.rsplit("seed=", 1)[1]: r.info.status for r in runs}
    assert status == {"0": "FINISHED", "1": "FAILED"} and (tmp_path / "job0" / "student.pt").exists()
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "diverged" in failed.data.tags["kd.failure"]


def test_the_packed_launcher_packs_what_it_can_runs_the_rest_alone_and_resumes(run_py, tmp_path):
    argv = run_py("hydra/launcher=packed", "seed=0,1", "quantize=none,dynamic", multirun=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "2 students trained together" in log and log.count("runs alone: quantize=") == 2
    client, runs = _student_runs(tmp_path / "outputs")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # every job a child of the sweep's run, packed or not
    assert sorted(r.data.tags.get("kd.packed", "alone") for r in runs) == ["2", "2", "alone", "alone"]
    assert sorted(r.data.tags["kd.job"] for r in runs) == ["0", "1", "2", "3"]
    folders = sorted(Path(r.data.tags["kd.sweep"]) / r.data.tags["kd.job"] for r in runs)
    assert all((f / "student.pt").exists() and (f / ".hydra" / "config.yaml").exists() for f in folders)
    again = subprocess.run([*argv, "resume=true"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("resume: skipping") == 4
    assert len(_student_runs(tmp_path / "outputs")[1]) == 4  # nothing trained again


def test_students_with_batch_norm_keep_their_own_running_statistics_and_equal_their_lone_runs(make_cfg, tmp_path):
    common = ("model@student.model=resnet8", "trainer.max_epochs=2", "data.limit_train=256", "data.limit_eval=128")
    variants = [("seed=0",), ("seed=1", "distill.temperature=2")]
    packed = [make_cfg(*common, *v, f"paths.run_dir={tmp_path / f'pack{i}'}", f"paths.output_root={tmp_path / 'pack'}") for i, v in enumerate(variants)]
    results = run_pack([Job(c, {"choices": {}, "tags": {}}) for c in packed])
    for i, v in enumerate(variants):
        alone = run(make_cfg(*common, *v, f"paths.run_dir={tmp_path / f'alone{i}'}", f"paths.output_root={tmp_path / 'alone'}"))
        mine, theirs = torch.load(tmp_path / f"pack{i}" / "student.pt"), torch.load(tmp_path / f"alone{i}" / "student.pt")
        stats = [k for k in mine if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert stats and all(torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-4) for k in stats), "running statistics"
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-4) for k in mine)
        assert results[i]["test/acc"] == pytest.approx(alone["test/acc"], abs=1e-6)
    first, second = (torch.load(tmp_path / f"pack{i}" / "student.pt") for i in (0, 1))
    assert not torch.equal(first[stats[0]], second[stats[0]])  # each its own statistics


def test_the_packed_launcher_option_composes_and_refuses_a_bad_pack_size():
    from hydra import compose, initialize_config_dir

    from hydra_plugins.kd_packed_launcher.packed_launcher import PackedLauncher

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=packed", "hydra.launcher.max_pack=4"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("PackedLauncher") and cfg.hydra.launcher.max_pack == 4
    with pytest.raises(ValueError, match=r"hydra\.launcher\.max_pack must be an integer >= 1, got 0"):
        PackedLauncher(max_pack=0)


def test_sigterm_during_a_pack_exits_143_and_closes_every_run_failed(run_py, tmp_path):
    import signal
    import time

    argv = run_py("hydra/launcher=packed", "seed=0,1", "trainer.max_epochs=300", multirun=True)
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in process.stdout:  # the pack's fit has started (Hydra's log lines)
        assert time.monotonic() < deadline
        if "students trained together (" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.stdout.read()
    assert process.wait(timeout=120) == 143
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    by_role = {role: [r for r in runs if r.data.tags.get("kd.role") == role] for role in ("student", "sweep")}
    assert len(by_role["student"]) == 2 and all(r.info.status == "FAILED" for r in by_role["student"])
    assert all(r.data.tags["kd.failure"] == "interrupted (Terminated: SIGTERM)" for r in by_role["student"])
    assert [r.info.status for r in by_role["sweep"]] == ["FAILED"]


def test_jobs_whose_students_turn_out_unpackable_run_alone_and_finish(run_py, tmp_path):
    # mlp has dropout: only the built student says so; the launcher then runs each job alone
    argv = run_py("hydra/launcher=packed", "model@student.model=mlp", "seed=0,1", multirun=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run alone: these jobs cannot train as a pack: the student has dropout (layers.2)" in done.stdout + done.stderr
    client, runs = _student_runs(tmp_path / "outputs")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and "kd.packed" not in r.data.tags for r in runs)

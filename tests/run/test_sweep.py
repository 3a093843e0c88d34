"""Hydra multiruns through the real CLI: one experiment, grouped by sweep, one teacher."""

import os
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def _students_and_teachers(output_root: Path):
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    return (
        [r for r in runs if r.data.tags["kd.role"] == "student"],
        [r for r in runs if r.data.tags["kd.role"] == "teacher"],
    )


def test_parallel_sweep_trains_the_teacher_once_and_a_second_sweep_not_at_all(run_py, tmp_path):
    output_root = tmp_path / "outputs"
    sweep = ["distill.temperature=1,4", "distill.alpha=0.1,0.9", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    done = subprocess.run(run_py(*sweep, multirun=True), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    students, teachers = _students_and_teachers(output_root)
    assert len(students) == 4 and len(teachers) == 1
    assert {r.info.status for r in students + teachers} == {"FINISHED"}
    assert sorted(r.data.tags["kd.teacher_source"] for r in students) == ["cache", "cache", "cache", "trained"]
    assert len({r.data.tags["kd.sweep"] for r in students}) == 1  # grouped by one sweep tag
    assert sorted(r.data.tags["kd.job"] for r in students) == ["0", "1", "2", "3"]
    names = {r.info.run_name for r in students}
    assert names == {f"mlp_small<-mlp kd T={t:g} a={a:g} seed=0" for t in (1, 4) for a in (0.1, 0.9)}
    assert {(r.data.params["distill.temperature"], r.data.params["distill.alpha"]) for r in students} == {
        ("1", "0.1"), ("1", "0.9"), ("4", "0.1"), ("4", "0.9")
    }

    again = subprocess.run(run_py("seed=1,2", multirun=True), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    students, teachers = _students_and_teachers(output_root)
    assert len(students) == 6 and len(teachers) == 1  # no teacher trained by the second sweep
    assert {r.data.tags["kd.teacher_fingerprint"] for r in students} == {teachers[0].data.tags["kd.fingerprint"]}


def test_optuna_search_runs_its_trials_as_mlflow_runs_and_reports_the_best(run_py, tmp_path):
    import yaml

    search = ["hparams_search=kd_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
              f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    done = subprocess.run(run_py(*search, multirun=True), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    students, teachers = _students_and_teachers(tmp_path / "outputs")
    assert len(students) == 3 and len(teachers) == 1 and {r.info.status for r in students} == {"FINISHED"}
    temperatures = {float(r.data.params["distill.temperature"]) for r in students}
    assert len(temperatures) == 3 and all(1.0 <= t <= 20.0 for t in temperatures)  # sampled, in range
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(r.data.metrics["val/acc_best"] for r in students)  # validation, not test


def test_submitit_local_launcher_runs_the_same_jobs(run_py, tmp_path):
    jobs = ["seed=0,1", "distill=none", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    done = subprocess.run(run_py(*jobs, multirun=True), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    students, _ = _students_and_teachers(tmp_path / "outputs")
    assert sorted(r.data.params["seed"] for r in students) == ["0", "1"]
    assert {r.info.status for r in students} == {"FINISHED"} and len({r.data.tags["kd.sweep"] for r in students}) == 1


def test_runs_and_sweeps_started_together_never_share_a_folder(run_py, tmp_path):
    # the run folder was ${now:%H-%M-%S}: two runs started in the same second wrote one student.pt
    quick = ["trainer=debug", "teacher.max_epochs=1", "measure.latency=false"]
    env = {k: v for k, v in os.environ.items() if k != "KD_LAUNCH_ID"}  # four independent launches, as from a shell
    runs = [subprocess.Popen(run_py(*quick, f"seed={s}"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env) for s in (0, 1)]  # fmt: skip
    sweeps = [subprocess.Popen(run_py(*quick, f"seed={s},{s + 10}", multirun=True), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env) for s in (2, 3)]  # fmt: skip
    for p in runs + sweeps:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    outputs = tmp_path / "outputs"
    assert len(list((outputs / "runs").glob("*/*/student.pt"))) == 2
    sweep_dirs = list((outputs / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 2 and all(len(list(d.glob("*/student.pt"))) == 2 for d in sweep_dirs)

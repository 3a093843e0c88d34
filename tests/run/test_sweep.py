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


def _assert_one_parent(output_root: Path, jobs_runs: list, swept: str) -> None:
    """The sweep is one FINISHED parent run; every run its jobs opened (students, the teacher) is its child."""
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.role` = 'sweep'",
                                 order_by=["attributes.start_time DESC"])  # fmt: skip
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["kd.swept"] == swept
    assert parent.data.tags["kd.command"].startswith("python run.py -m ")
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs_runs} == {parent.info.run_id}
    assert parent.data.tags["kd.jobs"] == f"{sum(r.data.tags['kd.role'] == 'student' for r in jobs_runs)} of " \
        f"{sum(r.data.tags['kd.role'] == 'student' for r in jobs_runs)} finished"


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
    names = {r.info.run_name for r in students}  # the swept values lead, so the UI's cut name column shows them
    assert names == {f"T={t:g} a={a:g} · mlp_small<-mlp kd seed=0" for t in (1, 4) for a in (0.1, 0.9)}
    _assert_one_parent(output_root, students + teachers, swept="distill.temperature,distill.alpha")
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
    assert f"distill.temperature={result['best_params']['distill.temperature']}" in result["best_command"]  # how to reproduce it
    _assert_one_parent(tmp_path / "outputs", students + teachers, swept="distill.temperature,distill.alpha,student.optimizer.lr")


def test_submitit_local_launcher_runs_the_same_jobs(run_py, tmp_path):
    jobs = ["seed=0,1", "distill=none", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    done = subprocess.run(run_py(*jobs, multirun=True), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    students, _ = _students_and_teachers(tmp_path / "outputs")
    assert sorted(r.data.params["seed"] for r in students) == ["0", "1"]
    assert {r.info.status for r in students} == {"FINISHED"} and len({r.data.tags["kd.sweep"] for r in students}) == 1
    _assert_one_parent(tmp_path / "outputs", students, swept="seed")  # submitit's worker processes inherit the parent


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
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    debug = client.get_experiment_by_name("kd-debug").experiment_id  # trainer=debug: smoke tests, not in "kd"
    parents = client.search_runs([debug], "tags.`kd.role` = 'sweep'")
    assert len({p.info.run_id for p in parents}) == 2  # two sweeps at the same moment: two parent runs
    for parent in parents:
        children = client.search_runs([debug], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`kd.role` = 'student'")
        assert len(children) == 2 and parent.info.status == "FINISHED"

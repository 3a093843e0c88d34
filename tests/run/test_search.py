"""Searches on kd's Optuna sweeper: the space from Hydra's sweep grammar, objectives and budgets,
a persistent study that a killed search continues without repeating a finished trial, and a
multi-objective search of the student whose Pareto front the trials' MLflow metrics confirm."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from kd.run import search
from kd.run.config import job_result, objectives

# the student search on digits, short: 2 epochs each, the teacher trained once for all trials
PARETO = ["hparams_search=student_pareto", "hydra.sweeper.sampler.population_size=2"]


def test_the_space_comes_from_hydras_sweep_grammar():
    space, fixed = search.search_space({
        "a": "interval(1.0, 20.0)", "b": "tag(log, interval(0.005, 0.2))", "c": "int(interval(1, 4))", "d": "range(1, 8, 3)",
        "e": "choice(8, 16, 32)", "f": "choice([32],[64,64])", "g": "relu", "h": 5,
    })  # fmt: skip
    assert space == {
        "a": FloatDistribution(1.0, 20.0), "b": FloatDistribution(0.005, 0.2, log=True), "c": IntDistribution(1, 4),
        "d": IntDistribution(1, 7, step=3), "e": CategoricalDistribution([8, 16, 32]), "f": CategoricalDistribution(["[32]", "[64,64]"]),
    }  # fmt: skip
    assert fixed == {"g": "relu", "h": "5"}
    assert search.overrides({"f": "[64,64]", "a": 2.5}, fixed) == ["g=relu", "h=5", "f=[64,64]", "a=2.5"]


@pytest.mark.parametrize(("params", "message"), [
    ({"a": "interval(3, 3)"}, r"hydra.sweeper.params.a: 'interval\(3, 3\)' is empty"),
    ({"a": "range(4, 2)"}, r"'range\(4, 2\)' is empty"),
    ({"a": "choice(1, 1)"}, "repeats a choice"),
    ({"a": "interval(1"}, "is not a sweep expression"),
])  # fmt: skip
def test_a_bad_space_is_named(params, message):
    with pytest.raises(ValueError, match=message):
        search.search_space(params)


def test_objectives_directions_and_budgets_are_checked():
    assert objectives("val/acc_best") == ["val/acc_best"]
    assert search.directions(["maximize", "minimize"], ["val/acc_best", "model/macs"]) == ["maximize", "minimize"]
    with pytest.raises(ValueError, match=r"gives 1 direction\(s\) for 2 objective\(s\)"):
        search.directions("maximize", ["val/acc_best", "model/macs"])
    with pytest.raises(ValueError, match="must be maximize or minimize"):
        search.directions("up", ["val/acc_best"])
    with pytest.raises(ValueError, match="distinct names"):
        objectives(["val/acc_best", "val/acc_best"])
    with pytest.raises(ValueError, match="hydra.sweeper.budget.model/macs must be a number"):
        search.check_budget({"model/macs": "small"})


def test_a_job_returns_its_objective_or_the_metrics_a_search_reads():
    metrics = {"val/acc_best": 0.9, "model/macs": 100.0, "test/acc": 0.8}
    assert job_result(metrics, "val/acc_best") == 0.9  # what any Hydra sweeper reads
    assert job_result(metrics, ["val/acc_best", "model/macs"]) == {"val/acc_best": 0.9, "model/macs": 100.0}
    assert job_result(metrics, "val/acc_best", {"model/macs": 50}) == {"val/acc_best": 0.9, "model/macs": 100.0}
    with pytest.raises(KeyError, match=r"the run logged no \['model/params'\].*it logged: model/macs, test/acc, val/acc_best"):
        job_result(metrics, ["val/acc_best", "model/params"])


def test_the_front_is_the_feasible_non_dominated_trials(tmp_path):
    study = search.open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", ["maximize", "minimize"])
    points = [(0.9, 100.0, 0), (0.8, 50.0, 0), (0.85, 120.0, 0), (0.95, 400.0, 1), (0.7, 50.0, 0)]  # (acc, macs, over budget)
    for acc, macs, over in points:
        trial = search.ask(study, {"x": FloatDistribution(0, 1)})
        trial.set_constraint("model/macs", 1.0 if over else -1.0)
        study.tell(trial, [acc, macs])
    # the reference: a trial is on the front when no feasible trial is at least as good in both and better in one
    ok = [p for p in points if not p[2]]
    expected = [i for i, p in enumerate(points) if not p[2] and not any(
        q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in ok)]  # fmt: skip
    assert [t.number for t in search.front(study)] == expected == [0, 1]
    rows = list(csv.DictReader(search.write_front(tmp_path / "f.csv", study, ["val/acc_best", "model/macs"]).read_text().splitlines()))
    assert [r["trial"] for r in rows if r["on_front"] == "True"] == ["0", "1"] and rows[3]["feasible"] == "False"
    assert search.plot_front(tmp_path / "f.png", study, ["val/acc_best", "model/macs"]).stat().st_size > 0


def test_a_dead_workers_trial_fails_when_the_study_is_next_opened_and_no_longer_counts(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = search.open_study(url, "s", ["maximize"], heartbeat_s=1)
    done = search.ask(study, {"x": FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    running = search.ask(study, {"x": FloatDistribution(0, 1)})
    with search.heartbeat(study, [running]):
        pass  # one beat, then the worker "dies" without telling
    assert search.counted(search.open_study(url, "s", ["maximize"], heartbeat_s=1)) == 2  # still beating recently: alive
    time.sleep(4 * 1 + 1.5)  # past the grace period of four missed beats
    again = search.open_study(url, "s", ["maximize"], heartbeat_s=1)
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert search.counted(again) == 1


def test_an_interrupted_batch_fails_its_trials_at_once(tmp_path):
    study = search.open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", ["maximize"])
    trial = search.ask(study, {"x": FloatDistribution(0, 1)})
    with pytest.raises(KeyboardInterrupt), search.heartbeat(study, [trial]):
        raise KeyboardInterrupt
    assert study.trials[0].state == optuna.trial.TrialState.FAIL and search.counted(study) == 0


def _students(output_root: Path):
    client = MlflowClient(f"sqlite:///{output_root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    return client, [r for r in runs if r.data.tags["kd.role"] == "student"], [r for r in runs if r.data.tags["kd.role"] == "sweep"]


def test_a_student_search_finds_the_front_its_trials_logged_and_every_trial_is_a_nested_run(run_py, tmp_path):
    done = subprocess.run(run_py(*PARETO, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", multirun=True),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client, students, (parent,) = _students(tmp_path / "outputs")
    rows = list(csv.DictReader((tmp_path / "sweep" / "pareto_front.csv").read_text().splitlines()))
    keys = ("search.width", "search.depth", "distill.temperature", "student.optimizer.lr")

    def config(values) -> tuple:
        return tuple(float(values[k]) for k in keys)

    assert len(rows) == 4 and len(students) == len({config(r) for r in rows})  # a repeated config reuses its run (resume)
    assert {r.info.status for r in students} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in students} == {parent.info.run_id}
    # the front, recomputed here from what the trials logged to MLflow
    points = {config(r.data.params): (r.data.metrics["val/acc_best"], r.data.metrics["model/macs"]) for r in students}
    expected = {k for k, (a, m) in points.items()
                if not any(a2 >= a and m2 <= m and (a2 > a or m2 < m) for a2, m2 in points.values())}  # fmt: skip
    found = {config(r) for r in rows if r["on_front"] == "True"}
    assert found == expected
    for r in rows:  # each trial's MACs are the MLP's multiply-accumulates: 64 inputs, depth x width hidden, 10 classes
        width, depth = int(r["search.width"]), int(r["search.depth"])
        assert float(r["model/macs"]) == 64 * width + (depth - 1) * width * width + width * 10
        assert f"search.width={width} search.depth={depth}" in r["command"]
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert {config(f["params"]) for f in result["pareto_front"]} == expected
    assert {"pareto_front.csv", "pareto_front.png", "optimization_results.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.info.status == "FINISHED" and parent.data.tags["kd.swept"] == ",".join(keys)


def test_a_killed_search_continues_its_study_without_repeating_a_finished_trial(run_py, tmp_path):
    db = tmp_path / "outputs" / "optuna.db"
    argv = run_py(*PARETO, "hydra.sweeper.n_trials=3", "hydra.sweeper.heartbeat_s=1", multirun=True)
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:  # until one trial finished and the next is running
        time.sleep(0.5)
        if not db.exists():
            continue
        try:
            (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
            states = [t.state for t in optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}").trials]
        except (ValueError, RuntimeError):
            continue  # the study is being created
        if states.count(optuna.trial.TrialState.COMPLETE) == 1 and states[-1] == optuna.trial.TrialState.RUNNING:
            break
    assert first.poll() is None, f"the search ended before it could be killed: {first.stderr.read()[-2000:]}"
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=120) != 0
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 3 trials already there, 2 to run" in again.stderr + again.stdout
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(f"sqlite:///{db}")[0].study_name, storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and states[1] == optuna.trial.TrialState.FAIL  # the killed one
    _, students, _ = _students(tmp_path / "outputs")
    finished = [r for r in students if r.info.status == "FINISHED"]
    configs = {tuple(sorted(t.params.items())) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(finished) == len(configs)  # the first trial's student ran once, not again after the kill
    assert "RUNNING" not in {r.info.status for r in students}

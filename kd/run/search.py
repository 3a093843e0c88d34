"""Optuna studies behind ``hydra/sweeper=kd_optuna`` (``hparams_search=kd_optuna``,
``hparams_search=student_pareto``): the search space from Hydra's sweep grammar, a study that
persists in a database and resumes, one or several objectives with an optional hard budget, and the
Pareto front as a table and a plot.

- **Space.** ``hydra.sweeper.params`` maps config keys to Hydra's sweep expressions:
  ``interval(a, b)`` (float; ``int(interval(a, b))`` integer; ``tag(log, interval(...))`` log
  scale), ``range(a, b[, step])`` (integers, ``b`` excluded), ``choice(x, y, ...)`` or ``x,y,...``
  (categorical; lists such as ``choice([32],[64,64])`` are offered as their override text), or a
  plain value (fixed for every trial).
- **Objectives.** ``optimized_metric`` names one metric of a run (``val/acc_best``) or a list
  (``[val/acc_best, model/macs]``), with ``hydra.sweeper.direction`` one direction or as many.
  ``hydra.sweeper.budget`` (``{model/macs: 20000}``) makes a trial whose metric exceeds the limit
  infeasible (Optuna's trial constraints, ``metric - limit``): the samplers steer away from it and
  it never enters the front.
- **Persistence.** The study lives in ``hydra.sweeper.storage`` (default: ``optuna.db`` beside
  kd's MLflow store; a PostgreSQL URL serves a team), under ``hydra.sweeper.study_name``. Running the
  same command again continues the study: ``n_trials`` counts the trials the study holds, finished
  or running, so a killed search repeats none that finished, and several workers share one study.
  A worker's trials send a heartbeat; the trials of a worker that died are marked FAIL at the next
  start (Optuna's ``fail_stale_trials``) and do not count.
"""

from __future__ import annotations

import csv
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from kd.tracking.figures import new_figure, save_figure

DIRECTIONS = ("maximize", "minimize")
HEARTBEAT_S = 30  # a running trial's heartbeat; 4 missed ones and the trial counts as dead


def search_space(params: Mapping[str, Any]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Optuna distributions for the swept keys of ``params`` and the override text of the fixed ones."""
    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for key, expression in params.items():
        text = str(expression)
        try:
            override = parser.parse_override(f"{key}={text}")
        except Exception as err:  # Hydra's grammar error, with its own position and message
            raise ValueError(f"hydra.sweeper.params.{key}: {text!r} is not a sweep expression ({err})") from None
        if not override.is_sweep_override():
            fixed[key] = text
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            low, high = value.start, value.end
            if not low < high:
                raise ValueError(f"hydra.sweeper.params.{key}: {text!r} is empty")
            log = "log" in value.tags
            if isinstance(low, int) and isinstance(high, int):
                space[key] = IntDistribution(low, high, log=log)
            else:
                space[key] = FloatDistribution(float(low), float(high), log=log)
        elif isinstance(value, RangeSweep):
            if value.shuffle or not all(isinstance(v, int) for v in (value.start, value.stop, value.step)) or value.step <= 0:
                raise ValueError(f"hydra.sweeper.params.{key}: range() must be of integers with a positive step, got {text!r}")
            if value.stop <= value.start:
                raise ValueError(f"hydra.sweeper.params.{key}: {text!r} is empty")
            high = value.start + (value.stop - 1 - value.start) // value.step * value.step
            space[key] = IntDistribution(value.start, high, step=value.step)
        elif isinstance(value, ChoiceSweep):
            choices = [v if isinstance(v, (bool, int, float, str)) or v is None else _override_text(v) for v in value.list]
            if len(set(map(repr, choices))) != len(choices):
                raise ValueError(f"hydra.sweeper.params.{key}: {text!r} repeats a choice")
            space[key] = CategoricalDistribution(choices)
        else:
            raise ValueError(f"hydra.sweeper.params.{key}: {text!r} is not supported (interval, range or choice)")
    return space, fixed


def _override_text(value: Any) -> str:
    """A list or dict choice as Hydra's override grammar spells it (``[64,64]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def overrides(params: Mapping[str, Any], fixed: Mapping[str, str]) -> list[str]:
    """A trial's overrides: its sampled values and the fixed ones."""
    return [f"{k}={v}" for k, v in fixed.items()] + [f"{k}={v}" for k, v in params.items()]


def directions(direction: str | Sequence[str], names: Sequence[str]) -> list[str]:
    """One direction per objective (a single direction serves a single objective)."""
    given = [direction] if isinstance(direction, str) else [str(d) for d in direction]
    if any(d not in DIRECTIONS for d in given):
        raise ValueError(f"hydra.sweeper.direction must be {' or '.join(DIRECTIONS)} (or a list of them), got {direction!r}")
    if len(given) != len(names):
        raise ValueError(f"hydra.sweeper.direction gives {len(given)} direction(s) for {len(names)} objective(s) {list(names)} "
                         "(optimized_metric)")  # fmt: skip
    return given


def check_budget(budget: Mapping[str, Any] | None) -> dict[str, float]:
    limits = {}
    for name, limit in (budget or {}).items():
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise ValueError(f"hydra.sweeper.budget.{name} must be a number (the largest value a trial may have), got {limit!r}")
        limits[str(name)] = float(limit)
    return limits


def feasible(trial: FrozenTrial) -> bool:
    """Within the budget: every constraint the trial set (``metric - limit``) at most 0."""
    return all(c <= 0 for c in trial.constraints.values())


def storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """The study's database, with heartbeats so a dead worker's trials can be told apart."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 (since 2.9): the feature is what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s)


def open_study(url: str, name: str, directions: Sequence[str], sampler: Callable[[int], Any] | None = None,
               heartbeat_s: int = HEARTBEAT_S) -> optuna.Study:  # fmt: skip
    """The study ``name`` in ``url`` (created, or loaded to continue), its dead workers' trials
    failed; ``sampler(n)`` makes its sampler, ``n`` the trials the study already holds (a seeded
    sampler must not draw a continued study's first values again)."""
    store = storage(url, heartbeat_s)
    study = optuna.create_study(storage=store, study_name=name, directions=list(directions), load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                                  for d in directions]:  # fmt: skip
        raise ValueError(f"study {name!r} in {url} was created with directions {[d.name.lower() for d in study.directions]}, "
                         f"not {list(directions)}: use another hydra.sweeper.study_name")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if sampler is not None:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler(len(study.trials)))
    return study


def ask(study: optuna.Study, space: Mapping[str, BaseDistribution]) -> optuna.Trial:
    """A new trial of ``space``. Optuna warns that heartbeats go with ``optimize``: here
    :func:`heartbeat` sends them while the launcher runs the trials."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask(dict(space))


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: finished, pruned, or running in a live worker."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


@contextmanager
def heartbeat(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Record the trials' heartbeats while they run (Optuna does this only inside ``optimize``);
    if the run is interrupted (Ctrl-C, SIGTERM, a launcher's error) they are failed at once, so
    the next start need not wait for them to go stale."""
    store, stop = study._storage, threading.Event()
    interval = store.get_heartbeat_interval() or HEARTBEAT_S

    def beat() -> None:
        while True:
            for trial in trials:
                store.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="kd-optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        for trial in trials:
            study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        stop.set()
        thread.join()


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible finished trials no other one dominates (Optuna's ``best_trials``; for one
    objective, the best), in trial order."""
    return sorted(study.best_trials, key=lambda t: t.number)


def write_front(path: Path, study: optuna.Study, names: Sequence[str]) -> Path:
    """``pareto_front.csv``: every finished trial, its parameters, objectives, feasibility, whether
    it is on the front, and the command that reproduces it."""
    on_front = {t.number for t in front(study)}
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    keys = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *keys, *names, "feasible", "on_front", "command"])
        for t in trials:
            writer.writerow([t.number, *(t.params.get(k, "") for k in keys), *t.values, feasible(t), t.number in on_front,
                             t.user_attrs.get("kd.command", "")])  # fmt: skip
    return path


def plot_front(path: Path, study: optuna.Study, names: Sequence[str]) -> Path | None:
    """The trials in the plane of the first two objectives, the front joined and highlighted,
    infeasible trials hollow; one objective: the objective by trial number."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return None
    best = front(study)
    fig, ax = new_figure((6.4, 4.4))
    if len(names) == 1:
        ax.plot([t.number for t in trials], [t.value for t in trials], "o", color="0.6", label="trials")
        ax.plot([t.number for t in best], [t.value for t in best], "o", color="C3", label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0])
    else:
        x, y = 1, 0  # the cost (second objective) across, the quality up
        ok = [t for t in trials if feasible(t)]
        out = [t for t in trials if not feasible(t)]
        ax.scatter([t.values[x] for t in ok], [t.values[y] for t in ok], color="0.6", label="trials")
        if out:
            ax.scatter([t.values[x] for t in out], [t.values[y] for t in out], facecolors="none", edgecolors="0.6", label="over budget")
        line = sorted(best, key=lambda t: t.values[x])
        ax.plot([t.values[x] for t in line], [t.values[y] for t in line], "o-", color="C3", label="Pareto front")
        for t in line:
            ax.annotate(str(t.number), (t.values[x], t.values[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(names[x])
        ax.set_ylabel(names[y])
    ax.set_title(f"{len(trials)} finished trials, {len(best)} on the {'front' if len(names) > 1 else 'best value'}", fontsize=10)
    return save_figure(fig, ax, path, legend_fontsize=None)

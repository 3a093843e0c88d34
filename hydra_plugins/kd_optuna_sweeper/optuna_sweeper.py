"""``python run.py -m hydra/sweeper=kd_optuna hydra.sweeper.params.distill.temperature='interval(1,20)'``
(or an ``hparams_search`` config that sets it up): Optuna asks for ``n_jobs`` trials at a time, the
configured launcher runs them as Hydra jobs (folders, ``.hydra/`` files, callbacks, the sweep's
MLflow parent run), and each job's metrics are told back. The space, objectives, budget, storage
and results: ``kd.run.search``.

Hydra's own Optuna plugin pins optuna<3, whose database storage fails under SQLAlchemy 2 (which
MLflow needs), and it has no budget; this one runs on Optuna 5 and keeps the plugin's config keys
(``sampler``, ``direction``, ``study_name``, ``storage``, ``n_trials``, ``n_jobs``, ``params``).
"""

# (its options live in conf/hydra/sweeper/kd_optuna.yaml, not in Hydra's ConfigStore: as for the
# packed launcher, a stored dataclass would be pickled into submitit's jobs)

import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: Any = "maximize", study_name: str | None = None, storage: str | None = None,
                 n_trials: int = 20, n_jobs: int = 1, params: Mapping[str, Any] | None = None,
                 budget: Mapping[str, Any] | None = None, heartbeat_s: int = 30) -> None:  # fmt: skip
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs), ("heartbeat_s", heartbeat_s)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"hydra.sweeper.{key} must be an integer >= 1, got {value!r}")
        self.sampler, self.direction, self.study_name, self.storage = sampler, direction, study_name, storage
        self.n_trials, self.n_jobs, self.heartbeat_s = n_trials, n_jobs, heartbeat_s
        self.params = dict(params or {})
        self.budget = dict(budget or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from kd.run import search  # Optuna only when a search runs
        from kd.run.config import experiment_name, objectives

        assert self.config is not None and self.launcher is not None
        names = objectives(OmegaConf.to_container(self.config.optimized_metric)
                                  if OmegaConf.is_list(self.config.optimized_metric) else self.config.optimized_metric)  # fmt: skip
        directions = search.directions(OmegaConf.to_container(self.direction) if OmegaConf.is_config(self.direction) else self.direction,
                                       names)  # fmt: skip
        limits = search.check_budget(self.budget)
        space, fixed = search.search_space(self.params)
        swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(arguments) if o.is_sweep_override()]
        if swept:
            raise ValueError(f"{swept}: with hydra/sweeper=kd_optuna the swept keys go in hydra.sweeper.params "
                             f"(e.g. hydra.sweeper.params.{swept[0]}='choice(...)'); the command line fixes the others")  # fmt: skip
        if not space:
            raise ValueError("hydra.sweeper.params holds nothing to search: give a key an interval(), range() or choice()")
        output_root = Path(str(self.config.paths.output_root)).resolve()
        url = self.storage or f"sqlite:///{output_root / 'optuna.db'}"
        name = self.study_name or f"{experiment_name(self.config)}:{','.join(sorted(space))}->{','.join(names)}"
        study = search.open_study(url, name, directions, self._sampler if self.sampler else None, self.heartbeat_s)
        done = search.counted(study)
        log.info(f"Optuna study {name!r} in {url}: {done} of {self.n_trials} trials already there, "
                 f"{max(self.n_trials - done, 0)} to run, {self.n_jobs} at a time; objectives "
                 + ", ".join(f"{d} {n}" for d, n in zip(directions, names))
                 + (f"; budget {', '.join(f'{k} <= {v:g}' for k, v in limits.items())}" if limits else ""))  # fmt: skip
        job = 0
        while (left := self.n_trials - search.counted(study)) > 0:
            trials = [search.ask(study, space) for _ in range(min(self.n_jobs, left))]
            batch = [[*arguments, *search.overrides(t.params, fixed)] for t in trials]
            for trial, job_overrides in zip(trials, batch):
                trial.set_user_attr("kd.command", shlex.join(["python", "run.py", *job_overrides]))
            with search.heartbeat(study, trials):
                returns = self.launcher.launch(batch, initial_job_idx=job)
            job += len(trials)
            for trial, ret in zip(trials, returns):
                self._tell(study, trial, ret, names, limits)
        self._results(study, names, url, Path(str(self.config.hydra.sweep.dir)))

    def _sampler(self, existing: int) -> Any:
        """The configured sampler; a continued study's seeded one with its seed moved on by the
        trials the study holds, so it draws new values."""
        seed = self.sampler.get("seed")
        return instantiate(self.sampler, **({"seed": seed + existing} if isinstance(seed, int) and existing else {}))

    def _tell(self, study: Any, trial: Any, ret: Any, names: Sequence[str], limits: Mapping[str, float]) -> None:
        import optuna

        if ret.status != JobStatus.COMPLETED:
            log.warning(f"trial {trial.number} failed ({type(ret._return_value).__name__}: {ret._return_value}); the study goes on")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        value = ret.return_value
        metrics = value if isinstance(value, Mapping) else {names[0]: value}
        for metric, limit in limits.items():
            trial.set_constraint(metric, float(metrics[metric]) - limit)
        study.tell(trial, [float(metrics[n]) for n in names])

    def _results(self, study: Any, names: Sequence[str], url: str, sweep_dir: Path) -> None:
        """``optimization_results.yaml`` (the best parameters; with several objectives, the front),
        ``pareto_front.csv`` and ``pareto_front.png`` in the sweep's folder and on its MLflow run."""
        import os

        import yaml

        from kd.run import search
        from kd.tracking.store import resolve_uri
        from kd.tracking.tracker import PARENT_ENV

        sweep_dir.mkdir(parents=True, exist_ok=True)
        best = search.front(study)
        result: dict[str, Any] = {"name": "kd_optuna", "study": study.study_name, "storage": url, "objectives": list(names)}
        if len(names) == 1 and best:
            result |= {"best_params": best[0].params, "best_value": best[0].value, "best_command": best[0].user_attrs.get("kd.command")}
        else:
            result["pareto_front"] = [{"trial": t.number, "params": t.params, "values": dict(zip(names, t.values)),
                                       "command": t.user_attrs.get("kd.command")} for t in best]  # fmt: skip
        (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(result, sort_keys=False))
        files = [search.write_front(sweep_dir / "pareto_front.csv", study, names), search.plot_front(sweep_dir / "pareto_front.png", study, names)]
        log.info(f"the study's {'front' if len(names) > 1 else 'best'}: "
                 + "; ".join(f"trial {t.number} {dict(zip(names, t.values))}" for t in best) + f" ({sweep_dir / 'optimization_results.yaml'})")  # fmt: skip
        parent = os.environ.get(PARENT_ENV)
        if parent and self.config is not None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(resolve_uri(self.config.tracking.uri, Path(str(self.config.paths.output_root))))
            for path in [sweep_dir / "optimization_results.yaml", *(f for f in files if f is not None)]:
                client.log_artifact(parent, str(path))
            client.set_tag(parent, "kd.study", f"{study.study_name} @ {url}")

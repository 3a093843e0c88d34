"""``python run.py -m hydra/launcher=packed distill.temperature=1,4,8 distill.alpha=0.5,0.9``:
the jobs that can train together (``kd.run.pack.pack_key``) train as packs of at most
``hydra.launcher.max_pack`` students; the others run one by one, as the basic launcher runs
them. The log says which job went where and why.

Every job still goes through Hydra's ``run_job`` (its folder, ``.hydra/`` files, logging,
callbacks); a packed job's task only records its config there, and the pack trains after.
"""

# (its options live in conf/hydra/launcher/packed.yaml, not in Hydra's ConfigStore: a stored
# dataclass would be pickled into submitit's jobs, whose workers cannot import this folder)

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class PackedLauncher(Launcher):
    def __init__(self, max_pack: int = 16) -> None:
        if isinstance(max_pack, bool) or not isinstance(max_pack, int) or max_pack < 1:
            raise ValueError(f"hydra.launcher.max_pack must be an integer >= 1, got {max_pack!r}")
        self.max_pack = max_pack
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def _run(self, sweep_config: DictConfig, task: TaskFunction) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None
        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kd.run.pack import Job, NotPackable, alone_reason, pack_key, run_pack  # torch and Lightning only when a sweep runs
        from kd.run.config import job_result
        from kd.tracking.tracker import hydra_context

        setup_globals()
        assert self.config is not None and self.task_function is not None
        budget = self.config.hydra.sweeper.get("budget")  # what a search's sweeper reads besides the objectives
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        groups: dict[str, list[int]] = {}
        alone: list[int] = []
        for i, sweep_config in enumerate(configs):
            task_cfg = _task_config(sweep_config)
            key = pack_key(task_cfg)
            if key is None:
                alone.append(i)
                log.info("job #%d runs alone: %s", initial_job_idx + i, alone_reason(task_cfg))
            else:
                groups.setdefault(key, []).append(i)
        packs = [members[s : s + self.max_pack] for members in groups.values() for s in range(0, len(members), self.max_pack)]
        common = set.intersection(*(set(filter_overrides(o)) for o in job_overrides)) if job_overrides else set()
        for n, members in enumerate(packs, start=1):
            differ = ["[" + " ".join(o for o in filter_overrides(job_overrides[i]) if o not in common) + "]" for i in members]
            log.info("pack %d of %d: jobs %s, %d students trained together: %s", n, len(packs),
                     ", ".join(f"#{initial_job_idx + i}" for i in members), len(members), " ".join(differ))  # fmt: skip
        returns: dict[int, JobReturn] = {}
        for members in packs:
            recorded: list[Any] = []

            def record(cfg: DictConfig) -> None:
                # inside run_job: this job's folder exists and HydraConfig is this job's
                with open_dict(cfg):
                    cfg.paths.run_dir = str(cfg.paths.run_dir)  # resolved now, for this job
                recorded.append(Job(cfg, hydra_context()))

            rets = [self._run(configs[i], record) for i in members]
            jobs = list(recorded)
            failed_early = [r for r in rets if r.status != JobStatus.COMPLETED]
            if failed_early:  # a job's folder or config could not be made: report it as its own failure
                for i, r in zip(members, rets):
                    returns[i] = r
                continue
            try:
                results = run_pack(jobs)
            except NotPackable as err:  # seen only once the students were built (dropout, feature hooks): each alone
                log.info("jobs %s run alone: %s", ", ".join(f"#{initial_job_idx + i}" for i in members), err)
                alone += members
                continue
            except Exception as err:  # noqa: BLE001  (the whole pack failed before its students could)
                results = [err] * len(jobs)
            for i, ret, job, result in zip(members, rets, jobs, results):
                if isinstance(result, BaseException):
                    ret.status, ret.return_value = JobStatus.FAILED, result
                else:
                    ret.status, ret.return_value = JobStatus.COMPLETED, job_result(result, job.cfg.optimized_metric, budget)
                returns[i] = ret
        for i in alone:
            returns[i] = self._run(configs[i], self.task_function)
        return [returns[i] for i in range(len(configs))]


def _task_config(sweep_config: DictConfig) -> DictConfig:
    """The job's config without ``hydra`` (what its task would see), for grouping only."""
    import copy

    from omegaconf import read_write

    task_cfg = copy.deepcopy(sweep_config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg

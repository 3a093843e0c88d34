"""The single entry point: ``python run.py [overrides]`` or ``python run.py -m <sweep>``."""

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import kd  # noqa: F401  (light: registers kd's config resolvers, so `--cfg job --resolve` works; telemetry off)
from kd.run.typos import typo_hints


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    from kd.run.experiment import run  # imported here so `--help` and `--cfg` stay fast
    from kd.run.config import job_result

    sweeper = HydraConfig.get().sweeper
    result = job_result(run(cfg), OmegaConf.to_object(cfg.optimized_metric) if OmegaConf.is_list(cfg.optimized_metric)
                        else cfg.optimized_metric, sweeper.get("budget"))  # fmt: skip
    _single_run_done.append(HydraConfig.get().mode == RunMode.RUN)
    return result


_single_run_done: list[bool] = []


def _leave_now() -> None:
    """After one run that succeeded, everything written and flushed, end the process without
    Python's teardown, which spends about 2.5 s unloading torch, Lightning and MLflow modules one
    by one. Only for a single run (a multirun's launchers shut their workers down at exit);
    ``KD_FAST_EXIT=0`` keeps the normal exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
        if _single_run_done == [True] and os.environ.get("KD_FAST_EXIT", "1") != "0":
            _leave_now()
    except SystemExit as stop:
        if stop.code == 1:  # Hydra refused the command line: name the key a typo meant
            for hint in typo_hints(sys.argv[1:], Path(__file__).parent / "conf"):
                print(hint, file=sys.stderr)
        raise

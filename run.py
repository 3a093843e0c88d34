"""The single entry point: ``python run.py [overrides]`` or ``python run.py -m <sweep>``."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import kd  # noqa: F401  (light: registers kd's config resolvers, so `--cfg job --resolve` works; telemetry off)
from kd.run.typos import typo_hints


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from kd.run.experiment import run  # imported here so `--help` and `--cfg` stay fast

    return run(cfg)[cfg.optimized_metric]


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if stop.code == 1:  # Hydra refused the command line: name the key a typo meant
            for hint in typo_hints(sys.argv[1:], Path(__file__).parent / "conf"):
                print(hint, file=sys.stderr)
        raise

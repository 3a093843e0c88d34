"""kd's Optuna sweeper for Hydra (``hydra/sweeper=kd_optuna``): Hydra finds sweepers only in the
``hydra_plugins`` namespace package, so the class lives here and the study's work in ``kd.run.search``."""

"""kd's packed launcher for Hydra (``hydra/launcher=packed``): Hydra finds launchers only in the
``hydra_plugins`` namespace package, so the class lives here and the work in ``kd.run.pack``."""

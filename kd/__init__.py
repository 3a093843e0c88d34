"""kd: knowledge distillation and model compression (Lightning + Hydra + MLflow)."""

import os as _os

# MLflow 3 sends usage telemetry unless told not to; kd talks to no host but the tracking URI.
# Set before anything imports mlflow; a user's own MLFLOW_DISABLE_TELEMETRY=false still wins.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from kd.run import config as _config  # noqa: F401  (registers the OmegaConf resolvers)

import logging as _logging

# torch warns at import, on a machine with a CUDA toolkit path but no GPU, that it found no
# CUDA runtime; kd runs on such machines by design (CPU), so the line is noise.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

"""kd: knowledge distillation and model compression on Lightning, Hydra and MLflow."""

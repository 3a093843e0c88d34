"""Saving and loading weights safely: state dicts only, written atomically.

Anything a user points at is loaded with ``torch.load(weights_only=True)``; a file that needs
arbitrary unpickling is refused unless the caller opts in (``allow_pickle=True``), because
unpickling runs code from the file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (temp file + rename): a reader never
    sees a half-written file, and a crash leaves no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain ``torch.save(state_dict)`` file or a Lightning checkpoint.

    Lightning checkpoints keep the weights under ``"state_dict"`` with the module attribute as
    prefix (``model.``); that prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than weights and would need arbitrary unpickling, which can run "
            "code from the file. Re-save it as a state dict, or opt in if you trust it "
            "(teacher.allow_pickle=true / student.allow_pickle=true)."
        ) from err
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if not k.startswith("teacher.")}
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def load_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the missing and unexpected keys."""
    state = load_state_dict(path, allow_pickle)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]}. Does the architecture config match the checkpoint?"
        )
    return model

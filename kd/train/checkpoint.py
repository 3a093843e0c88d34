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

from kd.compression.factorize import FACTORIZED_KEY, LowRank
from kd.compression.thinning import PRUNED_KEY, remove_channels


def save_weights(model: nn.Module, path: str | Path, extras: dict | None = None) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (temp file + rename): a reader never
    sees a half-written file, and a crash leaves no partial file behind.

    ``extras`` (plain data: what rebuilds a physically pruned architecture) are stored beside
    the weights as ``{"state_dict": ..., **extras}``; without them the file is the bare state dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": model.state_dict(), **extras} if extras else model.state_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The state dict of ``path`` and, for a physically pruned model, the channels removed from
    the dense architecture (empty otherwise)."""
    obj = _load(path, allow_pickle)
    pruned = obj.get(PRUNED_KEY, {}) if isinstance(obj, dict) else {}
    return _state_dict(obj, path), pruned


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain ``torch.save(state_dict)`` file or a Lightning checkpoint.

    Lightning checkpoints keep the weights under ``"state_dict"`` with the module attribute as
    prefix (``model.``); that prefix is removed.
    """
    return _state_dict(_load(path, allow_pickle), path)


def _load(path: str | Path, allow_pickle: bool) -> object:
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
    return obj


def _state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if not k.startswith("teacher.")}
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def load_weights(
    model: nn.Module, path: str | Path, allow_pickle: bool = False, input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the missing and unexpected keys.

    A physically pruned checkpoint first removes its channels from ``model`` (the dense
    architecture of its config), which needs ``input_shape`` to trace the graph; a factorised
    one first replaces its layers by their low-rank factors (``kd.compression.factorize``).
    """
    obj = _load(path, allow_pickle)
    state, extras = _state_dict(obj, path), obj if isinstance(obj, dict) else {}
    rebuild_architecture(model, extras, input_shape, path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]}. Does the architecture config match the checkpoint?"
        )
    return model


def rebuild_architecture(model: nn.Module, extras: dict, input_shape: tuple[int, ...] | None, path: str | Path = "") -> nn.Module:
    """Replay onto ``model`` (the architecture of the config) what a saved file records beside its
    weights: low-rank factors (``FACTORIZED_KEY``), then removed channels (``PRUNED_KEY``, which
    needs ``input_shape`` to trace the graph). The float and the int8 files share it."""
    if FACTORIZED_KEY in extras:  # a low-rank model: rebuild its two-layer factors first
        LowRank.apply_ranks(model, extras[FACTORIZED_KEY])
    if pruned := extras.get(PRUNED_KEY, {}):
        if input_shape is None:
            raise ValueError(f"{path} holds a physically pruned model: loading it needs the input shape")
        remove_channels(model, pruned, input_shape)
    return model

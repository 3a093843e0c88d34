"""Which flow makes the int8 model (``quantize.engine``): torchao's PT2E (``callbacks/pt2e_quant.py``)
by default, torch's FX graph mode (``callbacks/fx_quant.py``) where PT2E cannot do it yet, and
reloading a saved int8 model with the flow that made it.

PT2E captures the student with ``torch.export``: the captured graph has parameters but no layer
modules. Two things kd does need the layers, and keep QAT on the FX flow when ``engine=auto``:
distillation-aware QAT (the objective's forward hooks sit on the student's feature layers) and
QAT together with unstructured pruning (the pruner registers its masks on the fake-quant layers).
``engine=pt2e`` with either is refused before training; ``engine=fx`` is the old flow throughout
(torch deprecates it: the PT2E flow lives on in torchao).
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from callbacks import fx_quant
from callbacks.stage import THINNING
from kd.train.checkpoint import rebuild_architecture

ENGINES = ("auto", "pt2e", "fx")
BACKENDS = ("auto", "x86", "fbgemm", "qnnpack", "xnnpack")
RECIPE_KEY = "kd.quantization"


def flow(engine: str) -> ModuleType:
    """The module of ``engine`` (``pt2e`` or ``fx``); PT2E's is imported on first use (torchao
    takes about 2.5 s to import, which a run that does not quantize should not pay)."""
    if engine == "pt2e":
        from callbacks import pt2e_quant  # the layout's one deferred import of our own (tests/run/test_layout.py)

        return pt2e_quant
    return fx_quant


def fx_reason(mode: str, objective: Any, pruner: Any) -> str | None:
    """Why this run's quantization needs the FX flow, or None when PT2E can do it."""
    if mode != "qat":
        return None
    if objective is not None and getattr(objective, "needs_features", False):
        return "distillation-aware QAT hooks the student's feature layers, which a torch.export graph does not keep"
    if pruner is not None and pruner.kind not in THINNING:
        return "QAT with pruning registers the masks on the fake-quant layers, which a torch.export graph does not keep"
    return None


def resolve_backend(backend: str, engine: str) -> str:
    """The quantizer (PT2E) or kernel library (FX) that ``backend`` names for ``engine``. PT2E:
    ``auto`` is x86's quantizer on an x86 CPU and XNNPACK's elsewhere; ``fbgemm`` is x86's,
    ``qnnpack`` XNNPACK's. FX: ``auto`` is x86 on a CPU with VNNI and qnnpack elsewhere
    (``fx_quant.has_vnni``); ``xnnpack`` is qnnpack."""
    if backend not in BACKENDS:
        raise ValueError(f"quantize.backend must be one of {BACKENDS}, got {backend!r}")
    if engine == "pt2e":
        if backend == "auto":
            return "x86" if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else "xnnpack"
        return {"fbgemm": "x86", "qnnpack": "xnnpack"}.get(backend, backend)
    resolved = ("x86" if fx_quant.has_vnni() else "qnnpack") if backend == "auto" else {"xnnpack": "qnnpack"}.get(backend, backend)
    if resolved not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantize.backend={resolved!r} is not built into this torch ({torch.backends.quantized.supported_engines})")
    return resolved


def load_quantized(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> nn.Module:
    """Rebuild a saved int8 model (``student_int8.pt``): ``model`` is the float architecture of its
    config; the file holds the int8 state, the recipe (with the flow that made it: FX for files
    written before kd had PT2E) and what reshaped the float model before it was quantized (removed
    channels, low-rank factors), loaded with ``weights_only=True``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    recipe = saved[RECIPE_KEY]
    model = rebuild_architecture(model, saved, input_shape, path)
    return flow(recipe.get("engine", "fx")).load_quantized(model, saved, recipe, input_shape)


def lowering(recipe: dict[str, Any] | None):
    """How to run ``recipe``'s int8 model fast for timing: PT2E's through Inductor (a callable
    model -> model); None for the FX flow, whose int8 modules are fast as they are."""
    if recipe is None or recipe.get("engine") != "pt2e":
        return None
    return flow("pt2e").lowered

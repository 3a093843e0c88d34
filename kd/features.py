"""Capture named intermediate outputs with forward hooks, without touching ``forward``.

Models are used as they are: layers are named by ``model.named_modules()`` (``layer1``,
``blocks.1``, ``conv2``). Outputs are recorded only inside ``capture()``, so validation and
test forwards store nothing, and the store is emptied when the block ends: activations are never
kept alive from one step to the next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class FeatureHooks:
    """Forward hooks on the named submodules of ``model``.

    Args:
        model: any ``nn.Module``.
        names: ``named_modules()`` names; an unknown name fails here, listing the valid ones.
        role: "student" or "teacher", for the error message.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str = "model") -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            valid = ", ".join(n for n in modules if n)
            raise ValueError(f"unknown {role} layer name(s) {unknown} in {type(model).__name__}; valid names: {valid}")
        self.names = list(dict.fromkeys(names))
        self._modules = {name: modules[name] for name in self.names}
        self._store: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """Register the hooks (idempotent; done at construction)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._recorder(n)) for n, m in self._modules.items()]

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._store is not None:
                self._store[name] = output

        return record

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Record the named outputs of the forwards run inside the block into the yielded dict."""
        store: dict[str, Tensor] = {}
        self._store = store
        try:
            yield store
        finally:
            self._store = None

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> int:
        return len(self._handles)

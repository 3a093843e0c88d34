"""Named intermediate features: what a model declares, and forward hooks that capture them.

Models are used as they are: a feature is named by a **hook spec**, a ``named_modules()`` name
(``layer1``, ``blocks.1``, ``conv2``) with an optional suffix:

* ``name``: the module's output;
* ``name:in``: the module's first input (``fc:in`` is the embedding a classifier head reads);
* ``name:relu``: ``relu`` of the module's output (post-activation where the model applies a
  functional ReLU, as LeNet-5 does).

Every model of the zoo declares its **feature stages** (``feature_info()``, in the manner of
timm's ``feature_info``): a name, the spec of the stage's post-activation output, the spec of its
pre-activation output (before the last ReLU: what OFD and AB read), its channels and spatial
reduction, and the embedding the classifier reads. Feature terms default to those stages, so any
method runs with any pair of models of the zoo without naming layers.

Outputs are recorded only inside ``capture()``, cloned (a ReLU applied in place after a hooked
layer would otherwise change the recorded value), and the store is emptied when the block ends:
activations are never kept alive from one step to the next.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUFFIXES = ("", "in", "relu")
SELECTORS = ("stages", "last", "middle", "embedding", "stages+embedding")


@dataclass(frozen=True)
class LayerPair:
    """One matched pair: the student's hook spec, the teacher's, and this pair's weight."""

    student: str
    teacher: str
    weight: float = 1.0


@dataclass(frozen=True)
class FeatureStage:
    """One stage of a model: where its output can be read before and after the activation."""

    name: str
    post: str  # hook spec of the post-activation output
    pre: str  # hook spec of the pre-activation output (before the stage's last ReLU)
    channels: int
    reduction: int  # spatial stride relative to the input (1 for vectors)


@dataclass(frozen=True)
class FeatureInfo:
    """A model's declared features: its stages, shallow to deep, and the classifier's input."""

    stages: tuple[FeatureStage, ...]
    embedding: str  # hook spec of the vector the classifier head reads
    embedding_dim: int


def feature_info(model: nn.Module) -> FeatureInfo | None:
    """The model's declared features (the zoo's models implement ``feature_info()``), or None."""
    declare = getattr(type(model), "feature_info", None)
    return declare(model) if callable(declare) else None


def resolve_pairs(
    selector: str, student: FeatureInfo | None, teacher: FeatureInfo | None, pre_activation: bool, term: str
) -> list[LayerPair]:
    """Default layer pairs of a term from both models' declared features.

    ``stages``: the deepest ``min(n_s, n_t)`` stages of each, paired in order; ``last``: the last
    stage; ``middle``: stage ``n // 2`` of each (FitNets' guided/hint layers); ``embedding``: the
    classifier inputs; ``stages+embedding``: the stages, then the embeddings.
    """
    if selector not in SELECTORS:
        raise ValueError(f"{term}: unknown default layer selector {selector!r}; one of {SELECTORS}")
    for role, info in (("student", student), ("teacher", teacher)):
        if info is None:
            raise ValueError(
                f"{term}: the {role} model declares no feature stages (no feature_info()); name its layers in "
                f"distill.terms.<name>.pairs=[{{student: <layer>, teacher: <layer>}}] (named_modules() names)"
            )
    assert student is not None and teacher is not None
    embeddings = [LayerPair(student.embedding, teacher.embedding)]
    if selector == "embedding":
        return embeddings
    for role, info in (("student", student), ("teacher", teacher)):
        if not info.stages:
            raise ValueError(f"{term}: the {role} model has no feature stages (e.g. an MLP without hidden layers); "
                             "name layers in the term's pairs, or pick another model")  # fmt: skip

    def spec(stage: FeatureStage) -> str:
        return stage.pre if pre_activation else stage.post

    if selector == "last":
        return [LayerPair(spec(student.stages[-1]), spec(teacher.stages[-1]))]
    if selector == "middle":
        s, t = student.stages[len(student.stages) // 2], teacher.stages[len(teacher.stages) // 2]
        return [LayerPair(spec(s), spec(t))]
    k = min(len(student.stages), len(teacher.stages))
    pairs = [LayerPair(spec(s), spec(t)) for s, t in zip(student.stages[-k:], teacher.stages[-k:])]
    return pairs + embeddings if selector == "stages+embedding" else pairs


def split_spec(spec: str) -> tuple[str, str]:
    """``"layer1:relu" -> ("layer1", "relu")``; ``"layer1" -> ("layer1", "")``."""
    name, _, suffix = spec.partition(":")
    return name, suffix


class FeatureHooks:
    """Forward hooks on ``model`` for the given hook specs.

    Args:
        model: any ``nn.Module``.
        names: hook specs (see the module docstring); an unknown name fails here, listing the
            valid ones (and the model's declared stages, when it has them).
        role: "student" or "teacher", for the error message.
        aliases: spec -> the module name whose output is recorded under that spec, for a model
            whose modules were rearranged (QAT fuses a linear layer with its ReLU: the stage's
            post-activation is then the fused module's output).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str = "model",
                 aliases: Mapping[str, str] | None = None) -> None:  # fmt: skip
        modules = dict(model.named_modules())
        aliases = dict(aliases or {})
        specs = list(dict.fromkeys(names))
        bad_suffix = [s for s in specs if split_spec(s)[1] not in SUFFIXES]
        if bad_suffix:
            raise ValueError(f"unknown {role} hook suffix in {bad_suffix}: a spec is <layer>, <layer>:in or <layer>:relu")
        target = {spec: aliases.get(spec, split_spec(spec)[0]) for spec in specs}
        unknown = [s for s in specs if target[s] not in modules or target[s] == ""]
        if unknown:
            valid = ", ".join(n for n in modules if n)
            info = feature_info(model)
            stages = "" if info is None else "; its feature stages: " + ", ".join(
                f"{s.name} (post {s.post}, pre {s.pre})" for s in info.stages) + f", embedding {info.embedding}"  # fmt: skip
            raise ValueError(f"unknown {role} layer name(s) {unknown} in {type(model).__name__}; valid names: {valid}{stages}")
        self.names = specs
        self.model = model
        self._modules = {spec: modules[target[spec]] for spec in specs}
        self._store: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """Register the hooks (idempotent; done at construction)."""
        if not self._handles:
            for spec, module in self._modules.items():
                suffix = split_spec(spec)[1]
                if suffix == "in":
                    self._handles.append(module.register_forward_pre_hook(self._input_recorder(spec)))
                else:
                    self._handles.append(module.register_forward_hook(self._recorder(spec, suffix == "relu")))

    def _recorder(self, spec: str, relu: bool):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._store is not None:
                self._store[spec] = F.relu(output) if relu else output.clone()

        return record

    def _input_recorder(self, spec: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            if self._store is not None:
                self._store[spec] = inputs[0].clone()

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

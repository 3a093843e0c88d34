"""Early exits (BranchyNet, Teerapittayanon et al. 2016; MSDNet, Huang et al. ICLR 2018): a
student with classifier heads after named stages, so an easy input can leave early.

``MultiExit(backbone, stages)`` reads the stages' outputs with forward hooks (the hook specs of
``kd.models.features``: a declared stage's name such as ``conv1`` or ``hidden1``, or any
``<layer>[:relu|:in]``) and puts a head on each: global average pooling and a linear layer for a
feature map, a linear layer for a vector. ``forward`` is the backbone's own (the final exit), so
testing, measuring, exporting and the teacher's objective see the plain student; :meth:`exits`
returns every exit's logits, shallow to deep, the final last. :meth:`exit_macs` counts the
multiply-accumulates a single input costs when it leaves at each exit: the backbone up to that
stage's output (the running count of torch's FLOP counter when the stage's hook fires) plus
the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kd.models.features import FeatureHooks, feature_info, split_spec

DISTILL_FROM = ("teacher", "final")


def _head(feature: Tensor, num_classes: int) -> nn.Module:
    if feature.dim() == 4:  # (B, C, H, W)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature.shape[1], num_classes))
    if feature.dim() == 2:
        return nn.Linear(feature.shape[1], num_classes)
    raise ValueError(f"an exit reads a feature map (B, C, H, W) or a vector (B, D), got a feature of shape {tuple(feature.shape)}")


class MultiExit(nn.Module):
    """``backbone`` with a classifier head on each of ``stages`` (see the module docstring).

    Args:
        backbone: the student (any model of the zoo, or one whose layers are named by spec).
        stages: declared stage names or hook specs, shallow to deep; None: every declared stage.
        num_classes, input_shape: as the zoo's models take them.
        loss_weights: one weight per exit, the final last (None: equal, summing to 1).
        distill_from: what the earlier exits learn from: ``teacher`` (the run's objective with the
            teacher's logits, as the final exit) or ``final`` (the final exit's detached logits
            stand in for the teacher's: self-distillation).
    """

    def __init__(self, backbone: nn.Module, stages: Sequence[str] | None, num_classes: int, input_shape: tuple[int, ...],
                 loss_weights: Sequence[float] | None = None, distill_from: str = "teacher") -> None:  # fmt: skip
        super().__init__()
        info = feature_info(backbone)
        declared = {s.name: s.post for s in info.stages} if info is not None else {}
        if stages is None:
            if not declared:
                raise ValueError(f"{type(backbone).__name__} declares no feature stages: name the exits' layers in student.exits.stages")
            stages = list(declared)
        stages = [str(s) for s in stages]
        if not stages:
            raise ValueError("student.exits.stages is empty: name at least one stage to put an exit on")
        if len(set(stages)) != len(stages):
            raise ValueError(f"student.exits.stages repeats a stage: {stages}")
        self.exit_names = [*stages, "final"]
        self.specs = [declared.get(s, s) for s in stages]
        FeatureHooks(backbone, self.specs, "student").remove()  # an unknown layer fails here, listing the valid ones
        weights = [1.0 / len(self.exit_names)] * len(self.exit_names) if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != len(self.exit_names) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"student.exits.loss_weights needs {len(self.exit_names)} non-negative weights (one per exit, "
                             f"{', '.join(self.exit_names)}) with a positive sum, got {list(loss_weights or [])}")  # fmt: skip
        if distill_from not in DISTILL_FROM:
            raise ValueError(f"student.exits.distill_from must be one of {DISTILL_FROM}, got {distill_from!r}")
        self.loss_weights, self.distill_from = weights, distill_from
        self.backbone = backbone
        features = self._features(torch.zeros(2, *input_shape, device=next(backbone.parameters()).device))[0]
        order = sorted(range(len(self.specs)), key=lambda i: features[i][0])
        if order != list(range(len(self.specs))):
            raise ValueError(f"student.exits.stages must run shallow to deep, in the order the forward reaches them: "
                             f"{[stages[i] for i in order]}, not {stages}")  # fmt: skip
        self.heads = nn.ModuleList(_head(f, num_classes).to(f.device) for _, f in features)
        self.input_shape = tuple(input_shape)

    def _when_reached(self, spec: str, callback) -> torch.utils.hooks.RemovableHandle:
        """Call ``callback()`` when the forward reaches ``spec``'s output (before its layer for ``:in``)."""
        name, suffix = split_spec(spec)
        module = dict(self.backbone.named_modules())[name]

        def pre(mod: nn.Module, inputs: tuple) -> None:  # a hook that returns a value would replace the layer's input
            callback()

        def post(mod: nn.Module, inputs: tuple, output: Tensor) -> None:  # ... or its output
            callback()

        return module.register_forward_pre_hook(pre) if suffix == "in" else module.register_forward_hook(post)

    def _features(self, x: Tensor) -> tuple[list[tuple[int, Tensor]], Tensor]:
        """(position in the forward, output) of each exit's stage, and the final logits."""
        hooks = FeatureHooks(self.backbone, self.specs, "student")
        order: dict[str, int] = {}
        handles = [self._when_reached(spec, lambda spec=spec: order.setdefault(spec, len(order))) for spec in self.specs]
        try:
            with hooks.capture() as store:
                final = self.backbone(x)
        finally:
            for handle in handles:
                handle.remove()
            hooks.remove()
        return [(order[spec], store[spec]) for spec in self.specs], final

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits, shallow to deep; the final exit last."""
        hooks = FeatureHooks(self.backbone, self.specs, "student")
        try:
            with hooks.capture() as store:
                final = self.backbone(x)
        finally:
            hooks.remove()
        return [head(store[spec]) for head, spec in zip(self.heads, self.specs)] + [final]

    @torch.no_grad()
    def exit_macs(self) -> list[int]:
        """Multiply-accumulates of one input leaving at each exit (the final last)."""
        reached: dict[str, int] = {}
        counter = FlopCounterMode(display=False)
        hooks = FeatureHooks(self.backbone, self.specs, "student")
        handles = [self._when_reached(spec, lambda spec=spec: reached.setdefault(spec, counter.get_total_flops() // 2))
                   for spec in self.specs]  # fmt: skip
        x = torch.zeros(1, *self.input_shape, device=next(self.parameters()).device)
        try:
            with hooks.capture() as store, counter:
                self.backbone(x)
        finally:
            for handle in handles:
                handle.remove()
            hooks.remove()
        final = counter.get_total_flops() // 2
        macs = []
        for head, spec in zip(self.heads, self.specs):
            head_counter = FlopCounterMode(display=False)
            with head_counter:
                head(store[spec])
            macs.append(reached[spec] + head_counter.get_total_flops() // 2)
        return [*macs, final]

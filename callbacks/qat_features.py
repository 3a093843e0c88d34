"""Distillation-aware QAT: where the objective's student features live in the fake-quant graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd.models.features import feature_info, split_spec


def qat_feature_aliases(model: nn.Module, prepared: nn.Module, objective: Any) -> dict[str, str]:
    """Where the objective's student feature specs live in QAT's prepared graph of ``model``.

    Preparation fuses a convolution or linear layer with the ReLU after it: the ReLU module is
    gone, and the fused module's output is the stage's post-activation, so a stage's post spec
    is re-pointed at it. A pre-activation spec on a fused module (OFD, AB) is refused: the value
    before the ReLU no longer exists. Raises with the specs and the modules of the graph.
    """
    modules = dict(prepared.named_modules())
    fused = {name for name, m in modules.items() if isinstance(m, torch.ao.nn.intrinsic._FusedModule)}
    pre = {p.student for t in objective.features.values() if t.pre_activation for p in t.feature_pairs()}
    info = feature_info(model)
    aliases, problems = {}, []
    for spec in objective.layers("student"):
        name = split_spec(spec)[0]
        if name in modules:
            if spec in pre and name in fused:
                problems.append(f"{spec} (fused with its ReLU: no pre-activation value is left)")
            continue
        stage = next((s for s in info.stages if s.post == spec), None) if info is not None else None
        target = split_spec(stage.pre)[0] if stage is not None else None
        if target in fused:
            aliases[spec] = target  # the fused conv/linear + ReLU: its output is this stage's post-activation
        else:
            problems.append(f"{spec} (removed by the graph's fusion)")
    if problems:
        raise ValueError(
            f"quantize=qat with this objective: the fake-quant graph cannot give the student feature(s) {problems}; "
            f"name other layers in distill.terms.<name>.pairs (modules of the prepared graph: "
            f"{', '.join(n for n in modules if n and 'post_process' not in n and 'fake_quant' not in n)})"
        )
    return aliases

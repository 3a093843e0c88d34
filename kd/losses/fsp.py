"""Flow of solution procedure: Yim, Joo, Bae & Kim (CVPR 2017), "A Gift from Knowledge
Distillation: Fast Optimization, Network Minimization and Transfer Learning".

The FSP matrix of two layers of one network is the Gram matrix between their channels, averaged
over positions; it describes how the solution flows from the first layer to the second. The
student learns to reproduce the teacher's matrices between corresponding pairs of layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.feature_maps import as_map
from kd.losses.protocol import BindContext, Term, TermInputs

MODES = ("code", "paper")


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """The FSP matrix ``G(F1, F2)`` (Yim et al., eq. 1).

    ``G_ij = sum_{s,t} F1_{s,t,i} * F2_{s,t,j} / (h * w)``: channel ``i`` of the first layer
    against channel ``j`` of the second, averaged over the ``h x w`` positions. Where the two
    layers differ in spatial size, the larger is average-pooled to the smaller (as RepDistiller
    does); a vector ``(B, D)`` is one position.

    RepDistiller's ``compute_fsp`` returns the transpose ``(C2, C1)``; the loss is the same.

    Args:
        first: ``(B, C1, H1, W1)`` or ``(B, C1)``.
        second: ``(B, C2, H2, W2)`` or ``(B, C2)``.

    Returns:
        ``(B, C1, C2)``.
    """
    a, b = as_map(first), as_map(second)
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0]:
        raise ValueError(f"fsp: two (B, C, H, W) maps or (B, D) vectors of one batch are needed, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")  # fmt: skip
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)  # (B, C1, H1, W1) -> (B, C1, h, w)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)  # (B, C2, H2, W2) -> (B, C2, h, w)
    # (B, C, h, w) -> (B, C, h*w)
    a, b = a.flatten(2), b.flatten(2)
    # (B, C1, h*w) @ (B, h*w, C2) -> (B, C1, C2)
    return a @ b.transpose(1, 2) / a.shape[-1]


def fsp_loss(student: Tensor, teacher: Tensor, mode: str = "code") -> Tensor:
    """Squared L2 distance between a student and a teacher FSP matrix (Yim et al., eq. 2).

    * ``"paper"`` (eq. 2): ``||G_T - G_S||_2^2`` summed over the matrix, averaged over the batch
      (the paper's ``1/N sum_x``; its per-pair ``lambda_i`` are equal, the term's pair weights).
    * ``"code"`` (default; RepDistiller ``FSP.compute_loss``): ``(G_S - G_T)^2`` averaged over
      batch *and* matrix elements: the paper's value divided by ``C1 * C2``.

    Args:
        student: ``(B, C1, C2)`` student matrix ``G_S``.
        teacher: ``(B, C1, C2)`` teacher matrix ``G_T``; treated as a constant (detached).
        mode: ``"code"`` or ``"paper"``.

    Returns:
        Scalar tensor.
    """
    if mode not in MODES:
        raise ValueError(f"fsp: mode must be one of {MODES}, got {mode!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"fsp: student and teacher FSP matrices differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")  # fmt: skip
    sq = (student - teacher.detach()).pow(2)
    if mode == "code":
        return sq.mean()
    # (B, C1, C2) -> (B,) -> ()
    return sq.flatten(1).sum(1).mean()


class FSP(Term):
    """FSP over consecutive selected layers: with pairs ``p_0 .. p_{n-1}`` (shallow to deep), the
    matrices ``G(p_i, p_{i+1})`` of each model are matched, ``n - 1`` of them; matrix ``i`` is
    weighted by the weight of the pair that closes it, ``p_{i+1}`` (the stage whose flow it
    describes). The loss is their weighted sum.

    Student and teacher must have the same channel counts at every selected layer (the paper's
    networks differ in depth, not width): a shape mismatch is refused in ``bind`` (no learned
    connector: the FSP matrix would then describe the connector's flow, not the student's).

    Stages: the paper and RepDistiller train FSP as an initialisation: ``init_epochs`` of FSP
    alone (RepDistiller: 30, its unweighted sum of losses, i.e. ``weight: 1``), then the student
    trains on the rest of the objective without FSP. ``init_epochs: 0`` keeps FSP in the loss
    from the first step, weighted by ``weight``.

    The selected stages of kd's CIFAR ResNets give the matrices (layer1, layer2), (layer2,
    layer3); RepDistiller also uses the stem's output as the first layer (``relu`` in kd's
    ResNets: name it in ``pairs``).

    Args:
        weight: multiplies the sum over matrices.
        pairs: layer pairs, at least two; ``None``: the models' feature stages.
        init_epochs: epochs of the FSP-only stage (0: one stage, FSP throughout).
        mode: ``code`` (RepDistiller's mean) or ``paper`` (sum over the matrix); see ``fsp_loss``.
    """

    name = "fsp"
    default_layers = "stages"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 init_epochs: int = 30, mode: str = "code") -> None:  # fmt: skip
        super().__init__(weight, pairs)
        key = f"distill.terms.{self.name}"
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise ValueError(f"{key}.init_epochs must be an int >= 0, got {init_epochs!r}")
        if mode not in MODES:
            raise ValueError(f"{key}.mode must be one of {MODES}, got {mode!r}")
        self.init_epochs, self.mode = init_epochs, mode
        self.pretrain_epochs = init_epochs
        self.keep_after_pretrain = init_epochs == 0  # after the initialisation stage FSP is dropped

    def bind(self, context: BindContext) -> None:
        pairs = self.feature_pairs()
        if len(pairs) < 2:
            raise ValueError(f"fsp: FSP matrices need at least two layer pairs (two layers per model), got "
                             f"{len(pairs)}: {pairs}; name them in distill.terms.{self.name}.pairs")  # fmt: skip
        channels = []
        for pair in pairs:
            s, t = tuple(context.student_shapes[pair.student]), tuple(context.teacher_shapes[pair.teacher])
            for role, spec, shape in (("student", pair.student, s), ("teacher", pair.teacher, t)):
                if len(shape) not in (1, 3):
                    raise ValueError(f"fsp: the {role} layer {spec} gives features of shape {shape}; FSP needs "
                                     "(C, H, W) maps or (D,) vectors")  # fmt: skip
            channels.append((s[0], t[0], pair, s, t))
        for (cs0, ct0, p0, s0, t0), (cs1, ct1, p1, s1, t1) in zip(channels, channels[1:]):
            if (cs0, cs1) != (ct0, ct1):
                raise ValueError(
                    f"fsp: the FSP matrices differ in shape: student G({p0.student}, {p1.student}) is "
                    f"{cs0}x{cs1} (shapes {s0}, {s1}), teacher G({p0.teacher}, {p1.teacher}) is {ct0}x{ct1} "
                    f"(shapes {t0}, {t1}); FSP needs equal channel counts at every selected layer (pick a "
                    "student as wide as the teacher, e.g. resnet8x4 for resnet32x4, or other layers)"
                )

    def forward(self, inputs: TermInputs) -> Tensor:
        pairs = self.feature_pairs()
        losses = []
        for p0, p1 in zip(pairs, pairs[1:]):
            g_s = fsp_matrix(inputs.student[p0.student], inputs.student[p1.student])
            with torch.no_grad():
                g_t = fsp_matrix(inputs.teacher[p0.teacher], inputs.teacher[p1.teacher])
            losses.append(p1.weight * fsp_loss(g_s, g_t, self.mode))
        return torch.stack(losses).sum()


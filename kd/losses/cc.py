"""Correlation congruence: Peng et al. (ICCV 2019), "Correlation Congruence for Knowledge
Distillation". Beside instance-level KD, the student matches the teacher's correlation between
the samples of a batch, a kernel matrix of their embeddings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.protocol import BindContext, Term, TermInputs

MODES = ("paper", "code")
EMBEDS = ("always", "if_needed", "never")


def taylor_rbf_correlation(embeddings: Tensor, gamma: float = 0.4, order: int = 2, normalize: bool = True) -> Tensor:
    """Correlation matrix ``psi(F)``: ``(B, D) -> (B, B)`` (Peng et al., eqs. 5 and 8-9).

    ``k(F_i, F_j) = exp(-gamma ||F_i - F_j||^2) ~= sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p!
    (F_i . F_j)^p``, the P-order Taylor expansion of the Gaussian RBF kernel. The expansion equals
    the kernel's for unit vectors (``||a - b||^2 = 2 - 2 a.b``), so ``normalize`` L2-normalises
    each embedding first (as FaceX-Zoo's CC; torchdistill's ``CCKDLoss`` applies it to the raw
    outputs of its linear layers).
    """
    f = F.normalize(embeddings, p=2.0, dim=1) if normalize else embeddings
    dot = f @ f.t()  # (B, B)
    corr = torch.zeros_like(dot)
    for p in range(order + 1):
        corr = corr + (math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)) * dot.pow(p)
    return corr


def cc_loss(student: Tensor, teacher: Tensor, mode: str = "code", gamma: float = 0.4, order: int = 2,
            normalize: bool = True) -> Tensor:  # fmt: skip
    """Correlation-congruence loss between two batches of embeddings of one width.

    * ``paper`` (eq. 6 with the kernel of ``taylor_rbf_correlation``):
      ``L_CC = ||psi(F_t) - psi(F_s)||_F^2 / B^2``, with ``gamma = 0.4``, ``P = 2`` as in
      torchdistill's CCKD example configuration (whose ``CCKDLoss`` takes the norm, not its
      square, divided by ``B^2``; FaceX-Zoo's CC the mean squared difference, as here).
    * ``code``: RepDistiller's ``Correlation`` ("code emailed by the original author"), a
      different formula: with ``delta = |f_s - f_t|`` (per sample and unit),
      ``L = mean_{i < B-1} sum_d delta_{i,d} delta_{i+1,d}``: the differences of consecutive
      samples of the batch multiplied unit-wise. No kernel, ``gamma`` and ``order`` unused; it
      needs the two embeddings in one space (RepDistiller maps both through a trained
      ``LinearEmbed(., 128)``). Its CIFAR-100 weight is 0.02.

    Args:
        student: ``(B, D)`` student embeddings.
        teacher: ``(B, D)`` teacher embeddings (in mode ``code`` the same ``D``); the teacher's
            *features* are detached by the caller, not its embedding, which trains (as the authors').
        mode: ``paper`` or ``code``.
        gamma: ``> 0``, of the RBF kernel.
        order: ``P >= 1``, the order of the Taylor expansion.
        normalize: mode ``paper``: L2-normalise the embeddings before the kernel.

    Returns:
        Scalar tensor; zero when student equals teacher; zero in mode ``code`` for ``B < 2``.
    """
    if mode not in MODES:
        raise ValueError(f"cc mode must be one of {MODES}, got {mode!r}")
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"CC needs (B, D) embeddings of one batch for student and teacher, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")  # fmt: skip
    b = student.shape[0]
    if mode == "paper":
        psi_t = taylor_rbf_correlation(teacher, gamma, order, normalize)  # (B, B)
        psi_s = taylor_rbf_correlation(student, gamma, order, normalize)  # (B, B)
        return (psi_t - psi_s).pow(2).sum() / (b * b)
    if student.shape != teacher.shape:
        raise ValueError(f"CC mode code compares embeddings unit by unit; got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)} (embed both: distill.terms.cc.embed=always)")  # fmt: skip
    if b < 2:
        return student.sum() * 0.0
    delta = (student - teacher).abs()  # (B, D)
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()  # (B-1, D) -> (B-1,) -> ()


class LinearEmbed(nn.Module):
    """Flatten and ``Linear(D_in, D)`` (RepDistiller's ``LinearEmbed``, no normalisation)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(start_dim=1))  # (B, ...) -> (B, D_in) -> (B, D)


def _check(key: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"distill.terms.cc.{key} must be {want}, got {value!r}")


class CC(Term):
    """Correlation congruence (Peng et al., ICCV 2019) over layer pairs: ``sum_pairs w_pair * cc_loss``.

    The paper's full objective (eq. 7) is ``alpha CE + (1 - alpha) KD + beta L_CC``; here ``beta``
    is the term's weight and CE/KD are the objective's (``ce_weight``, a ``kd`` term beside it).

    Embeddings (built in ``bind``, trained with the student, the teacher's one too, as the
    authors'): ``always``: both flattened features through ``LinearEmbed(., embed_dim)``
    (RepDistiller, ``--feat_dim 128``); ``if_needed``: only where the flattened widths differ;
    ``never``: the features as they are (widths must agree in mode ``code``; mode ``paper``
    compares ``B x B`` matrices, so any widths work). A trained teacher embedding can also move
    towards the student's correlations (or collapse with it): that is the authors' set-up, kept.

    Args:
        weight: ``beta`` (RepDistiller's CIFAR-100 ``-b 0.02``, with mode ``code``).
        pairs: layer pairs; ``None``: the classifier inputs of both models (``embedding``).
        mode: ``paper`` (Gaussian RBF by its Taylor expansion) or ``code`` (RepDistiller); see
            ``cc_loss``.
        gamma: of the RBF kernel (paper: 0.4).
        order: ``P`` of the Taylor expansion (paper: 2).
        normalize: mode ``paper``: L2-normalise the embeddings before the kernel.
        embed: ``always``, ``if_needed`` or ``never`` (see above).
        embed_dim: width of the embeddings (128).
    """

    name = "cc"
    default_layers = "embedding"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 mode: str = "code", gamma: float = 0.4, order: int = 2, normalize: bool = True,
                 embed: str = "always", embed_dim: int = 128) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        _check("mode", mode, mode in MODES, f"one of {MODES}")
        real = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma)
        _check("gamma", gamma, real and gamma > 0, "a finite number > 0")
        _check("order", order, isinstance(order, int) and not isinstance(order, bool) and order >= 1, "an integer >= 1")
        _check("normalize", normalize, isinstance(normalize, bool), "true or false")
        _check("embed", embed, embed in EMBEDS, f"one of {EMBEDS}")
        _check("embed_dim", embed_dim, isinstance(embed_dim, int) and not isinstance(embed_dim, bool) and embed_dim >= 1,
               "an integer >= 1")  # fmt: skip
        self.mode, self.gamma, self.order, self.normalize = mode, float(gamma), order, normalize
        self.embed, self.embed_dim = embed, embed_dim
        self.embed_s = nn.ModuleDict()
        self.embed_t = nn.ModuleDict()
        self._bound = False

    def bind(self, context: BindContext) -> None:
        for i, pair in enumerate(self.feature_pairs()):
            s, t = context.student_shapes[pair.student], context.teacher_shapes[pair.teacher]
            if len(s) < 1 or len(t) < 1:
                raise ValueError(f"cc: the student layer {pair.student} {tuple(s)} or teacher layer {pair.teacher} "
                                 f"{tuple(t)} gives a scalar per sample; CC needs vectors or maps")  # fmt: skip
            d_s, d_t = math.prod(s), math.prod(t)
            if self.embed == "always" or (self.embed == "if_needed" and d_s != d_t):
                self.embed_s[str(i)] = LinearEmbed(d_s, self.embed_dim)
                self.embed_t[str(i)] = LinearEmbed(d_t, self.embed_dim)
            elif self.mode == "code" and d_s != d_t:
                raise ValueError(
                    f"cc: mode code compares student and teacher unit by unit, but student {pair.student} "
                    f"{tuple(s)} and teacher {pair.teacher} {tuple(t)} differ in width; set "
                    "distill.terms.cc.embed=if_needed (or always) for linear embeddings to a common width"
                )
        self._bound = True

    def _embeddings(self, i: int, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        # (B, ...) -> (B, D)
        student, teacher = student.flatten(start_dim=1), teacher.detach().flatten(start_dim=1)
        if str(i) in self.embed_s:
            student, teacher = self.embed_s[str(i)](student), self.embed_t[str(i)](teacher)
        return student, teacher

    def forward(self, inputs: TermInputs) -> Tensor:
        if not self._bound:
            raise RuntimeError("cc: bind() the term to the feature shapes (it builds the embeddings) before calling it")
        losses = []
        for i, pair in enumerate(self.feature_pairs()):
            f_s, f_t = self._embeddings(i, inputs.student[pair.student], inputs.teacher[pair.teacher])
            with torch.autocast(device_type=f_s.device.type, enabled=False):  # powers of dot products: float32
                loss = cc_loss(f_s.float(), f_t.float(), self.mode, self.gamma, self.order, self.normalize)
            losses.append(pair.weight * loss)
        return torch.stack(losses).sum()

    def describe(self) -> str:
        return f"cc {self.mode}"

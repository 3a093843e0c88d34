"""MLKD: Jin, Wang & Lin (CVPR 2023), "Multi-Level Logit Distillation".

The student's predictions are aligned with the teacher's at three levels, each at several
temperatures ("prediction augmentation"; the authors use ``T in {2, 3, 4, 5, 6}``):

* instance level: KD per sample (``T^2 * KL``);
* batch level: the ``B x B`` Gram matrix ``P P^T`` of the predictions (how samples relate);
* class level: the ``K x K`` matrix ``P^T P`` (how classes co-occur over the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import Term, TermInputs

MODES = ("code", "paper")


def instance_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch (a scalar)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def batch_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``||P_t P_t^T - P_s P_s^T||_F^2 / B`` with ``P = softmax(z / T)``: ``(B, K) -> (B, B)``."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]  # (B, K) @ (K, B) -> (B, B)


def class_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``||P_t^T P_t - P_s^T P_s||_F^2 / K`` with ``P = softmax(z / T)``: ``(B, K) -> (K, K)``."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / p_s.shape[1]  # (K, B) @ (B, K) -> (K, K)


def _median(x: Tensor) -> Tensor:
    """Median of a 1-d tensor, the mean of the two middle values when its length is even
    (``np.percentile(x, 50)``'s linear interpolation); static indices, so no host synchronisation."""
    n = x.numel()
    s = x.sort().values
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def confidence_fractions(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' confidence masks, reduced to what their code uses of them.

    With ``p = softmax(z_t)`` (``T = 1``): a sample is kept when its confidence ``max_k p`` is
    at most the batch median; a class is kept when its summed probability ``sum_i p_ik`` is at
    most the median over classes (``np.percentile(., 50)``, linear interpolation). Their
    ``kd_loss``, ``bc_loss`` and ``cc_loss`` are already reduced to scalars when multiplied by
    the mask, so ``(loss * mask).mean()`` is ``loss`` times the *fraction* kept (about one
    half); the fractions are returned, on the device.

    Returns:
        ``(sample_fraction, class_fraction)``, scalars in ``(0, 1]``.
    """
    p = F.softmax(teacher_logits.detach(), dim=1)  # (B, K)
    confidence = p.max(dim=1).values  # (B, K) -> (B,)
    class_mass = p.sum(dim=0)  # (B, K) -> (K,)
    sample_fraction = (confidence <= _median(confidence)).float().mean()
    class_fraction = (class_mass <= _median(class_mass)).float().mean()
    return sample_fraction, class_fraction


def mlkd_loss(student_logits: Tensor, teacher_logits: Tensor, temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
              mode: str = "code") -> Tensor:  # fmt: skip
    """Multi-level logit distillation on one view of the batch (Jin et al. 2023).

    ``mode="paper"``: the three alignments summed over the temperatures,

    ``L = sum_T [ L_ins(T) + L_batch(T) + L_class(T) ]``

    with ``L_ins = T^2 KL`` (the ``T^2`` of the authors' ``kd_loss``), ``L_batch`` and
    ``L_class`` as in ``batch_alignment`` and ``class_alignment``.

    ``mode="code"``: what the authors' ``KD_ours.forward_train`` computes when its two views
    (weak and strong augmentation) are the same batch, the input kd gives a term:

    ``L = sum_T [ (1 + f_s) L_ins(T) + f_s L_batch(T) + f_c L_class(T) ]``

    where ``f_s``, ``f_c`` are the fractions of low-confidence samples and classes kept by their
    teacher masks (``confidence_fractions``): the weak view's three terms are masked, the
    strong view adds an unmasked instance term (its batch and class terms are computed there
    but never added to the loss; two of its five instance terms, ``T = 2, 6``, are computed on
    the weak view in the code, which one view makes moot). Their cross-entropy is likewise
    ``0.1 * (CE_weak + CE_strong)``, i.e. ``0.2 * CE`` on one view. What this leaves out: the
    paper and code train on a second, strongly augmented view of every image besides the
    weakly augmented one; kd gives the term the inputs of the run as they are, so the "strong"
    terms see the same images as the weak ones.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; detached here.
        temperatures: the augmentation temperatures, each ``> 0``.
        mode: ``"code"`` or ``"paper"``.

    Returns:
        Scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"mlkd: student and teacher logits must both be (B, K); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")  # fmt: skip
    if mode not in MODES:
        raise ValueError(f"mlkd: mode must be one of {MODES}, got {mode!r}")
    z_t = teacher_logits.detach()
    ins = sum(instance_alignment(student_logits, z_t, t) for t in temperatures)
    bat = sum(batch_alignment(student_logits, z_t, t) for t in temperatures)
    cls = sum(class_alignment(student_logits, z_t, t) for t in temperatures)
    if mode == "paper":
        return ins + bat + cls
    f_s, f_c = confidence_fractions(z_t)
    return (1.0 + f_s) * ins + f_s * bat + f_c * cls


class MLKD(Term):
    """Multi-level logit distillation as a term: ``mlkd_loss(z_s, z_t, temperatures, mode)``.

    The batch- and class-level terms depend on the whole batch (``B >= 2`` to be informative).

    Args:
        weight: the term's weight (the authors' ``KD.LOSS.KD_WEIGHT``, 0.9 on CIFAR-100).
        temperatures: non-empty list of temperatures ``> 0`` (the authors': 2, 3, 4, 5, 6).
        mode: ``code`` (the authors' code on one view, with its confidence masking; default)
            or ``paper`` (the three levels summed, unmasked). See ``mlkd_loss``.
        warmup_epochs: a linear warm-up of the term's weight, ``min((epoch + 1) / warmup, 1)`` as
            DKD's (0, the default: none, as the authors' code). kd's addition: the five
            temperatures' ``T^2`` factors give the term about ten times KD's gradient at the
            start, which a short schedule at the student's full learning rate may not survive.
    """

    name = "mlkd"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, weight: float = 0.9, temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 mode: str = "code", warmup_epochs: int = 0) -> None:  # fmt: skip
        super().__init__(weight)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"distill.terms.mlkd.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence) or not temperatures:
            raise ValueError(f"distill.terms.mlkd.temperatures must be a non-empty list of numbers > 0, "
                             f"got {temperatures!r}")  # fmt: skip
        for t in temperatures:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"distill.terms.mlkd.temperatures must hold finite numbers > 0, got {t!r} "
                                 f"in {list(temperatures)}")  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"distill.terms.mlkd.mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.mode = mode

    def scale(self) -> float:
        return 1.0 if self.warmup_epochs == 0 else min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(self, inputs: TermInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return mlkd_loss(inputs.student_logits, inputs.teacher_logits, self.temperatures, self.mode)

    def describe(self) -> str:
        return f"mlkd T={','.join(f'{t:g}' for t in self.temperatures)} {self.mode}"

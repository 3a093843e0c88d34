"""Contrastive representation distillation: Tian, Krishnan & Isola (ICLR 2020), "Contrastive
Representation Distillation", as the authors' RepDistiller implements it (``crd/criterion.py``,
``crd/memory.py``; mdistiller's ``CRD`` is the same code).

Both embeddings are mapped by a linear head to ``feat_dim`` and L2-normalised. Two memory banks
hold a momentum average of every training sample's student and teacher embedding. For each sample
of the batch, the positive is its own row of the other model's bank and ``nce_k`` negatives are
other rows; a noise-contrastive (NCE) critic tells them apart, in both directions (teacher
embedding against the student bank, student embedding against the teacher bank), summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.protocol import BindContext, Term, TermInputs

SAMPLINGS = ("exact", "uniform")
EPS = 1e-7  # the authors' `eps` in ContrastLoss


def draw_contrast_indices(index: Tensor, num_samples: int, nce_k: int, sampling: str = "exact",
                          generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Bank rows to contrast each sample with: column 0 its own index (the positive), then
    ``nce_k`` negatives drawn with replacement on ``index``'s device (no host synchronisation).

    * ``exact``: negatives uniform over the other ``num_samples - 1`` samples (a draw from
      ``[0, N-1)`` shifted past the positive), so the positive is never its own negative.
      RepDistiller's ``mode='exact'`` also takes the positive as the sample itself, but draws the
      negatives in its data set from the samples of *other classes* (``cls_negative``), which needs
      every sample's label; this term is given the batch's labels only. With ``C`` balanced classes
      the two differ in about ``1/C`` of the negatives.
    * ``uniform``: ``torch.randint(0, N)``, the positive itself may be drawn (the sampler of
      RepDistiller's ``ContrastMemory`` when no indices are passed in).

    Args:
        index: ``(B,)`` int64 sample indices into the training set.
        num_samples: ``N``, the training-set size (the banks' rows).
        nce_k: ``K``, negatives per sample.
        sampling: ``exact`` or ``uniform``.
        generator: the random stream to draw from (on ``index``'s device); None: the global one.

    Returns:
        ``(B, 1 + K)`` int64 on ``index``'s device.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"crd sampling must be one of {SAMPLINGS}, got {sampling!r}")
    b = index.shape[0]
    if sampling == "uniform":
        negatives = torch.randint(0, num_samples, (b, nce_k), device=index.device, generator=generator)
    else:
        negatives = torch.randint(0, num_samples - 1, (b, nce_k), device=index.device, generator=generator)  # (B, K)
        negatives = negatives + (negatives >= index[:, None]).long()  # skip the positive's own row
    return torch.cat([index[:, None], negatives], dim=1)  # (B, 1) + (B, K) -> (B, 1 + K)


def contrast_scores(anchor: Tensor, bank: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``exp(<m_j, v> / tau)`` of each anchor ``v`` with the bank rows ``m_j`` it is contrasted
    with (RepDistiller's ``out_v1``/``out_v2`` before the division by ``Z``).

    The bank is read as a constant (no gradient reaches it) and the backward keeps a copy of what
    it read, so the caller may update the bank in place before the backward. Computed as the
    authors (``index_select`` then ``bmm``: a ``B (1+K) D`` copy) or, the same numbers, as a copy
    of the bank and all ``N`` inner products then a gather (``N D + B N``), whichever holds less.

    Args:
        anchor: ``(B, D)`` L2-normalised embeddings.
        bank: ``(N, D)`` memory bank.
        rows: ``(B, 1 + K)`` bank rows per anchor (``draw_contrast_indices``).
        temperature: ``tau > 0``.

    Returns:
        ``(B, 1 + K)``.
    """
    bank = bank.detach()
    (n, d), (b, width) = bank.shape, rows.shape
    if n * (d + b) <= b * width * d:
        scores = (anchor @ bank.clone().t()).gather(1, rows)  # (B, D) @ (D, N) -> (B, N) -> (B, 1 + K)
    else:
        picked = bank[rows]  # (B, 1 + K, D)
        scores = torch.bmm(picked, anchor[:, :, None]).squeeze(2)  # (B, 1+K, D) @ (B, D, 1) -> (B, 1 + K)
    return torch.exp(scores / temperature)


def normalization_constant(exp_scores: Tensor, num_samples: int) -> Tensor:
    """``Z = N * mean(exp_scores)``, the Monte-Carlo estimate of the partition function over the
    bank that RepDistiller takes from the first batch and keeps (Wu et al. 2018's NCE). Detached.

    Args:
        exp_scores: ``(B, 1 + K)`` from ``contrast_scores``.
        num_samples: ``N``.

    Returns:
        A scalar tensor.
    """
    return exp_scores.detach().mean() * num_samples


def nce_loss(probs: Tensor, num_samples: int) -> Tensor:
    """The NCE critic loss of CRD (Tian et al., eqs. 18-19), as RepDistiller's ``ContrastLoss``.

    With ``P = exp(<m_j, v> / tau) / Z`` the normalised scores, ``K`` negatives and the noise
    probability ``1/N`` of a uniform draw from the ``N`` samples:

    ``h = P / (P + K/N + eps)``;
    ``L = -(1/B) sum_b [ log h(pos_b) + sum_k log(1 - h(neg_bk)) ]``, with
    ``1 - h = (K/N) / (P + K/N + eps)``.

    The paper's eq. 19 writes ``h = e^{s/tau} / (e^{s/tau} + K/N)`` without ``Z``; the code (followed
    here, its defaults tuned with it) divides by the constant ``Z`` fixed at the first batch.

    Args:
        probs: ``(B, 1 + K)`` normalised scores, column 0 the positive.
        num_samples: ``N``.

    Returns:
        A scalar tensor.
    """
    k = probs.shape[1] - 1
    noise = k / float(num_samples)  # K * P_n
    positive, negatives = probs[:, 0], probs[:, 1:]  # (B,), (B, K)
    log_d1 = torch.log(positive / (positive + noise + EPS))  # (B,)
    log_d0 = torch.log(noise / (negatives + noise + EPS))  # (B, K)
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def momentum_update(rows: Tensor, embeddings: Tensor, momentum: float) -> Tensor:
    """New bank rows: ``normalise(m * rows + (1 - m) * v)`` (RepDistiller's memory update).

    Args:
        rows: ``(B, D)`` the bank rows of the batch's samples.
        embeddings: ``(B, D)`` this batch's embeddings ``v``; detached.
        momentum: ``m`` in ``[0, 1)``.

    Returns:
        ``(B, D)`` of unit L2 norm, in ``rows``' dtype.
    """
    mixed = rows * momentum + embeddings.detach().to(rows.dtype) * (1.0 - momentum)
    return F.normalize(mixed, p=2.0, dim=1)


class Embed(nn.Module):
    """CRD's head ``g``: flatten, ``Linear(D_in, feat_dim)``, L2-normalise (RepDistiller's ``Embed``)."""

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # (B, ...) -> (B, D_in)
        return F.normalize(self.linear(x), p=2.0, dim=1)  # (B, D_in) -> (B, feat_dim)


def _check(key: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"distill.terms.crd.{key} must be {want}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CRD(Term):
    """CRD as a term: ``nce_loss(student anchor vs teacher bank) + nce_loss(teacher anchor vs
    student bank)``, times the pair's weight.

    The student is trained through the first part only (the teacher-anchored part trains the
    teacher's head ``embed_t``); the banks are read before this batch's momentum update, as the
    authors do. State kept across steps, all persistent buffers on the training device of fixed
    size: ``memory_student``, ``memory_teacher`` ``(N, feat_dim)`` (initialised uniform in
    ``+-1/sqrt(feat_dim/3)``, as the authors) and ``z`` = ``(Z_student_anchor, Z_teacher_anchor)``,
    ``-1`` until the first batch sets it (decided by ``torch.where`` on the tensor, no host sync).
    A multi-process fit keeps one bank per process, each refreshed at its own samples only.

    Args:
        weight: the term's weight (RepDistiller's CIFAR-100 ``-b 0.8``: ``conf/distill/crd.yaml``).
        pairs: one layer pair; ``None``: the classifier inputs of both models (the authors' pooled
            features). Maps are flattened.
        feat_dim: embedding width of both heads (128).
        nce_k: negatives per sample ``K`` (16384); must be below the training-set size.
        nce_t: temperature ``tau`` (0.07).
        nce_momentum: momentum ``m`` of the bank update (0.5).
        sampling: ``exact`` (negatives exclude the positive) or ``uniform``; see
            ``draw_contrast_indices``.
    """

    name = "crd"
    needs_indices = True
    default_layers = "embedding"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_momentum: float = 0.5,
                 sampling: str = "exact") -> None:  # fmt: skip
        super().__init__(weight, pairs)
        if self._pairs is not None and len(self._pairs) != 1:
            raise ValueError(f"distill.terms.crd.pairs: CRD contrasts one pair of layers, got {len(self._pairs)} pairs")
        _check("feat_dim", feat_dim, _is_int(feat_dim) and feat_dim > 0, "an integer > 0")
        _check("nce_k", nce_k, _is_int(nce_k) and nce_k > 0, "an integer > 0")
        _check("nce_t", nce_t, _is_real(nce_t) and nce_t > 0, "a finite number > 0")
        _check("nce_momentum", nce_momentum, _is_real(nce_momentum) and 0 <= nce_momentum < 1, "a number in [0, 1)")
        _check("sampling", sampling, sampling in SAMPLINGS, f"one of {SAMPLINGS}")
        self.feat_dim, self.nce_k, self.nce_t = feat_dim, nce_k, float(nce_t)
        self.nce_momentum, self.sampling = float(nce_momentum), sampling
        self.num_samples = 0
        self.register_buffer("z", torch.full((2,), -1.0), persistent=True)
        # negatives come from a stream of their own, seeded at bind and counted per draw: a fit
        # resumed from a checkpoint draws what the uninterrupted one would have (extra state)
        self._seed, self._draws = 0, 0
        self._generator: torch.Generator | None = None

    def bind(self, context: BindContext) -> None:
        if self.nce_k >= context.num_samples:
            raise ValueError(
                f"crd: nce_k = {self.nce_k} negatives per sample needs more training samples than that, "
                f"got num_samples = {context.num_samples}; lower it: distill.terms.crd.nce_k=<fewer than "
                f"{context.num_samples}> (e.g. distill.terms.crd.nce_k={max(1, context.num_samples // 4)})"
            )
        (pair,) = self.feature_pairs()
        s, t = context.student_shapes[pair.student], context.teacher_shapes[pair.teacher]
        if len(s) < 1 or len(t) < 1:
            raise ValueError(f"crd: the student layer {pair.student} {tuple(s)} or teacher layer {pair.teacher} "
                             f"{tuple(t)} gives a scalar per sample; CRD needs vectors or maps")  # fmt: skip
        self.num_samples = context.num_samples
        self._seed = int(torch.randint(0, 2**62, ()).item())  # from the run's seeded RNG, once, before training
        self.embed_s = Embed(math.prod(s), self.feat_dim)
        self.embed_t = Embed(math.prod(t), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        for bank in ("memory_student", "memory_teacher"):
            init = torch.rand(context.num_samples, self.feat_dim) * (2 * stdv) - stdv  # uniform in [-stdv, stdv)
            self.register_buffer(bank, init, persistent=True)

    def forward(self, inputs: TermInputs) -> Tensor:
        if self.num_samples == 0:
            raise RuntimeError("crd: bind() the term (the training-set size and feature shapes) before calling it")
        if inputs.index is None:
            raise ValueError("crd needs the batch's sample indices (TermInputs.index)")
        (pair,) = self.feature_pairs()
        index = inputs.index
        v_s = self.embed_s(inputs.student[pair.student])  # (B, feat_dim)
        v_t = self.embed_t(inputs.teacher[pair.teacher].detach())  # (B, feat_dim)
        rows = draw_contrast_indices(index, self.num_samples, self.nce_k, self.sampling, self._stream(index.device))  # (B, 1 + K)
        with torch.autocast(device_type=v_s.device.type, enabled=False):  # the banks are float32
            v_s, v_t = v_s.float(), v_t.float()
            e_s = contrast_scores(v_s, self.memory_teacher, rows, self.nce_t)  # student anchor
            e_t = contrast_scores(v_t, self.memory_student, rows, self.nce_t)  # teacher anchor
            estimate = torch.stack([normalization_constant(e_s, self.num_samples),
                                    normalization_constant(e_t, self.num_samples)])  # fmt: skip
            z = torch.where(self.z > 0, self.z, estimate)  # the first batch's estimate, then fixed
            loss = nce_loss(e_s / z[0], self.num_samples) + nce_loss(e_t / z[1], self.num_samples)
        with torch.no_grad():
            self.z.copy_(z)
            for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
                bank.index_copy_(0, index, momentum_update(bank[index], v, self.nce_momentum))
        return pair.weight * loss

    def _stream(self, device: torch.device) -> torch.Generator:
        """This draw's generator: seeded by (seed, draw count) on the host, so no device sync."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed((self._seed + self._draws) % 2**63)
        self._draws += 1
        return self._generator

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self._seed, "draws": self._draws}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._seed, self._draws = int(state["seed"]), int(state["draws"])

    def describe(self) -> str:
        return f"crd K={self.nce_k} t={self.nce_t:g}"

"""Factor transfer: Kim, Park & Kwak (NeurIPS 2018), "Paraphrasing Complex Network: Network
Compression via Factor Transfer".

A *paraphraser* (a convolutional autoencoder with paraphrase rate ``k``) is first trained to
reconstruct the teacher's feature; its encoder's output is the teacher's *factor*. A
*translator* on the student side is then trained with the student so that the student's factor
matches the teacher's: the FT loss is the L1 distance between the L2-normalised factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.feature_maps import as_map, pool_to
from kd.losses.protocol import BindContext, Term, TermInputs

MODES = ("code", "paper")
RECONSTRUCTIONS = ("l2", "l1")


def ft_factor(factor: Tensor) -> Tensor:
    """A factor flattened and L2-normalised per sample: ``F / ||F||_2``, ``(B, ...) -> (B, N)``."""
    # (B, ...) -> (B, N)
    return F.normalize(factor.flatten(1), p=2.0, dim=1)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, mode: str = "code") -> Tensor:
    """The FT loss ``|| F_S / ||F_S||_2 - F_T / ||F_T||_2 ||_p`` with ``p = 1`` (the paper's choice).

    * ``"paper"``: the L1 norm per sample, averaged over the batch.
    * ``"code"`` (default; the authors' ``nn.L1Loss()(FT(factor_s), FT(factor_t))``): the mean
      absolute difference over batch *and* the ``N`` factor elements, the paper's value ``/ N``.

    Args:
        student_factor: ``(B, ...)`` translator output ``F_S``.
        teacher_factor: ``(B, ...)`` paraphraser (encoder) output ``F_T``, as many elements per
            sample; detached.
        mode: ``"code"`` or ``"paper"``.

    Returns:
        Scalar tensor.
    """
    if mode not in MODES:
        raise ValueError(f"ft: mode must be one of {MODES}, got {mode!r}")
    f_s, f_t = ft_factor(student_factor), ft_factor(teacher_factor.detach())
    if f_s.shape != f_t.shape:
        raise ValueError(f"ft: student factor {tuple(student_factor.shape)} and teacher factor "
                         f"{tuple(teacher_factor.shape)} differ in size")  # fmt: skip
    diff = (f_s - f_t).abs()
    # (B, N) -> (B,) -> ()
    return diff.mean() if mode == "code" else diff.sum(1).mean()


def reconstruction_loss(reconstruction: Tensor, feature: Tensor, kind: str = "l2") -> Tensor:
    """The paraphraser's training loss ``L_rec = ||x - P(x)||``: ``"l2"`` the mean squared error
    (the paper's squared L2, as a mean, as RepDistiller's ``MSELoss``), ``"l1"`` the mean
    absolute error (the authors' ``train_Paraphraser.py``, ``nn.L1Loss``). ``feature`` detached."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"ft: reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")
    target = feature.detach()
    return F.mse_loss(reconstruction, target) if kind == "l2" else F.l1_loss(reconstruction, target)


def _layer(in_size: int, out_size: int, vector: bool, transposed: bool = False) -> list[nn.Module]:
    """A 3x3 stride-1 convolution (transposed in the decoder) with bias, or a linear layer for
    vectors, followed by LeakyReLU(0.1) (the authors' ``FeatureProjection.py``, no batch norm)."""
    if vector:
        layer: nn.Module = nn.Linear(in_size, out_size)
    elif transposed:
        layer = nn.ConvTranspose2d(in_size, out_size, 3, 1, 1)
    else:
        layer = nn.Conv2d(in_size, out_size, 3, 1, 1)
    return [layer, nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Teacher-side autoencoder: encoder ``C -> C -> kC -> kC``, decoder ``kC -> kC -> C -> C``.

    Args:
        channels: the teacher layer's channels ``C`` (or width of a vector layer).
        factor_channels: ``round(k * C)``.
        vector: linear layers for ``(B, D)`` features instead of 3x3 convolutions.
    """

    def __init__(self, channels: int, factor_channels: int, vector: bool) -> None:
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = nn.Sequential(*_layer(c, c, vector), *_layer(c, f, vector), *_layer(f, f, vector))
        self.decoder = nn.Sequential(*_layer(f, f, vector, True), *_layer(f, c, vector, True),
                                     *_layer(c, c, vector, True))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``P(x)``, the shape of ``x``."""
        return self.decoder(self.encoder(x))


def translator(channels: int, factor_channels: int, vector: bool) -> nn.Sequential:
    """Student-side encoder ``C_s -> C_s -> kC_t -> kC_t`` (the authors' ``Translator``, no BN)."""
    c, f = channels, factor_channels
    return nn.Sequential(*_layer(c, c, vector), *_layer(c, f, vector), *_layer(f, f, vector))


class FT(Term):
    """Factor transfer over layer pairs (default: the last stage, as the paper and RepDistiller).

    Two stages in one fit: for ``paraphraser_epochs`` the paraphrasers alone train on
    ``reconstruction_loss`` of the teacher's features (the student gets no gradient: the
    reconstruction reads teacher features only); from then on they are frozen
    (``requires_grad = False``, used under ``no_grad``) and the student with its translators
    trains on CE + ``weight * FT``. During the first stage the term's weight is replaced by
    ``reconstruction_weight`` (``scale()``): the authors and RepDistiller train the paraphraser on
    the plain reconstruction loss, not on ``beta`` times it.

    Maps use 3x3 convolutions, vectors linear layers; where the two factors differ in spatial
    size the larger is average-pooled to the smaller (a vector is one position).

    Args:
        weight: ``beta`` of the FT loss. The authors' code (``--beta 500``, CIFAR) with
            ``mode: code``; RepDistiller's ``-b 200`` belongs to its own factor (a channel mean
            of squares), which kd does not implement.
        pairs: layer pairs; ``None``: the last stage of each model.
        k: paraphrase rate ``> 0``: factor channels ``round(k * C_t)`` (the paper: 0.5).
        paraphraser_epochs: epochs of the paraphraser stage (RepDistiller ``--init_epochs 30``).
        mode: ``code`` or ``paper`` (see ``ft_loss``).
        reconstruction: ``l2`` (the paper, RepDistiller) or ``l1`` (the authors' code).
        reconstruction_weight: weight of the reconstruction loss in the paraphraser stage.
    """

    name = "ft"
    default_layers = "last"
    keep_after_pretrain = True

    def __init__(self, weight: float = 500.0, pairs: Sequence[Mapping[str, object]] | None = None, k: float = 0.5,
                 paraphraser_epochs: int = 30, mode: str = "code", reconstruction: str = "l2",
                 reconstruction_weight: float = 1.0) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        key = f"distill.terms.{self.name}"
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
            raise ValueError(f"{key}.k must be a finite number > 0, got {k!r}")
        if isinstance(paraphraser_epochs, bool) or not isinstance(paraphraser_epochs, int) or paraphraser_epochs < 1:
            raise ValueError(f"{key}.paraphraser_epochs must be an int >= 1 (the paraphraser must be trained), "
                             f"got {paraphraser_epochs!r}")  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"{key}.mode must be one of {MODES}, got {mode!r}")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"{key}.reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
        if isinstance(reconstruction_weight, bool) or not isinstance(reconstruction_weight, (int, float)) \
                or not math.isfinite(reconstruction_weight) or reconstruction_weight <= 0:  # fmt: skip
            raise ValueError(f"{key}.reconstruction_weight must be a finite number > 0, got {reconstruction_weight!r}")
        self.k, self.mode, self.reconstruction = float(k), mode, reconstruction
        self.reconstruction_weight = float(reconstruction_weight)
        self.pretrain_epochs = paraphraser_epochs
        self.paraphrasers = nn.ModuleDict()
        self.translators = nn.ModuleDict()
        self._sizes: list[tuple[int, int]] = []

    def bind(self, context: BindContext) -> None:
        self.paraphrasers, self.translators, self._sizes = nn.ModuleDict(), nn.ModuleDict(), []
        for i, pair in enumerate(self.feature_pairs()):
            s, t = tuple(context.student_shapes[pair.student]), tuple(context.teacher_shapes[pair.teacher])
            for role, spec, shape in (("student", pair.student, s), ("teacher", pair.teacher, t)):
                if len(shape) not in (1, 3):
                    raise ValueError(f"ft: the {role} layer {spec} gives features of shape {shape}; FT needs "
                                     "(C, H, W) maps or (D,) vectors")  # fmt: skip
            factor = int(round(self.k * t[0]))
            if factor < 1:
                raise ValueError(f"ft: k = {self.k} gives round(k * {t[0]}) = {factor} factor channels for the "
                                 f"teacher layer {pair.teacher} {t}; raise distill.terms.{self.name}.k")  # fmt: skip
            self.paraphrasers[str(i)] = Paraphraser(t[0], factor, len(t) == 1)
            self.translators[str(i)] = translator(s[0], factor, len(s) == 1)
            hs, ws = (s[1], s[2]) if len(s) == 3 else (1, 1)
            ht, wt = (t[1], t[2]) if len(t) == 3 else (1, 1)
            self._sizes.append((min(hs, ht), min(ws, wt)))
        self._freeze()

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        super().start_epoch(epoch, max_epochs)
        self._freeze()

    def _freeze(self) -> None:
        """Paraphrasers train in the first stage only."""
        self.paraphrasers.requires_grad_(self.epoch < self.pretrain_epochs)

    def scale(self) -> float:
        if self.epoch < self.pretrain_epochs:  # the paraphraser stage: reconstruction_weight, not beta
            return self.reconstruction_weight / self.weight if self.weight > 0 else 0.0
        return 1.0

    def pretrain_loss(self, inputs: TermInputs) -> Tensor:
        """Reconstruction of the teacher's features by the paraphrasers (teacher features only)."""
        losses = []
        for i, pair in enumerate(self.feature_pairs()):
            t = inputs.teacher[pair.teacher].detach()
            losses.append(pair.weight * reconstruction_loss(self.paraphrasers[str(i)](t), t, self.reconstruction))
        return torch.stack(losses).sum()

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for i, pair in enumerate(self.feature_pairs()):
            with torch.no_grad():
                factor_t = self.paraphrasers[str(i)].encoder(inputs.teacher[pair.teacher].detach())
            factor_s = self.translators[str(i)](inputs.student[pair.student])
            f_s, f_t = pool_to(as_map(factor_s), self._sizes[i]), pool_to(as_map(factor_t), self._sizes[i])
            losses.append(pair.weight * ft_loss(f_s, f_t, self.mode))
        return torch.stack(losses).sum()

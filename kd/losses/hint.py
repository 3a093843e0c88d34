"""FitNets hints: Romero et al. (2015), "FitNets: Hints for Thin Deep Nets"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("paper", "mean")
KERNEL_SIZES = (1, 3)


def hint_loss(regressed: Tensor, hint: Tensor, mode: str = "paper") -> Tensor:
    """Hint loss between the regressed student guided layer and the teacher hint layer.

    * ``"paper"`` (eq. 3): ``1/2 * || u_h - r(v_g) ||^2``, summed over all non-batch elements
      and averaged over the batch.
    * ``"mean"``: ``F.mse_loss`` (mean over *every* element), as in the CRD/RepDistiller code
      base. It equals ``"paper"`` divided by ``numel / B / 2``, so weights do not carry over.

    Args:
        regressed: ``(B, ...)`` student features after the regressor ``r(v_g)``.
        hint: ``(B, ...)`` teacher hint ``u_h``, same shape; treated as constants (detached).
        mode: ``"paper"`` or ``"mean"``.

    Returns:
        Scalar tensor.
    """
    if mode not in MODES:
        raise ValueError(f"hint loss mode must be one of {MODES}, got {mode!r}")
    if regressed.shape != hint.shape:
        raise ValueError(
            f"regressed student features and teacher hint differ in shape: {tuple(regressed.shape)} vs "
            f"{tuple(hint.shape)}; map the student to the teacher's shape with a HintRegressor"
        )
    if regressed.dim() < 2:
        raise ValueError(
            f"hint loss needs a batch dimension plus features, got shape {tuple(regressed.shape)}"
        )
    target = hint.detach()
    if mode == "mean":
        return F.mse_loss(regressed, target)
    # (B, ...) -> (B, N)
    sq = (regressed - target).pow(2).flatten(start_dim=1)
    # (B, N) -> (B,) -> ()
    return 0.5 * sq.sum(dim=1).mean()


class HintRegressor(nn.Module):
    """Regressor ``r`` that maps the student's guided layer to the teacher's hint shape.

    * ``(C, H, W)`` maps: ``Conv2d(C_s, C_t, kernel_size, padding=kernel_size // 2)``, then, if
      the spatial sizes differ, ``adaptive_avg_pool2d`` to the teacher's ``(H, W)``, then
      ``BatchNorm2d(C_t)``. The paper uses a convolutional regressor (§2.2); RepDistiller's
      ``ConvReg`` uses conv + BN + ReLU and fixes spatial mismatch with a strided conv
      (student twice as large), a transposed conv (half as large) or a ``1 + H_s - H_t``
      kernel. Here: conv + BN, no ReLU, so the regressor can also match hints that take negative
      values (pre-activation features); the conv has no bias since BN's shift replaces it.
      Pooling is parameter-free and handles any size ratio (to a larger teacher map it
      repeats values, i.e. nearest-style upsampling).
    * ``(D,)`` vectors: ``Linear(D_s, D_t)``.

    Args:
        student_shape: student feature shape without the batch dimension, ``(C, H, W)`` or ``(D,)``.
        teacher_shape: teacher feature shape without the batch dimension, same kind.
        kernel_size: conv kernel, 1 or 3 (ignored for vectors, but still validated).
    """

    def __init__(
        self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kernel_size: int = 1
    ) -> None:
        super().__init__()
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        if kernel_size not in KERNEL_SIZES or isinstance(kernel_size, bool):
            raise ValueError(f"HintRegressor kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        for name, shape in (("student_shape", student_shape), ("teacher_shape", teacher_shape)):
            if len(shape) not in (1, 3) or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ValueError(
                    f"HintRegressor {name} must be (C, H, W) or (D,) of positive ints without the batch "
                    f"dimension, got {shape!r}"
                )
        if len(student_shape) != len(teacher_shape):
            raise ValueError(
                f"HintRegressor cannot map student features {student_shape} to teacher features "
                f"{teacher_shape}: both must be (C, H, W) maps or both (D,) vectors"
            )
        self.student_shape = student_shape
        self.teacher_shape = teacher_shape
        self.kernel_size = kernel_size
        if len(student_shape) == 1:
            self.linear: nn.Linear | None = nn.Linear(student_shape[0], teacher_shape[0])
            self.conv: nn.Conv2d | None = None
            self.bn: nn.BatchNorm2d | None = None
            self.out_size: tuple[int, int] | None = None
        else:
            self.linear = None
            self.conv = nn.Conv2d(
                student_shape[0], teacher_shape[0], kernel_size, padding=kernel_size // 2, bias=False
            )
            self.bn = nn.BatchNorm2d(teacher_shape[0])
            same_size = student_shape[1:] == teacher_shape[1:]
            self.out_size = None if same_size else (teacher_shape[1], teacher_shape[2])

    def forward(self, x: Tensor) -> Tensor:
        """``(B, *student_shape) -> (B, *teacher_shape)``."""
        if tuple(x.shape[1:]) != self.student_shape:
            raise ValueError(
                f"HintRegressor was built for student features (B, *{self.student_shape}), "
                f"got shape {tuple(x.shape)}"
            )
        if self.linear is not None:
            # (B, D_s) -> (B, D_t)
            return self.linear(x)
        assert self.conv is not None and self.bn is not None
        # (B, C_s, H_s, W_s) -> (B, C_t, H_s, W_s)
        y = self.conv(x)
        if self.out_size is not None:
            # (B, C_t, H_s, W_s) -> (B, C_t, H_t, W_t)
            y = F.adaptive_avg_pool2d(y, self.out_size)
        return self.bn(y)

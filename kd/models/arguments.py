"""Argument checks shared by every architecture in ``kd.models`` (one message for one mistake)."""

from collections.abc import Sequence


def check_classifier(num_classes: int, input_shape: Sequence[int]) -> None:
    """The two arguments every model takes first.

    Raises:
        ValueError: ``num_classes < 1`` or ``input_shape`` not three positive sizes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive entries, got {input_shape}")


def positive_ints(name: str, values: Sequence[int], length: int | None = None) -> list[int]:
    """``values`` as a list of ints, each >= 1 (and ``length`` of them when given).

    Raises:
        ValueError: Naming the argument ``name``.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive ints, got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a list of positive ints, got {list(values)}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {list(values)}")
    return [int(v) for v in values]

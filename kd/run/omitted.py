"""A class the student never sees (Hinton, Vinyals & Dean 2015, section 3): the transfer set lacks
``student.omit_classes``, the teacher knew them, and the soft targets alone teach the student
how to recognise them. Its learned bias for an omitted class comes out too low; the paper raises
it by a constant (3.5 on MNIST, chosen on the test set); here the shift is chosen on the
validation split, from a grid, and then applied once to the test set.

Metrics (``omit/*``): the test accuracy on the omitted classes alone (``class_acc``) and, with
the bias shift, ``bias``, ``test_acc_corrected`` and ``class_acc_corrected``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd.compression.layers import output_layer
from kd.data import Split, TensorDataModule

SHIFTS = torch.arange(0.0, 10.01, 0.25)  # candidate bias increments


def omitted_classes(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    """``student.omit_classes`` checked against the data: some of its classes, never all."""
    omit = [int(c) for c in classes or []]
    if omit and (not set(omit) <= set(range(num_classes)) or len(set(omit)) >= num_classes):
        raise ValueError(f"student.omit_classes must be some of the classes 0..{num_classes - 1}, got {omit}")
    return omit


def drop_classes(split: Split, classes: Sequence[int]) -> Split:
    """``split`` without the samples of ``classes``."""
    keep = ~torch.isin(split.y, torch.as_tensor(list(classes)))
    return Split(split.x[keep], split.y[keep])


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(xb.to(device)).cpu() for xb in x.split(batch_size)])  # (N, classes)


def _accuracies(logits: Tensor, y: Tensor, classes: Tensor) -> tuple[float, float]:
    """Overall accuracy and the accuracy on the samples of ``classes``."""
    right = logits.argmax(1) == y
    mask = torch.isin(y, classes)
    return float(right.float().mean()), float(right[mask].float().mean())


def bias_correction(model: nn.Module, data: TensorDataModule, classes: Sequence[int]) -> dict[str, float]:
    """Raise the output bias of ``classes`` by the shift that maximises validation accuracy;
    returns ``omit/*`` metrics on the test split before and after (the model is left unchanged)."""
    assert data.val is not None and data.test is not None
    omitted = torch.as_tensor(list(classes))
    model = model.eval()
    head = output_layer(model, data.input_shape)
    if head.bias is None:
        raise ValueError("bias correction needs an output layer with a bias")
    val, test = _logits(model, data.val.x), _logits(model, data.test.x)
    onehot = torch.zeros(val.shape[1]).index_fill_(0, omitted, 1.0)  # (classes,): 1 for the omitted ones

    def shifted(logits: Tensor, shift: float) -> Tensor:
        return logits + shift * onehot  # the same as raising those biases by `shift`

    best = max(SHIFTS.tolist(), key=lambda s: (_accuracies(shifted(val, s), data.val.y, omitted)[0], -s))
    test_acc, class_acc = _accuracies(test, data.test.y, omitted)
    corrected, class_corrected = _accuracies(shifted(test, best), data.test.y, omitted)
    return {"omit/class_acc": class_acc, "omit/bias": best, "omit/test_acc": test_acc,
            "omit/test_acc_corrected": corrected, "omit/class_acc_corrected": class_corrected}  # fmt: skip

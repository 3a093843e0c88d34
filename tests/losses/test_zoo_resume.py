"""A fit of a method with state of its own, killed and resumed from its Lightning checkpoint,
continues exactly as the uninterrupted fit: CRD's memory banks, Z and negatives' stream, CTKD's
temperature, VID's variances, OFD's margins, FT's paraphraser and its stage, DKD's warm-up."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from kd.losses import CRD, CTKD, DKD, FT, OFD, VID, CrossEntropy, Objective
from kd.models import MLP
from kd.train.modules import DistillationModule
from pruning_helpers import KillAt, digits, trainer

SHAPE = (1, 8, 8)
EPOCHS = 3
METHODS = {
    "crd": lambda: Objective(terms={"crd": CRD(weight=0.8, feat_dim=16, nce_k=64)}),
    "ctkd": lambda: Objective(ce_weight=0.1, terms={"ctkd": CTKD(weight=0.9, curriculum_epochs=2)}),
    "vid": lambda: CrossEntropy({"vid": VID()}),
    "ofd": lambda: CrossEntropy({"ofd": OFD(margin_batches=2)}),
    "ft": lambda: CrossEntropy({"ft": FT(paraphraser_epochs=1)}),
    "dkd": lambda: Objective(terms={"dkd": DKD(warmup_epochs=3)}),
}


def _fit(method: str, folder: Path, ckpt: str | None = None, kill: bool = False) -> DistillationModule:
    data = digits()
    pl.seed_everything(0, verbose=False)
    teacher = MLP(10, SHAPE, hidden=[24, 24])
    student = MLP(10, SHAPE, hidden=[16, 16])
    module = DistillationModule(student, teacher, 10, partial(torch.optim.SGD, lr=0.05, momentum=0.9), METHODS[method](),
                                SHAPE, num_samples=len(data.train.y))  # fmt: skip
    callbacks = [ModelCheckpoint(dirpath=folder, save_last=True), *([KillAt(2)] if kill else [])]
    trainer(callbacks, EPOCHS, enable_checkpointing=True).fit(module, datamodule=data, ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("method", METHODS)
def test_a_resumed_fit_continues_the_methods_state_exactly(tmp_path, method):
    full = _fit(method, tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        _fit(method, tmp_path / "cut", kill=True)
    resumed = _fit(method, tmp_path / "cut", ckpt=str(tmp_path / "cut" / "last.ckpt"))
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))
    own = {k: v for k, v in full.objective.state_dict().items() if isinstance(v, torch.Tensor)}
    assert own or method == "dkd"  # every method here but DKD keeps tensors of its own
    torch.testing.assert_close(own, {k: v for k, v in resumed.objective.state_dict().items() if k in own})

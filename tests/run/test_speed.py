"""The speed machinery: batches served from the training device, one batch shape for compiled
steps, ``compile=true`` (compiled where it can be, eager with a log line where not), and
bf16 mixed precision through the whole run. Tests marked ``gpu`` run with ``-m gpu``."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.loggers import Logger

from kd.data import DigitsDataModule
from kd.data.batches import EpochShuffleSampler, IndexedTensorDataset
from kd.run.experiment import run
from kd.models import MLP
from kd.losses import SoftTargetKD
from kd.train.modules import ClassifierModule, DistillationModule
from kd.train.trainer import compile_choice

SGD = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731


def _digits(drop_last: bool = False) -> DigitsDataModule:
    data = DigitsDataModule(batch_size=64)
    data.drop_last = drop_last  # what compile_choice sets; not a config key of its own
    data.setup("fit")
    return data


def test_loaders_serve_batches_from_the_trainers_device_and_leave_the_splits_alone():
    data = _digits()
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    x, y, index = next(iter(data.train_dataloader()))
    assert x.device.type == y.device.type == index.device.type == "meta"
    assert x.shape == (64, *data.input_shape)
    assert data.train.x.device.type == "cpu"  # int8 evaluation and measurements read these
    data.trainer = None
    x, _, _ = next(iter(data.val_dataloader()))
    assert x.device.type == "cpu"


def test_an_epoch_is_the_samplers_order_cut_into_device_slices():
    data = _digits()
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    loader = data.train_dataloader()
    order = list(loader.batch_sampler.sampler)  # the epoch's shuffle (seeded by the epoch)
    indices = [index for _, _, index in loader]
    assert all(i.device.type == "meta" for i in indices) and [len(i) for i in indices][:-1] == [64] * (len(indices) - 1)
    data.trainer = None
    cpu = [index.tolist() for _, _, index in data.train_dataloader()]
    assert sum(cpu, []) == order and sorted(order) == list(range(len(data.train.y)))


class _FirstIndices(pl.Callback):
    def __init__(self) -> None:
        self.first: list[list[int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first.append(batch[2][:8].tolist())


def test_every_epoch_is_shuffled_anew_and_as_the_seeded_sampler_says():
    data = _digits()
    pl.seed_everything(3, verbose=False)
    module = ClassifierModule(MLP(data.num_classes, data.input_shape, [8]), data.num_classes, SGD)
    seen = _FirstIndices()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, callbacks=[seen], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    sampler = EpochShuffleSampler(range(len(data.train.y)))
    sampler.seed = trainer.train_dataloader.batch_sampler.sampler.seed
    expected = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected.append(list(sampler)[:8])
    assert seen.first == expected and expected[0] != expected[1] != expected[2]


def test_drop_last_makes_every_training_batch_one_shape():
    ragged, even = _digits(), _digits(drop_last=True)
    n = len(even.train.y)
    assert n % 64 != 0  # otherwise this test shows nothing
    assert [len(b[1]) for b in ragged.train_dataloader()][-1] == n % 64
    sizes = [len(b[1]) for b in even.train_dataloader()]
    assert set(sizes) == {64} and len(sizes) == n // 64
    assert len(next(iter(even.val_dataloader()))[1]) == len(even.val.y)  # evaluation keeps every sample
    assert even.fingerprint()["drop_last"] is True and "drop_last" not in ragged.fingerprint()


class _Seen(pl.Callback):
    """Whether training steps ran compiled."""

    def __init__(self) -> None:
        self.compiled = False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.compiled |= module._compile_checked and module._compiled_step is not None


def _fit(model: torch.nn.Module, compile_model: bool, data: DigitsDataModule, epochs: int = 1) -> tuple[ClassifierModule, _Seen]:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(model, data.num_classes, SGD, compile_model=compile_model)
    seen = _Seen()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, callbacks=[seen], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, seen


def test_compiled_training_runs_compiled_and_matches_eager_training():
    data = _digits(drop_last=True)
    torch.manual_seed(0)
    init = MLP(data.num_classes, data.input_shape, [32])
    eager, seen_eager = _fit(copy.deepcopy(init), False, data)
    compiled, seen = _fit(copy.deepcopy(init), True, data)
    assert seen.compiled and not seen_eager.compiled
    assert compiled._compiled_step is None  # released after fit: evaluation and saving see the plain network
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    moved = max((a - i).abs().max() for a, i in zip(compiled.model.parameters(), init.parameters()))
    assert moved > 1e-2  # it trained
    for a, b in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # same steps, up to kernel rounding


def test_a_failing_compiler_falls_back_to_the_same_eager_training(monkeypatch, caplog):
    def broken(model, **kwargs):
        def call(*args):
            raise RuntimeError("backend exploded\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    data = _digits()
    torch.manual_seed(0)
    init = MLP(data.num_classes, data.input_shape, [32])
    eager, _ = _fit(copy.deepcopy(init), False, data)
    with caplog.at_level(logging.WARNING, logger="kd.train.modules"):
        fallback, seen = _fit(copy.deepcopy(init), True, data)
    assert "compile failed (RuntimeError: backend exploded); training eagerly" in caplog.text
    assert not seen.compiled
    for a, b in zip(fallback.model.parameters(), eager.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("overrides", "compiled", "reason"),
    [
        ((), True, None),
        (("prune=magnitude",), False, "magnitude"),
        (("quantize=cluster",), False, "cluster"),
        (("distill=at", "model@student.model=resnet8", "model@teacher.model=resnet14"), False, "feature terms"),
    ],
)
def test_compile_choice_compiles_plain_distillation_and_says_why_it_does_not(make_cfg, caplog, overrides, compiled, reason):
    cfg = make_cfg("compile=true", *overrides)
    data = _digits()
    compression = [instantiate(cfg[g]) if cfg[g] and "_target_" in cfg[g] else None for g in ("prune", "factorize", "quantize")]
    with caplog.at_level(logging.WARNING, logger="kd.train.trainer"):
        assert compile_choice(cfg.compile, instantiate(cfg.distill), data, *compression) is compiled
    assert data.drop_last is compiled
    if reason:
        assert "compile=true ignored" in caplog.text and reason in caplog.text
    off = make_cfg()
    assert compile_choice(off.compile, instantiate(off.distill), _digits()) is False


class _Memory(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("log_steps", [False, True])
def test_step_logging_is_off_by_default_and_every_n_steps_when_asked(log_steps):
    data = _digits()  # 1294 samples: 21 steps of 64 an epoch
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(MLP(data.num_classes, data.input_shape, [32]), data.num_classes, SGD, log_steps=log_steps)
    memory = _Memory()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=memory, log_every_n_steps=5, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    steps = [(step, m["train/loss_step"]) for step, m in memory.logged if "train/loss_step" in m]
    epochs = [m["train/loss"] for _, m in memory.logged if "train/loss" in m]
    assert len(epochs) == 2  # the per-epoch means are logged either way
    if not log_steps:
        assert steps == []
        return
    assert [s for s, _ in steps] == [4, 9, 14, 19, 24, 29, 34, 39]  # every 5th of 42 steps
    assert all(isinstance(v, float) and 0.0 < v < 5.0 for _, v in steps)
    assert steps[-1][1] < steps[0][1]  # the loss falls within training


def test_a_diverging_run_fails_with_the_reason_instead_of_finishing_at_chance(make_cfg):
    from mlflow.tracking import MlflowClient

    cfg = make_cfg("distill=none", "student.optimizer.lr=1e8", "student.scheduler=null")
    with pytest.raises(FloatingPointError, match="training diverged in epoch 0: .*train/loss.* not finite"):
        run(cfg)
    client = MlflowClient(f"sqlite:///{cfg.paths.output_root}/mlflow.db")
    (student,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert student.info.status == "FAILED"


def test_run_with_bf16_mixed_precision_trains(make_cfg):
    metrics = run(make_cfg("trainer.precision=bf16-mixed", "trainer.max_epochs=3"))
    assert metrics["test/acc"] > 0.8 and metrics["teacher/test_acc"] > 0.8


@pytest.mark.gpu
def test_gpu_loaders_serve_from_the_gpu():
    data = _digits()
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    x, y, index = next(iter(data.train_dataloader()))
    assert x.is_cuda and y.is_cuda and index.is_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("augment", [False, True])
def test_gpu_run_compiled_with_cuda_graphs_and_bf16(make_cfg, caplog, augment):
    common = ["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.max_epochs=4", f"data.augment={augment}",
              "data.augment_padding=1", "data.augment_flip=false"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        metrics = run(make_cfg("compile=true", *common))
    assert "mode='reduce-overhead'" in caplog.text and "compile failed" not in caplog.text
    assert ("teacher logits: online" in caplog.text) is augment
    eager = run(make_cfg("compile=false", *common))
    assert metrics["test/acc"] > 0.6 and abs(metrics["test/acc"] - eager["test/acc"]) < 0.06  # the same training


class _NoSyncInSteps(pl.Callback):
    """Turns any host-device synchronisation inside a training step of the second epoch on
    (the first compiles, records CUDA graphs and warms the allocator up) into an error."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch > 0:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.checked += 1


@pytest.mark.gpu
@pytest.mark.parametrize(("cached", "compile_model"), [(True, False), (False, False), (True, True)])
def test_gpu_training_steps_never_wait_for_the_host(cached, compile_model):
    data = _digits(drop_last=compile_model)
    dataset, index = IndexedTensorDataset(data.train.x.cuda(), data.train.y.cuda()), torch.arange(64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        dataset.__getitems__(index)  # the loader's gather, given an EpochBatches slice
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.manual_seed(0)
    student, teacher = MLP(data.num_classes, data.input_shape, [32]), MLP(data.num_classes, data.input_shape, [64])
    module = DistillationModule(
        student, teacher, data.num_classes, SGD, SoftTargetKD(4.0, 0.9), data.input_shape,
        teacher_inputs=data.train.x if cached else None, compile_model=compile_model,
    )  # fmt: skip
    guard = _NoSyncInSteps()
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=3, logger=False, callbacks=[guard], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert guard.checked == 2 * (len(data.train.y) // 64 + (0 if compile_model else 1))

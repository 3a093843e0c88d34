"""The teacher's fingerprint and cache (kd/train/teacher.py, kd/run/teacher_step.py), without
training: a stand-in ``train`` counts calls, so each rule is checked on both sides quickly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kd.train import teacher as teachers
from kd.train.teacher import fingerprint, obtain_teacher, seeded


class _Data:
    input_shape = (3,)


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


class _Trainer:
    """``train``: nudges the weights (a "trained" teacher differs from a fresh one) and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: _Module) -> tuple[dict[str, float], str | None]:
        self.calls += 1
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(1.0)
        return {"val/acc": 0.5 + self.calls / 100}, f"run{self.calls}"


def _build() -> nn.Module:
    return nn.Linear(3, 2)


RECIPE = {"model": {"hidden": [4]}, "seed": 0, "max_epochs": 3}


def _obtain(tmp_path: Path, train: _Trainer, recipe: dict = RECIPE, checkpoint: str | None = None, allow_pickle: bool = False,
            cache: str = "cache"):  # fmt: skip
    return obtain_teacher(seeded(0, _build), recipe, _Data(), tmp_path / cache, checkpoint, allow_pickle, train, _Module)


class _Note:
    """A picklable object that is not a tensor: a checkpoint holding it needs arbitrary unpickling."""


def test_the_fingerprint_is_the_sha256_of_the_versioned_canonical_recipe():
    expected = hashlib.sha256(json.dumps({"version": 1, **RECIPE}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    assert fingerprint(RECIPE) == expected and teachers.FINGERPRINT_VERSION == 1
    assert fingerprint(dict(reversed(list(RECIPE.items())))) == expected  # key order does not matter
    for key, value in (("seed", 1), ("max_epochs", 4), ("model", {"hidden": [5]})):
        assert fingerprint(RECIPE | {key: value}) != expected, key
    assert fingerprint(RECIPE | {"extra": None}) != expected
    assert fingerprint(RECIPE | {"root": Path("/data")}) == fingerprint(RECIPE | {"root": "/data"})  # paths as text


def test_a_new_fingerprint_version_retrains_everything(monkeypatch):
    before = fingerprint(RECIPE)
    monkeypatch.setattr(teachers, "FINGERPRINT_VERSION", 2)
    assert fingerprint(RECIPE) != before


def test_a_teacher_is_trained_once_stored_with_its_checksum_then_reused(tmp_path, caplog):
    train = _Trainer()
    with caplog.at_level(logging.INFO, logger="kd.train.teacher"):
        first = _obtain(tmp_path, train)
    assert f"teacher {fingerprint(RECIPE)} not cached: training it" in caplog.text
    folder = tmp_path / "cache" / fingerprint(RECIPE)
    assert (first.source, first.fingerprint, first.path, first.run_id, train.calls) == ("trained", fingerprint(RECIPE), folder / "teacher.pt", "run1", 1)
    assert first.metrics == {"val/acc": 0.51}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256((folder / "teacher.pt").read_bytes()).hexdigest()
    assert (meta["fingerprint"], meta["recipe"], meta["metrics"], meta["run_id"]) == (fingerprint(RECIPE), RECIPE, {"val/acc": 0.51}, "run1")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", meta["created"]) and not (folder / "meta.json.tmp").exists()
    assert (tmp_path / "cache" / f"{fingerprint(RECIPE)}.lock").exists()  # parallel jobs wait on it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd.train.teacher"):
        again = _obtain(tmp_path, train)
    assert (again.source, again.path, again.run_id, again.metrics, train.calls) == ("cache", folder / "teacher.pt", "run1", {"val/acc": 0.51}, 1)
    assert again.fingerprint == first.fingerprint == fingerprint(RECIPE)
    assert f"teacher {fingerprint(RECIPE)} reused from {folder} (trained {meta['created']})" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    fresh = seeded(0, _build)()
    assert not torch.equal(again.model.weight, fresh.weight)  # the trained weights, not a fresh build


def test_another_recipe_trains_another_teacher(tmp_path):
    train = _Trainer()
    _obtain(tmp_path, train)
    other = _obtain(tmp_path, train, RECIPE | {"seed": 1})
    assert other.source == "trained" and train.calls == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted([fingerprint(RECIPE), fingerprint(RECIPE | {"seed": 1})])


def test_a_checkpoint_is_loaded_and_nothing_is_cached(tmp_path, caplog):
    weights = tmp_path / "given.pt"
    given = nn.Linear(3, 2)
    torch.save(given.state_dict(), weights)
    train = _Trainer()
    with caplog.at_level(logging.INFO, logger="kd.train.teacher"):
        loaded = _obtain(tmp_path, train, checkpoint=str(weights))
    assert (loaded.source, loaded.path, loaded.metrics, loaded.run_id, train.calls) == ("checkpoint", weights, {}, None, 0)
    assert torch.equal(loaded.model.weight, given.weight) and not (tmp_path / "cache").exists()
    assert loaded.fingerprint == fingerprint(RECIPE) and f"teacher loaded from {weights}" in caplog.text


def test_a_checkpoint_that_needs_unpickling_loads_only_when_allowed(tmp_path):
    weights = tmp_path / "lightning.ckpt"
    given = nn.Linear(3, 2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in given.state_dict().items()}, "note": _Note()}, weights)
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        _obtain(tmp_path, _Trainer(), checkpoint=str(weights))
    loaded = _obtain(tmp_path, _Trainer(), checkpoint=str(weights), allow_pickle=True)
    assert torch.equal(loaded.model.weight, given.weight)


def test_the_cache_folder_is_made_with_its_parents_and_paths_in_a_recipe_are_stored_as_text(tmp_path):
    recipe = RECIPE | {"root": Path("/data/fashion")}
    made = _obtain(tmp_path, _Trainer(), recipe, cache="deep/er/cache")
    meta = json.loads((tmp_path / "deep/er/cache" / made.fingerprint / "meta.json").read_text())
    assert meta["recipe"]["root"] == "/data/fashion" and made.fingerprint == fingerprint(recipe)


@pytest.mark.parametrize("damage", ["checksum", "truncated", "no meta"])
def test_a_damaged_or_unfinished_entry_is_trained_again(tmp_path, damage, caplog):
    train = _Trainer()
    _obtain(tmp_path, train)
    folder = tmp_path / "cache" / fingerprint(RECIPE)
    weights = folder / "teacher.pt"
    if damage == "checksum":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(meta | {"sha256": "0" * 64}))
    elif damage == "truncated":
        blob = weights.read_bytes()
        weights.write_bytes(blob[: len(blob) // 2])
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))  # the load itself fails
    else:
        (folder / "meta.json").unlink()  # a crash between the weights and the meta: not a complete entry
    with caplog.at_level(logging.WARNING):
        again = _obtain(tmp_path, train)
    assert again.source == "trained" and train.calls == 2 and weights.exists() and (folder / "meta.json").exists()
    aside = [p for p in (tmp_path / "cache").iterdir() if ".damaged-" in p.name]
    if damage == "no meta":
        assert aside == [] and "damaged" not in caplog.text  # unfinished, not damaged: trained over
    else:
        assert len(aside) == 1 and re.fullmatch(rf"{fingerprint(RECIPE)}\.damaged-\d{{8}}-\d{{6}}", aside[0].name), aside
        reason = "ValueError: its checksum does not match meta.json" if damage == "checksum" else "RuntimeError"  # torch's zip error
        assert f"cached teacher {weights} is damaged ({reason}" in caplog.text and f"moved aside to {aside[0]}, training it again" in caplog.text


def test_an_entry_without_a_checksum_or_metrics_from_an_older_kd_is_still_reused(tmp_path):
    train = _Trainer()
    _obtain(tmp_path, train)
    meta_file = tmp_path / "cache" / fingerprint(RECIPE) / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k not in ("sha256", "metrics")}))
    reused = _obtain(tmp_path, train)
    assert reused.source == "cache" and train.calls == 1 and reused.metrics == {}


def test_other_ranks_train_with_rank_zero_but_never_write_the_cache(tmp_path, monkeypatch):
    from pytorch_lightning.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    train = _Trainer()
    joined = _obtain(tmp_path, train)
    assert (joined.source, joined.path, joined.fingerprint, train.calls) == ("trained", None, fingerprint(RECIPE), 1)
    assert not (tmp_path / "cache").exists()  # no folder, no lock, no weights: rank zero writes
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    _obtain(tmp_path, train)  # rank zero's entry ...
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert _obtain(tmp_path, train).source == "cache"  # ... which the other ranks read


def test_seeded_builds_depend_on_the_seed_only():
    a, b, c = seeded(3, _build)(), seeded(3, _build)(), seeded(4, _build)()
    torch.manual_seed(99)  # whatever happened to the RNG before
    d = seeded(3, _build)()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, d.weight) and not torch.equal(a.weight, c.weight)
    assert os.environ["PL_SEED_WORKERS"] == "1"  # data-loader workers seeded too (seed_everything(workers=True))


# -- the run's teacher recipe (kd/run/teacher_step.py): what changes the teacher, and what does not

CHANGES = ["teacher.seed=1", "teacher.max_epochs=4", "teacher.optimizer.lr=0.1", "teacher.scheduler.T_max=7",
           "model@teacher.model=lenet300_100", "data.batch_size=32", "data.split_seed=1", "data.val_fraction=0.2",
           "trainer.precision=64-true", "+trainer.gradient_clip_val=1.0", "teacher.augment=true", "data=fashion_mnist"]  # fmt: skip
SAME = ["trainer.enable_progress_bar=true", "trainer.log_every_n_steps=5", "trainer.max_epochs=7", "seed=3",
        "distill.temperature=2", "student.optimizer.lr=0.2", "trainer.enable_model_summary=true"]  # fmt: skip


def _recipe_fingerprint(make_cfg, monkeypatch, *overrides: str) -> str:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kd.run import teacher_step
    from kd.tracking.measure import Measurement
    from kd.train.trainer import Trainers

    seen = {}
    monkeypatch.setattr(teacher_step, "obtain_teacher", lambda **kw: seen.setdefault("fp", fingerprint(kw["recipe"])))
    cfg = make_cfg(*overrides)
    data = instantiate(cfg.data)
    if "data=fashion_mnist" in overrides:
        data.setup = lambda stage=None: None  # the recipe reads the source's description, not its files
    trainers = Trainers(OmegaConf.to_container(cfg.trainer, resolve=True))
    teacher_step.obtain(cfg, trainers, Measurement(latency=False), data, None, None, {"choices": {}, "tags": {}})
    return seen["fp"]


@pytest.mark.parametrize("override", CHANGES)
def test_what_changes_the_teacher_changes_its_fingerprint(make_cfg, monkeypatch, override):
    assert _recipe_fingerprint(make_cfg, monkeypatch, override) != _recipe_fingerprint(make_cfg, monkeypatch)


@pytest.mark.parametrize("override", SAME)
def test_display_switches_and_student_keys_keep_the_fingerprint(make_cfg, monkeypatch, override):
    assert _recipe_fingerprint(make_cfg, monkeypatch, override) == _recipe_fingerprint(make_cfg, monkeypatch)


def test_the_recipe_holds_what_trains_the_teacher_read_from_the_config(make_cfg, monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kd.run import teacher_step
    from kd.tracking.measure import Measurement
    from kd.train.trainer import Trainers

    seen = {}
    monkeypatch.setattr(teacher_step, "obtain_teacher", lambda **kw: seen.update(kw) or "teacher")
    cfg = make_cfg("teacher.seed=5", "teacher.max_epochs=7", "data.batch_size=32", "teacher.augment=true")
    data = instantiate(cfg.data)
    trainers = Trainers(OmegaConf.to_container(cfg.trainer, resolve=True))
    assert teacher_step.obtain(cfg, trainers, Measurement(latency=False), data, _build, None, {"choices": {}, "tags": {}}) == "teacher"
    recipe = seen["recipe"]
    assert set(recipe) == {"model", "data", "seed", "max_epochs", "optimizer", "scheduler", "trainer"}
    assert recipe["model"] == {"_target_": "kd.models.MLP", "_partial_": True, "hidden": [256, 256], "dropout": 0.2}
    assert (recipe["seed"], recipe["max_epochs"], recipe["data"]["batch_size"], recipe["data"]["augment"]) == (5, 7, 32, True)
    assert recipe["optimizer"]["lr"] == 0.05 and recipe["scheduler"]["T_max"] == 7  # resolved: ${teacher.max_epochs}
    assert recipe["trainer"]["precision"] == "32-true" and not {"max_epochs", "enable_progress_bar", "log_every_n_steps"} & set(recipe["trainer"])
    assert data.augment is False  # the teacher's augmentation is switched on only while it trains
    assert (seen["checkpoint"], seen["allow_pickle"], seen["cache_dir"], seen["data"]) == (None, False, Path(cfg.paths.teacher_cache), data)
    assert seen["build"]().weight.shape == (2, 3) and torch.equal(seen["build"]().weight, seeded(5, _build)().weight)  # seeded by teacher.seed
    module = seen["make_module"](nn.Linear(3, 10))
    assert module.val_metrics["acc"].num_classes == 10 and module._make_scheduler is not None and module.compile_model is False
    assert module._make_optimizer([nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 0.05  # the teacher's optimiser

    def recipe(*overrides: str) -> dict:
        again = make_cfg(*overrides)
        teacher_step.obtain(again, trainers, Measurement(latency=False), instantiate(again.data), _build, None, {"choices": {}, "tags": {}})
        return seen["recipe"]

    assert recipe("teacher.scheduler=null")["scheduler"] is None and seen["make_module"](nn.Linear(3, 10))._make_scheduler is None
    assert seen["make_module"](nn.Linear(3, 10)).compile_model is False
    recipe("compile=true")
    assert seen["make_module"](nn.Linear(3, 10)).compile_model is True
    assert recipe("data.augment=true")["data"]["augment"] is True  # teacher.augment null: as the data
    interpolated = recipe("teacher.optimizer.lr=${student.optimizer.momentum}", "teacher.model.dropout=${distill.alpha}")
    assert interpolated["optimizer"]["lr"] == 0.9 and interpolated["model"]["dropout"] == 0.9  # resolved values, not "${...}"
    recipe("teacher=checkpoint", "teacher.checkpoint=/some/teacher.pt", "teacher.allow_pickle=true")
    assert (seen["checkpoint"], seen["allow_pickle"]) == ("/some/teacher.pt", True)


def test_a_teacher_trained_here_has_its_own_run_with_its_recipe_epochs_and_measurement(make_cfg, monkeypatch):
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from kd.models import MLP
    from kd.run import teacher_step
    from kd.tracking.measure import Measurement
    from kd.tracking.tracker import Tracker
    from kd.train.trainer import Trainers

    cfg = make_cfg("teacher.max_epochs=2", "teacher.augment=true", "data.limit_train=200", "teacher.optimizer.lr=0.0",
                   "teacher.optimizer.weight_decay=0.0", "teacher.scheduler=null")  # fmt: skip
    data = instantiate(cfg.data)
    data.setup("fit")
    seen_augment = []

    class Watch(MLP):
        def forward(self, x):
            if self.training:
                seen_augment.append(data.augment)
            return super().forward(x)

    build = lambda: Watch(10, (1, 8, 8), hidden=[16])  # noqa: E731
    root = Path(cfg.paths.output_root)
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "kd", root / "mlartifacts")
    trainers = Trainers(OmegaConf.to_container(cfg.trainer, resolve=True), {"checkpoint": instantiate(cfg.callbacks.checkpoint)})
    context = {"choices": {"model@teacher.model": "tiny"}, "tags": {"kd.sweep": "s"}}
    built: list[dict] = []
    original = Trainers.build
    monkeypatch.setattr(Trainers, "build", lambda self, *a, **kw: built.append(kw) or original(self, *a, **kw))
    teacher = teacher_step.obtain(cfg, trainers, Measurement(latency=False), data, build, tracker, context)
    assert built[0]["enable_checkpointing"] is False  # its last weights, no checkpoint of its own
    assert teacher.source == "trained" and set(seen_augment) == {True} and data.augment is False
    assert torch.equal(teacher.model.head.weight, seeded(0, build)().head.weight)  # lr 0: the weights it started from
    assert set(teacher.metrics) == {"val/acc", "test/acc"} and 0 <= teacher.metrics["test/acc"] <= 1
    client = MlflowClient(tracker.uri)
    run = client.get_run(teacher.run_id)
    assert run.info.run_name == "teacher tiny" and run.info.status == "FINISHED"
    assert (run.data.tags["kd.role"], run.data.tags["kd.fingerprint"], run.data.tags["kd.sweep"]) == ("teacher", teacher.fingerprint, "s")
    assert run.data.params["teacher.fingerprint"] == teacher.fingerprint and run.data.params["teacher.max_epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # teacher.max_epochs, not trainer.max_epochs
    assert run.data.metrics["model/params"] == sum(p.numel() for p in build().parameters())
    assert run.data.metrics["test/acc"] == pytest.approx(teacher.metrics["test/acc"])
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()  # the teacher keeps its last weights: no checkpoint callback


def test_a_teacher_run_without_a_model_choice_is_named_after_its_class(make_cfg):
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from kd.models import MLP
    from kd.run import teacher_step
    from kd.tracking.measure import Measurement
    from kd.tracking.tracker import Tracker
    from kd.train.trainer import Trainers

    cfg = make_cfg("teacher.max_epochs=1", "data.limit_train=64")
    data = instantiate(cfg.data)
    data.setup("fit")
    root = Path(cfg.paths.output_root)
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "kd", root / "mlartifacts")
    trainers = Trainers(OmegaConf.to_container(cfg.trainer, resolve=True))
    teacher = teacher_step.obtain(cfg, trainers, Measurement(latency=False), data, lambda: MLP(10, (1, 8, 8), hidden=[8]), tracker,
                                  {"choices": {}, "tags": {}})  # fmt: skip
    assert MlflowClient(tracker.uri).get_run(teacher.run_id).info.run_name == "teacher MLP"

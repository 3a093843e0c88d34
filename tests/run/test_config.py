"""Config tests: every file of every group composes and instantiates; bad keys fail early."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import callbacks
from kd.run.config import check_keys as _check_keys

CONF = Path(__file__).resolve().parents[2] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_option_instantiates(make_cfg, option):
    cfg = make_cfg(f"data={option}")
    dm = instantiate(cfg.data)
    assert dm.num_classes in (10, 100)


@pytest.mark.parametrize("option", _options("distill"))
def test_every_distill_option_instantiates(make_cfg, option):
    objective = instantiate(make_cfg(f"distill={option}").distill)
    assert callable(objective) and isinstance(objective.needs_teacher, bool)


@pytest.mark.parametrize("option", _options("trainer"))
def test_every_trainer_option_has_only_real_trainer_arguments(make_cfg, option):
    cfg = make_cfg(f"trainer={option}")
    _check_keys(cfg.trainer)
    assert cfg.trainer.accelerator in ("cpu", "gpu")


def test_cpu_and_debug_trainers_instantiate(make_cfg):
    for option in ("cpu", "debug"):
        trainer = instantiate(make_cfg(f"trainer={option}").trainer, logger=False)
        assert trainer.max_epochs >= 1


@pytest.mark.parametrize("option", _options("callbacks"))
def test_every_callbacks_option_instantiates(make_cfg, option):
    cfg = make_cfg(f"callbacks={option}", fast=False)
    built = {name: instantiate(c) for name, c in cfg.callbacks.items() if c is not None}
    # each file is one named entry (named after itself); default.yaml gathers several
    assert option in built or (option == "default" and len(built) >= 2), built


@pytest.mark.parametrize("option", _options("teacher"))
def test_every_teacher_option_composes(make_cfg, option):
    cfg = make_cfg(f"teacher={option}", "teacher.checkpoint=/some/teacher.pt")
    optimizer = instantiate(cfg.teacher.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("option", _options("tracking"))
def test_every_tracking_option_composes(make_cfg, option, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = make_cfg(f"tracking={option}")
    assert cfg.tracking.experiment


def test_model_choice_reaches_teacher_and_student(make_cfg):
    cfg = make_cfg("model@teacher.model=lenet5", "model@student.model=mobilenet")
    assert cfg.teacher.model._target_ == "kd.models.LeNet5"
    assert cfg.student.model._target_ == "kd.models.MobileNetLite"


def test_temperature_and_alpha_live_only_in_distill(make_cfg):
    flat = OmegaConf.to_container(make_cfg(), resolve=False)
    text = OmegaConf.to_yaml(flat)
    assert text.count("temperature:") == 1 and text.count("alpha:") == 1
    assert "temperature" in flat["distill"] and "alpha" in flat["distill"]


def test_misspelled_trainer_key_is_named(make_cfg):
    cfg = make_cfg("+trainer.max_epoch=3")
    with pytest.raises(TypeError, match=r"max_epoch"):
        _check_keys(cfg.trainer)


def test_misspelled_distill_key_fails_at_instantiation(make_cfg):
    with pytest.raises(Exception, match="temprature"):
        instantiate(make_cfg("+distill.temprature=3").distill)


def test_unknown_group_option_lists_the_valid_ones(make_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="resnet32x4"):
        make_cfg("model@student.model=resnet33")


def test_callbacks_package_is_this_repositorys():
    # `callbacks` is a generic top-level name; make sure we import ours, not another package's
    assert Path(callbacks.__file__).resolve().parent == CONF.parent / "callbacks"


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_composes_and_is_a_global_delta_with_its_command(make_cfg, option):
    text = (CONF / "experiment" / f"{option}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"experiment={option}" in text
    cfg = make_cfg(f"experiment={option}", fast=False)
    instantiate(cfg.distill)
    assert cfg.teacher.model._target_.startswith("kd.models.")


def test_callbacks_combine_as_a_list_of_named_entries(make_cfg):
    cfg = make_cfg("callbacks=[checkpoint,progress]", fast=False)
    assert set(cfg.callbacks) == {"checkpoint", "progress"}


def test_disabling_the_progress_bar_drops_the_progress_callback(make_cfg):
    from pytorch_lightning.callbacks import ProgressBar

    from omegaconf import OmegaConf

    from kd.train.trainer import Trainers

    cfg = make_cfg("trainer.enable_progress_bar=false", fast=False)
    trainers = Trainers(OmegaConf.to_container(cfg.trainer, resolve=True), {k: instantiate(c) for k, c in cfg.callbacks.items()})
    assert any(isinstance(c, ProgressBar) for c in trainers.callbacks().values())  # the group holds one
    trainer = trainers.build(list(trainers.callbacks().values()), False, 1)
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)


@pytest.mark.parametrize("option", _options("prune"))
def test_every_prune_option_instantiates_and_fits_the_default_student(make_cfg, option):
    from kd.models import MLP

    cfg = make_cfg(f"prune={option}", "trainer.max_epochs=10")
    if option == "none":
        assert not cfg.prune  # no callback: the run has no pruning
        return
    pruner = instantiate(cfg.prune)
    assert isinstance(pruner, callbacks.PruningCallback)
    pruner.build_model = lambda: MLP(10, (1, 8, 8), hidden=[32])
    pruner.check_layers(MLP(10, (1, 8, 8), hidden=[32]), (1, 8, 8), cfg.trainer.max_epochs)


def test_the_slurm_launcher_composes_from_one_override():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240


@pytest.mark.parametrize("option", _options("quantize"))
def test_every_quantize_option_instantiates(make_cfg, option):
    cfg = make_cfg(f"quantize={option}")
    if option == "none":
        assert not cfg.quantize
        return
    quantizer = instantiate(cfg.quantize)
    assert isinstance(quantizer, callbacks.QuantizationCallback) and quantizer.recipe()["mode"] in ("static", "dynamic", "qat", "cluster", "binary", "log")


@pytest.mark.parametrize("option", _options("factorize"))
def test_every_factorize_option_instantiates(make_cfg, option):
    from kd.compression.factorize import LowRank

    cfg = make_cfg(f"factorize={option}")
    assert (not cfg.factorize) if option == "none" else isinstance(instantiate(cfg.factorize), LowRank)


def test_a_baseline_of_an_experiment_drops_its_compression_keys(make_cfg, caplog):
    from kd.run.experiment import _optional

    cfg = make_cfg("experiment=deep_compression_lenet300", "prune=none", "quantize=none")
    assert set(cfg.prune) >= {"amounts", "start"}  # the experiment's keys, without a _target_
    with caplog.at_level("WARNING"):
        assert _optional(cfg, "prune") is None and _optional(cfg, "quantize") is None
    assert "prune=none: ignoring prune.amounts" in caplog.text
    assert isinstance(_optional(make_cfg("experiment=deep_compression_lenet300"), "prune"), callbacks.MagnitudePruning)


def test_the_resolved_config_prints_without_running(run_py, tmp_path):
    """``--cfg job --resolve`` needs kd's resolvers (``${kd.epoch:...}``) before Hydra composes."""
    import subprocess

    done = subprocess.run(run_py("prune=agp", "--cfg", "job", "--resolve"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "start: 1\n" in done.stdout and "end: 1\n" in done.stdout  # 20% and 70% of FAST's 2 epochs, at least 1


def test_shared_prune_keys_live_in_one_base_file(make_cfg):
    keys = {p: set(make_cfg(f"prune={p}").prune) for p in ("magnitude", "agp", "iterative")}
    assert keys["magnitude"] == keys["agp"] == keys["iterative"]
    assert [make_cfg(f"prune={p}").prune.schedule for p in keys] == ["oneshot", "agp", "iterative"]

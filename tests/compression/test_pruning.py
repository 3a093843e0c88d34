"""Unstructured pruning: the schedules' arithmetic, exact final sparsity, scopes, layer
choice, bad input, checkpoint resume, sensitivity analysis, and the whole run in MLflow."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.nn.utils import prune

from callbacks import MagnitudePruning, SparsitySchedule, magnitude
from kd.compression import sensitivity
from kd.run.experiment import run
from kd.models import MLP
from tests.compression.pruning_helpers import KillAt, digits, module, trainer


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[64, 32])


# ---- schedules ---------------------------------------------------------------------------
def test_agp_follows_the_cubic_of_zhu_and_gupta():
    s = SparsitySchedule("agp", start=2, end=6, every=1, initial_sparsity=0.1)
    values = [s.sparsity_at(t, 0.9) for t in s.times()]
    expected = [0.9 + (0.1 - 0.9) * (1 - (t - 2) / 4) ** 3 for t in range(2, 7)]
    assert values == pytest.approx(expected)
    assert values[0] == pytest.approx(0.1) and values[-1] == 0.9
    assert s.sparsity_at(1, 0.9) is None and s.sparsity_at(7, 0.9) is None  # not events


def test_iterative_removes_the_same_fraction_of_what_remains_each_time():
    s = SparsitySchedule("iterative", start=1, end=9, every=2)
    values = [s.sparsity_at(t, 0.9) for t in s.times()]
    remaining = [1.0] + [1 - v for v in values]
    ratios = [b / a for a, b in zip(remaining, remaining[1:])]
    assert ratios == pytest.approx([ratios[0]] * 5) and values[-1] == 0.9


def test_a_schedule_always_ends_with_an_event_at_end():
    assert SparsitySchedule("agp", start=1, end=8, every=3).times() == [1, 4, 7, 8]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "cubic"}, "schedule must be one of"), ({"kind": "agp", "start": 5, "end": 2}, r"prune\.end >= prune\.start"),
     ({"unit": "batch"}, "unit must be one of"), ({"every": 0}, r"prune\.every must be an integer >= 1, got 0"), ({"start": -1}, r"prune\.start must be an integer >= 0, got -1"),
     ({"start": 1.5}, r"prune\.start must be an integer >= 0, got 1\.5"), ({"kind": "agp", "start": 0, "end": -1}, r"prune\.end must be an integer >= 0"),
     ({"initial_sparsity": 1.0}, r"prune\.initial_sparsity must lie in \[0, 1\), got 1\.0")],
)  # fmt: skip
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(**kwargs)


def test_torch_amounts_compound_but_ours_do_not():
    """The trap the callback avoids: two calls of amount=0.5 leave 75% pruned, not 50%."""
    layer = torch.nn.Linear(100, 10)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert float((layer.weight == 0).float().mean()) == pytest.approx(0.75)


# ---- magnitude pruning in training ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["oneshot", "agp", "iterative"])
def test_final_sparsity_equals_the_target_exactly_per_layer(kind):
    model = _mlp()
    cb = MagnitudePruning(0.9, schedule=kind, start=0, end=None if kind == "oneshot" else 2)
    trainer([cb], max_epochs=3).fit(module(model), datamodule=digits())
    for name, layer in [("layers.0", model.layers[0]), ("layers.2", model.layers[2]), ("head", model.head)]:
        assert int((layer.weight == 0).sum()) == round(0.9 * layer.weight.numel()), name
        assert int((layer.bias == 0).sum()) == 0, f"{name}: biases are not pruned by default"
    assert cb.at_target


def test_global_scope_hits_the_total_exactly_and_ranks_across_layers():
    model = _mlp()
    cb = MagnitudePruning(0.8, scope="global", start=1)
    trainer([cb], max_epochs=2).fit(module(model), datamodule=digits())
    weights = [model.layers[0].weight, model.layers[2].weight, model.head.weight]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * total)
    per_layer = {round(float((w == 0).float().mean()), 3) for w in weights}
    assert len(per_layer) > 1  # one global threshold: layers end at different sparsities


def test_skip_amounts_and_bias_options():
    model = _mlp()
    cb = MagnitudePruning(0.5, start=0, skip=["head"], amounts={"layers.2": 0.75}, include_bias=True)
    trainer([cb], max_epochs=1).fit(module(model), datamodule=digits())
    assert int((model.head.weight == 0).sum()) == 0
    assert int((model.layers[2].weight == 0).sum()) == round(0.75 * model.layers[2].weight.numel())
    assert int((model.layers[0].bias == 0).sum()) == round(0.5 * model.layers[0].bias.numel())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"prune.sparsity must be a fraction in \[0, 1\)"),
        ({"sparsity": -0.1}, r"prune.sparsity must be a fraction"),
        ({"sparsity": 0.5, "scope": "net"}, "prune.scope must be one of"),
        ({"sparsity": 0.5, "scope": "global", "amounts": {"head": 0.1}}, "needs prune.scope=layer"),
        ({"sparsity": 0.5, "max_drop": 0.01}, "set prune.sensitivity=true"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def test_unknown_layer_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"no prunable layer matches 'fc9'.*'layers.0', 'layers.2', 'head'"):
        MagnitudePruning(0.5, skip=["fc9"]).check_layers(_mlp(), (1, 8, 8))


def test_a_schedule_longer_than_training_fails_before_training():
    with pytest.raises(ValueError, match="never reach its final sparsity"):
        MagnitudePruning(0.5, schedule="agp", start=1, end=5).check_layers(_mlp(), (1, 8, 8), max_epochs=5)


def test_iterative_lowers_the_learning_rate_once():
    lit = module(_mlp(), lr=0.1)
    cb = MagnitudePruning(0.5, schedule="iterative", start=1, end=2, lr_scale=0.1)
    trainer([cb], max_epochs=3).fit(lit, datamodule=digits())
    assert lit.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_masks_and_schedule_survive_a_checkpoint_resume(tmp_path):
    """Interrupted after epoch 2 of an AGP schedule and resumed: the same final masks."""

    def fit(root: Path, ckpt: str | None = None, kill: bool = False):
        pl.seed_everything(0, verbose=False)
        lit = module(_mlp(), lr=0.05)
        save = ModelCheckpoint(dirpath=root, save_last=True)
        cb = MagnitudePruning(0.9, schedule="agp", start=0, end=3)
        extra = [KillAt(2)] if kill else []
        trainer([cb, save, *extra], 5, enable_checkpointing=True).fit(lit, datamodule=digits(), ckpt_path=ckpt)
        return lit, cb

    full, _ = fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "cut", kill=True)  # killed at the start of epoch 2; last.ckpt is epoch 1's
    resumed, cb = fit(tmp_path / "cut", ckpt=str(tmp_path / "cut" / "last.ckpt"))
    assert cb._done == [0, 1, 2, 3]
    for (name, a), b in zip(full.model.named_buffers(), resumed.model.buffers()):
        if name.endswith("weight_mask"):
            assert torch.equal(a, b), name
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))


# ---- sensitivity ---------------------------------------------------------------------------
def test_pick_amounts_takes_the_highest_level_within_the_drop_and_stops_at_the_first_breach():
    rows = [{"layer": "a", "sparsity": s, "accuracy": acc} for s, acc in [(0.0, 0.9), (0.5, 0.895), (0.8, 0.85), (0.9, 0.89)]]
    rows += [{"layer": "b", "sparsity": s, "accuracy": acc} for s, acc in [(0.0, 0.9), (0.5, 0.8)]]
    assert sensitivity.pick_amounts(rows, max_drop=0.01) == {"a": 0.5, "b": 0.0}


def test_sensitivity_analysis_writes_a_table_and_a_plot_and_can_pick_amounts(tmp_path):
    model = _mlp()
    cb = MagnitudePruning(0.5, start=1, sensitivity=True, sensitivity_levels=[0.0, 0.5, 0.95], max_drop=0.02)
    trainer([cb], max_epochs=2, root=tmp_path).fit(module(model), datamodule=digits())
    table, png = cb.artifacts(tmp_path)
    lines = table.read_text().splitlines()
    assert lines[0] == "layer,sparsity,accuracy" and len(lines) == 1 + 3 * 3
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    accuracy = {(r.split(",")[0], float(r.split(",")[1])): float(r.split(",")[2]) for r in lines[1:]}
    assert accuracy[("layers.0", 0.95)] < accuracy[("layers.0", 0.0)]  # pruning a layer hard costs accuracy
    for name, layer in [("layers.0", model.layers[0]), ("head", model.head)]:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(cb._picked[name], abs=1e-3)


# ---- the whole run ---------------------------------------------------------------------------
def _runs(cfg):
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kd.role") == "student"]


def test_a_pruned_run_logs_sparsity_per_epoch_selects_at_target_and_saves_a_plain_model(make_cfg):
    cfg = make_cfg("distill=none", "prune=agp", "prune.sparsity=0.8", "prune.start=0", "prune.end=2", "trainer.max_epochs=4")
    metrics = run(cfg)
    client, (student,) = _runs(cfg)
    assert student.info.status == "FINISHED"
    history = client.get_metric_history(student.info.run_id, "model/sparsity")
    assert len(history) == 4 and history[-1].value == pytest.approx(0.8, abs=1e-3)
    assert [h.value for h in history] == sorted(h.value for h in history)  # only ever grows
    assert len(client.get_metric_history(student.info.run_id, "model/sparsity/layers.0")) == 4
    for key in ("model/size_bytes_zip", "model/size_bytes_sparse", "dense/params", "prune/nonzero_reduction"):
        assert key in student.data.metrics, key
    assert metrics["model/size_bytes_sparse"] < metrics["model/size_bytes"]
    assert metrics["prune/nonzero_reduction"] > 1.0
    best = next(Path(cfg.paths.run_dir, "checkpoints").glob("best-epoch*.ckpt"))
    assert int(best.stem.removeprefix("best-epoch")) >= 2  # the selected epoch is at the final sparsity
    state = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)  # masks folded into plain weights
    MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[32]).load_state_dict(state)


def test_a_crash_mid_pruning_fails_the_run_and_writes_no_model(make_cfg, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("pruning exploded")

    monkeypatch.setattr(magnitude, "_keep_largest", boom)
    cfg = make_cfg("distill=none", "prune=magnitude", "prune.start=1")
    with pytest.raises(RuntimeError, match="pruning exploded"):
        run(cfg)
    _, (student,) = _runs(cfg)
    assert student.info.status == "FAILED" and "pruning exploded" in student.data.tags["kd.failure"]
    assert not (Path(cfg.paths.run_dir) / "student.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [("prune.sparsity=1.5", "prune.sparsity must be a fraction"), ("prune.skip=[fc7]", "no prunable layer matches 'fc7'"),
     ("prune.start=2", "never reach its final sparsity")],
)  # fmt: skip
def test_bad_pruning_config_fails_before_anything_is_written(make_cfg, override, message):
    cfg = make_cfg("distill=none", "prune=magnitude", override)
    with pytest.raises(Exception, match=message):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()


def test_run_name_says_per_layer_when_amounts_override_the_sparsity():
    assert MagnitudePruning(0.5, schedule="iterative", start=1, end=3).describe() == "prune iterative s=0.5"
    assert MagnitudePruning(0.5, schedule="iterative", start=1, end=3, amounts={"fc1": 0.9}).describe() == "prune iterative s=per-layer"


def test_one_run_distils_and_prunes(make_cfg):
    cfg = make_cfg("prune=agp", "prune.sparsity=0.7", "prune.start=0", "prune.end=1", "trainer.max_epochs=3")
    metrics = run(cfg)
    client, (student,) = _runs(cfg)
    assert student.data.tags["kd.compression"] == "prune agp s=0.7" and student.data.tags["kd.objective"].startswith("kd")
    assert len(client.get_metric_history(student.info.run_id, "train/loss_kd")) == 3
    assert client.get_metric_history(student.info.run_id, "model/sparsity")[-1].value == pytest.approx(0.7, abs=1e-3)
    assert metrics["teacher/test_acc"] > 0.5 and metrics["model/nonzero_params"] < 0.5 * metrics["model/params"]


def test_schedule_defaults_boundaries_and_labels():
    assert SparsitySchedule("agp", end=3).times() == [0, 1, 2, 3]  # defaults: start 0, every 1
    assert SparsitySchedule("agp", start=2, end=2).times() == [2]  # end == start: one event
    assert SparsitySchedule("agp", end=2, initial_sparsity=0.999).initial_sparsity == 0.999
    with pytest.raises(ValueError, match=r"initial_sparsity must lie in \[0, 1\), got 1.0"):
        SparsitySchedule("agp", end=2, initial_sparsity=1.0)
    assert SparsitySchedule("oneshot", start=2).describe() == "oneshot@epoch2"
    assert SparsitySchedule("agp", start=1, end=5, every=2, unit="step").describe() == "agp steps 1..5/2"


def test_a_2_4_run_keeps_the_pattern_in_the_saved_student_and_says_only_the_mask_is_applied(make_cfg):
    from callbacks.nm import check_pattern
    from kd.models import MLP

    cfg = make_cfg("distill=none", "prune=nm", "prune.start=1", "trainer.max_epochs=3")
    run(cfg)
    client, (r,) = _runs(cfg)
    assert client.get_metric_history(r.info.run_id, "model/sparsity")[-1].value == pytest.approx(0.5)  # of the pruned weights
    student = MLP(num_classes=10, input_shape=(1, 8, 8), hidden=list(cfg.student.model.hidden))
    student.load_state_dict(torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True))
    for layer in (m for m in student.modules() if isinstance(m, torch.nn.Linear)):
        assert check_pattern(layer.weight, 2, 4) == 2
    assert r.data.tags["kd.nm_kernels"].startswith("2:4 pattern verified on every pruned tensor; CPU: only the mask is applied")
    assert r.data.tags["kd.compression"] == "prune 2:4"

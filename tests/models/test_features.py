"""Feature distillation wiring: hooks from layer pairs, no activations kept across steps,
regressors trained but never part of the student, the two FitNets stages."""

import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from kd.run.experiment import run
from kd.models.features import FeatureHooks
from kd.losses import AttentionTransfer, CrossEntropy, Hints, SoftTargetKD
from kd.models import MLP, CIFARResNet
from kd.train.modules import DistillationModule

SHAPE = (1, 8, 8)


def _resnets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = CIFARResNet(num_classes=10, input_shape=SHAPE, depth=8, width=[8, 16, 32])
    teacher = CIFARResNet(num_classes=10, input_shape=SHAPE, depth=14, width=[16, 32, 64])
    return student, teacher


def _module(objective) -> DistillationModule:
    student, teacher = _resnets()
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    return DistillationModule(student, teacher, 10, sgd, objective, input_shape=SHAPE)


def _batch(n: int = 4):
    return torch.randn(n, *SHAPE), torch.randint(0, 10, (n,)), torch.arange(n)


def _at(*layers: str) -> AttentionTransfer:
    return AttentionTransfer(pairs=[{"student": name, "teacher": name} for name in layers])


def test_unknown_layer_names_fail_listing_the_valid_ones():
    student, _ = _resnets()
    with pytest.raises(ValueError, match=r"unknown student layer name\(s\) \['layer9'\].*valid names: conv1, bn1"):
        FeatureHooks(student, ["layer9"], "student")


def test_hooks_record_only_inside_capture_and_are_released():
    student, _ = _resnets()
    hooks = FeatureHooks(student, ["layer1", "layer3"])
    student(torch.randn(2, *SHAPE))  # outside capture: nothing kept
    with hooks.capture() as feats:
        student(torch.randn(2, *SHAPE))
    assert set(feats) == {"layer1", "layer3"} and feats["layer3"].shape == (2, 32, 2, 2)
    hooks.remove()
    assert hooks.attached == 0 and not student.layer1._forward_hooks


def test_attention_between_a_map_and_a_vector_is_refused_before_training():
    torch.manual_seed(0)
    mlp = MLP(num_classes=10, input_shape=SHAPE, hidden=[16])
    student, _ = _resnets()
    at = AttentionTransfer(pairs=[{"student": "layer1", "teacher": "layers.1"}])
    with pytest.raises(ValueError, match=r"Pick layers of the same kind.*student layer1: \(8, 8, 8\)"):
        DistillationModule(student, mlp, 10, None, CrossEntropy({"at": at}), SHAPE)


def test_attention_between_vectors_is_over_units():
    # kd's extension for MLPs: a (B, D) layer is one channel over D positions, pooled to the smaller D
    torch.manual_seed(0)
    student, teacher = MLP(10, SHAPE, hidden=[4]), MLP(10, SHAPE, hidden=[8])
    objective = CrossEntropy({"at": AttentionTransfer(pairs=[{"student": "layers.1", "teacher": "layers.1"}])})
    module = DistillationModule(student, teacher, 10, None, objective, SHAPE)
    x = torch.randn(3, *SHAPE)
    with module.student_hooks.capture() as s, module.teacher_hooks.capture() as t:
        student(x), teacher(x)
    q_s = F.normalize(s["layers.1"].pow(2), dim=1)  # (3, 4)
    q_t = F.normalize(t["layers.1"].pow(2).reshape(3, 4, 2).mean(2), dim=1)  # 8 units averaged in pairs -> 4
    terms = objective(student(x), torch.zeros(3, dtype=torch.long), None, s, t)
    assert terms["loss_at"].item() == pytest.approx((q_s - q_t).pow(2).mean().item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["loss_ce"].item() + 500.0 * terms["loss_at"].item(), rel=1e-5)


def test_kd_at_step_logs_each_term_and_keeps_no_activation_alive():
    module = _module(SoftTargetKD(4.0, 0.9, features={"at": _at("layer1", "layer2", "layer3")}))
    kept = []
    module.model.layer2.register_forward_hook(lambda m, i, out: kept.append(weakref.ref(out)))
    module.teacher.layer2.register_forward_hook(lambda m, i, out: kept.append(weakref.ref(out)))
    for _ in range(5):
        x, y, index = _batch()
        _, terms = module.compute_terms(x, y, index)
        assert set(terms) == {"loss", "loss_kd", "loss_ce", "loss_at"}
        terms["loss"].backward()
        del terms
    assert kept and all(ref() is None for ref in kept)  # nothing captured outlives its step
    assert all(p.grad is None for p in module.teacher.parameters())


def test_hint_regressor_trains_but_is_not_part_of_the_student():
    hint = Hints(pairs=[{"student": "layer2", "teacher": "layer2"}], weight=1.0)
    module = _module(CrossEntropy({"hint": hint}))
    regressor = list(hint.regressors.parameters())
    assert regressor, "the regressor is built from the probed shapes at construction"
    optimised = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert {id(p) for p in regressor} <= optimised
    assert not any(k.startswith("objective") for k in module.model.state_dict())
    x, y, index = _batch()
    module.compute_terms(x, y, index)[1]["loss"].backward()
    assert all(p.grad is not None for p in regressor)


def test_two_stage_fitnets_trains_up_to_the_guided_layer_then_the_whole_student():
    hint = Hints(pairs=[{"student": "layer2", "teacher": "layer2"}], stage="two", stage1_epochs=2)
    objective = SoftTargetKD(4.0, 0.9, alpha_end=0.1, features={"hint": hint})
    module = _module(objective)
    x, y, index = _batch()

    objective.start_epoch(0, max_epochs=5)
    _, terms = module.compute_terms(x, y, index)
    assert set(terms) == {"loss", "loss_hint", "stage"} and terms["stage"].item() == 1
    terms["loss"].backward()
    assert module.model.layer1[0].conv1.weight.grad is not None
    assert module.model.layer3[0].conv1.weight.grad is None and module.model.fc.weight.grad is None

    module.zero_grad()
    objective.start_epoch(2, max_epochs=5)
    _, terms = module.compute_terms(x, y, index)
    assert "loss_hint" not in terms and terms["stage"].item() == 2 and "loss_kd" in terms
    assert objective.current_alpha() == pytest.approx(0.9)
    objective.start_epoch(4, max_epochs=5)
    assert objective.current_alpha() == pytest.approx(0.1)  # annealed linearly over stage 2


def test_feature_terms_turn_the_teacher_logit_cache_off():
    with pytest.raises(ValueError, match="cannot be cached"):
        student, teacher = _resnets()
        DistillationModule(student, teacher, 10, None, CrossEntropy({"at": _at("layer1")}), SHAPE,
                           teacher_inputs=torch.zeros(3, *SHAPE))  # fmt: skip


@pytest.mark.parametrize("distill", ["at", "kd_at", "fitnets", "kd_fitnets"])
def test_feature_distillation_runs_end_to_end(make_cfg, distill):
    cfg = make_cfg(
        f"distill={distill}", "model@teacher.model=resnet8", "model@student.model=resnet8",
        "trainer.max_epochs=1", "teacher.max_epochs=1",
    )  # fmt: skip
    metrics = run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs(["1"]) if r.data.tags["kd.role"] == "student"]
    term = "train/loss_at" if "at" in distill else "train/loss_hint"
    assert term in student.data.metrics and student.data.tags["kd.teacher_logits"] == "online"
    assert metrics["model/params"] == sum(p.numel() for p in CIFARResNet(10, SHAPE, depth=8).parameters())

"""The objective protocol: declared needs, the models' declared feature stages, checks before any
training, a method's own parameters (optimiser and checkpoint, never student.pt), combined terms,
and a toy method added by the recipe of docs/distillation.md (one file, one yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from kd.run.experiment import run
from kd.models.features import FeatureHooks, feature_info
from kd.losses import AttentionTransfer, CrossEntropy, DistillationObjective, Hints, Objective, SoftTarget, SoftTargetKD
from kd.models import MLP, CIFARResNet, LeNet5, MobileNetLite, WideResNet
from kd.train.modules import DistillationModule

SHAPE = (3, 8, 8)
MODELS = {
    "mlp": lambda: MLP(10, SHAPE, hidden=[12, 6]),
    "lenet5": lambda: LeNet5(10, SHAPE),
    "resnet8": lambda: CIFARResNet(10, SHAPE, depth=8, width=[4, 8, 16]),
    "wrn_16_1": lambda: WideResNet(10, SHAPE, depth=16, widen_factor=1),
    "mobilenet": lambda: MobileNetLite(10, SHAPE, blocks=[[8, 1], [16, 2], [16, 1]], stem=4),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_declares_stages_whose_shapes_and_activations_hold(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    info = feature_info(model)
    assert info is not None and info.stages
    specs = [s.post for s in info.stages] + [s.pre for s in info.stages] + [info.embedding]
    hooks = FeatureHooks(model, specs)
    x = torch.randn(4, *SHAPE)
    with hooks.capture() as found:
        logits = model(x)
    for stage in info.stages:
        post, pre = found[stage.post], found[stage.pre]
        assert post.shape[1] == stage.channels, stage
        if post.dim() == 4:  # (B, C, H, W): the declared reduction of the input's 8x8
            assert post.shape[-1] == SHAPE[-1] // stage.reduction, stage
        assert (post >= 0).all(), f"{stage.post} is not post-activation"
        if stage.pre != stage.post:
            assert (pre < 0).any(), f"{stage.pre} is not pre-activation"
    emb = found[info.embedding]
    assert emb.shape == (4, info.embedding_dim)
    head = dict(model.named_modules())[info.embedding.split(":")[0]]
    assert torch.allclose(head(emb), logits, atol=1e-6)  # the embedding is what the classifier reads


def test_resnet_stage_output_is_the_relu_of_its_declared_pre_activation():
    torch.manual_seed(0)
    model = MODELS["resnet8"]().eval()
    stage = feature_info(model).stages[1]
    hooks = FeatureHooks(model, [stage.post, stage.pre])
    with hooks.capture() as found:
        model(torch.randn(2, *SHAPE))
    assert torch.equal(found[stage.post], F.relu(found[stage.pre]))  # captured before the in-place ReLU


def test_default_pairs_come_from_the_declared_stages():
    student, teacher = MODELS["resnet8"](), CIFARResNet(10, SHAPE, depth=14)
    objective = SoftTargetKD(terms={"at": AttentionTransfer(), "hint": Hints()})
    objective.prepare(student, teacher, SHAPE, 10, 50)
    at, hint = objective.terms["at"], objective.terms["hint"]
    assert [(p.student, p.teacher) for p in at.pairs] == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert [(p.student, p.teacher) for p in hint.pairs] == [("layer2", "layer2")]  # FitNets' middle layers
    # MLP (2 stages) -> ResNet (3 stages): the deepest two are paired
    objective = CrossEntropy({"at": AttentionTransfer()})
    with pytest.raises(ValueError, match="two .C, H, W. feature maps or two .D,. vectors"):
        objective.prepare(MODELS["mlp"](), teacher, SHAPE, 10, 50)


def test_a_wrong_layer_fails_naming_the_valid_layers_and_stages():
    objective = CrossEntropy({"at": AttentionTransfer(pairs=[{"student": "nope", "teacher": "layer1"}])})
    with pytest.raises(ValueError, match=r"unknown student layer name\(s\) \['nope'\].*feature stages: layer1 \(post layer1"):
        objective.prepare(MODELS["resnet8"](), MODELS["resnet8"](), SHAPE, 10, 50)


def test_objective_declares_its_needs():
    assert isinstance(SoftTargetKD(), DistillationObjective)
    none, kd, at = CrossEntropy(), SoftTargetKD(), CrossEntropy({"at": AttentionTransfer()})
    assert (none.needs_teacher, kd.needs_teacher, at.needs_teacher) == (False, True, True)
    assert (kd.needs_teacher_logits, kd.needs_features, at.needs_teacher_logits, at.needs_features) == (True, False, False, True)
    assert not kd.needs_indices


def test_combined_terms_are_weighted_and_logged_each():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    objective = Objective(ce_weight=0.5, terms={"kd": SoftTarget(4.0, weight=2.0), "kd2": SoftTarget(1.0, weight=0.25)})
    terms = objective(zs, y, zt)
    ce = F.cross_entropy(zs, y)
    kd4 = 16 * F.kl_div(F.log_softmax(zs / 4, 1), F.softmax(zt / 4, 1), reduction="batchmean")
    kd1 = F.kl_div(F.log_softmax(zs, 1), F.softmax(zt, 1), reduction="batchmean")
    assert terms["loss_kd"].item() == pytest.approx(kd4.item(), rel=1e-5)
    assert terms["loss_kd2"].item() == pytest.approx(kd1.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((0.5 * ce + 2.0 * kd4 + 0.25 * kd1).item(), rel=1e-5)


def test_logit_standardize_z_scores_logit_terms_and_leaves_ce_raw():
    torch.manual_seed(0)
    zt = torch.randn(4, 6)
    zs = 3.0 * zt + 1.5  # an affine map of the teacher's logits: a perfect match once standardised
    y = torch.randint(0, 6, (4,))
    plain = SoftTargetKD(2.0, 0.5)(zs, y, zt)
    standardized = SoftTargetKD(2.0, 0.5, logit_standardize=True)(zs, y, zt)
    assert plain["loss_kd"].item() > 0.1 and standardized["loss_kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert standardized["loss_ce"].item() == pytest.approx(F.cross_entropy(zs, y).item())
    assert SoftTargetKD(logit_standardize=True).describe().endswith(" ls")


@pytest.mark.parametrize("method", ["kd", "kd_at", "kd_fitnets", "dkd", "dist", "ctkd", "mlkd"])
def test_logit_standardize_is_one_switch_on_every_logit_objective(make_cfg, method):
    objective = instantiate(make_cfg(f"distill={method}", "distill.logit_standardize=true").distill)
    assert objective.logit_standardize and any(t.logit_based for t in objective.terms.values())


def test_a_methods_parameters_train_are_checkpointed_and_never_saved_with_the_student(tmp_path):
    torch.manual_seed(0)
    student, teacher = MODELS["resnet8"](), CIFARResNet(10, SHAPE, depth=8, width=[8, 16, 32])
    module = DistillationModule(student, teacher, 10, lambda p: torch.optim.SGD(p, lr=0.1), CrossEntropy({"hint": Hints()}), SHAPE)
    own = list(module.objective.parameters())
    assert own and all(any(p is q for q in module.trainable_parameters()) for p in own)
    assert any(k.startswith("objective.terms.hint.regressors") for k in module.state_dict())  # Lightning's checkpoint
    assert not any("regressor" in k for k in student.state_dict())  # student.pt holds the student alone
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_pretraining_stage_runs_the_staged_term_alone_and_marks_the_stage():
    torch.manual_seed(0)
    objective = CrossEntropy({"hint": Hints(pairs=[{"student": "s", "teacher": "t"}], stage="two", stage1_epochs=2)})
    from kd.losses import BindContext

    objective.bind(BindContext(10, 20, {"s": torch.Size([4])}, {"t": torch.Size([4])}))
    zs, y = torch.randn(3, 10), torch.randint(0, 10, (3,))
    feats_s, feats_t = {"s": torch.randn(3, 4)}, {"t": torch.randn(3, 4)}
    objective.start_epoch(1, 5)
    stage1 = objective(zs, y, None, feats_s, feats_t)
    assert stage1["stage"].item() == 1 and set(stage1) == {"loss", "loss_hint", "stage"}
    assert stage1["loss"].item() == pytest.approx(stage1["loss_hint"].item())
    objective.start_epoch(2, 5)
    stage2 = objective(zs, y, None, feats_s, feats_t)
    assert stage2["stage"].item() == 2 and "loss_hint" not in stage2
    assert stage2["loss"].item() == pytest.approx(F.cross_entropy(zs, y).item())


def test_bad_objective_values_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"distill.ce_weight must be a finite number >= 0, got -1"):
        Objective(ce_weight=-1)
    with pytest.raises(ValueError, match=r"weight must be a number >= 0"):
        SoftTarget(4.0, weight=-0.5)
    with pytest.raises(ValueError, match=r"distill.logit_standardize must be true or false"):
        Objective(logit_standardize="yes")
    with pytest.raises(TypeError, match=r"distill.terms.x must build a kd.losses Term"):
        Objective(terms={"x": torch.nn.Linear(2, 2)})


def test_unknown_layer_fails_before_the_teacher_trains(make_cfg):
    cfg = make_cfg("distill=at", "distill.terms.at.pairs=[{student: nope, teacher: layers.1}]")
    with pytest.raises(ValueError, match=r"unknown student layer name\(s\) \['nope'\]"):
        run(cfg)
    assert not (Path(cfg.paths.output_root) / "teachers").exists()  # nothing trained, nothing cached
    assert not (Path(cfg.paths.output_root) / "mlflow.db").exists()  # no MLflow run opened


TOY_TERM = '''
"""A toy method: the squared distance between the student's and the teacher's mean logit."""
import torch
from kd.losses import Term, TermInputs


class MeanLogitGap(Term):
    name = "toy"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, weight: float = 1.0, power: float = 2.0) -> None:
        super().__init__(weight)
        if not power > 0:
            raise ValueError(f"distill.terms.toy.power must be > 0, got {power!r}")
        self.power = power

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        gap = inputs.student_logits.mean() - inputs.teacher_logits.detach().mean()
        return gap.abs().pow(self.power)
'''

TOY_YAML = """_target_: kd.losses.Objective
ce_weight: 1.0
terms:
  toy:
    _target_: toy_term.MeanLogitGap
    weight: 0.5
    power: 2.0
"""


def test_a_toy_method_added_by_the_recipe_runs_end_to_end(make_cfg, tmp_path, monkeypatch):
    # the recipe: one file (the term) and one yaml in conf/distill/ -- here on Hydra's search path
    (tmp_path / "toy_term.py").write_text(TOY_TERM)
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "distill=toy", "trainer.max_epochs=1")
    assert isinstance(instantiate(cfg.distill).terms["toy"], sys.modules["toy_term"].MeanLogitGap)
    run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = [r for r in client.search_runs(["0", "1"]) if r.data.tags.get("kd.role") == "student"] or [None]
    assert student is not None and student.info.status == "FINISHED"
    assert {"train/loss_toy", "train/loss_ce"} <= set(student.data.metrics)
    assert student.data.tags["kd.objective"] == "ce+toy"

"""Every method of the zoo end to end: ``distill=<method>`` with the default models (MLPs) on
digits, two short epochs, its terms landing in MLflow; its own parameters never in student.pt;
and bad values refused before anything trains, with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from kd.run.experiment import run

CONF = Path(__file__).resolve().parents[2] / "conf"
METHODS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if p.stem != "none")
# digits has ~1,100 training images: CRD's CIFAR default of 16,384 negatives is refused (tested below)
SMALL = {"crd": ["distill.terms.crd.nce_k=64"], "kd_crd": ["distill.terms.crd.nce_k=64"]}
# stages that last longer than these runs start after one epoch, so both stages run
STAGED = {"ft": ["distill.terms.ft.paraphraser_epochs=1"], "ab": ["distill.terms.ab.init_epochs=1"],
          "fsp": ["distill.terms.fsp.init_epochs=1", "model@student.model=mlp"]}  # FSP: equal widths, two stages


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teachers")  # one teacher for every method: the same recipe


def _student(cfg):
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"{cfg.tracking.experiment}-debug")  # limit_train_batches: a smoke test
    (student,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kd.role") == "student"]
    return client, student


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_logs_its_terms(make_cfg, teachers, method):
    cfg = make_cfg(f"distill={method}", f"paths.teacher_cache={teachers}", "+trainer.limit_train_batches=4",
                   *SMALL.get(method, []), *STAGED.get(method, []))  # fmt: skip
    terms = list(instantiate(cfg.distill).terms)
    metrics = run(cfg)
    client, student = _student(cfg)
    assert student.info.status == "FINISHED"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["teacher/test_acc"] > 0.3  # tested (8 steps: no accuracy bar)
    for name in terms:
        history = client.get_metric_history(student.info.run_id, f"train/loss_{name}")
        assert history and all(torch.isfinite(torch.tensor(m.value)) for m in history), name
    path = client.download_artifacts(student.info.run_id, "student.pt")
    model = instantiate(cfg.student.model)(num_classes=10, input_shape=(1, 8, 8))
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: the student alone, no term's parameters


BAD = [
    ("distill=dkd", "distill.terms.dkd.beta=-1", "beta"),
    ("distill=dkd", "distill.terms.dkd.temperature=0", "temperature"),
    ("distill=kd", "distill.temperature=-2", "distill.temperature"),
    ("distill=dist", "distill.terms.dist.gamma=-1", "gamma"),
    ("distill=ctkd", "distill.terms.ctkd.weight=-1", "weight"),
    ("distill=mlkd", "distill.terms.mlkd.temperatures=[]", "temperatures"),
    ("distill=crd", "distill.terms.crd.nce_k=100000", "nce_k"),
    ("distill=rkd", "distill.terms.rkd.distance_weight=-1", "distance_weight"),
    ("distill=at", "distill.terms.at.pairs=[{student: nope, teacher: layers.1}]", "unknown student layer"),
    ("distill=fitnets", "distill.terms.hint.pairs=[{student: layers.1, teacher: nope}]", "unknown teacher layer"),
    ("distill=ab", "distill.terms.ab.margin=-1", "margin"),
    ("distill=vid", "distill.terms.vid.weight=-0.5", "weight"),
    ("distill=dkd", "distill.ce_weight=-1", "distill.ce_weight"),
]


@pytest.mark.parametrize(("method", "override", "words"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_are_refused_before_anything_trains(make_cfg, method, override, words):
    """Refused at instantiation or in ``Objective.prepare`` (one dummy batch), before any run opens."""
    cfg = make_cfg(method, override)
    with pytest.raises(Exception) as err:
        run(cfg)
    assert words in str(err.value) or words in str(err.value.__cause__), str(err.value)
    assert not (Path(cfg.paths.output_root) / "teachers").exists()  # no teacher trained
    assert not (Path(cfg.paths.output_root) / "mlflow.db").exists()  # no MLflow run opened

"""Every pair of compression stages the combination table (callbacks/stage.py, REFUSED) says
works runs end to end on digits; every pair it refuses fails before anything is written; and the
table in docs/compression.md is the one the code enforces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from callbacks.stage import BEFORE_TRAINING, PAIRS, REFUSED, combination_table
from kd.run.experiment import run

ROOT = Path(__file__).resolve().parents[2]
STAGE = {  # each kind as a short run configures it (4 epochs)
    "magnitude": ["prune=magnitude", "prune.start=1"],
    "structured": ["prune=structured", "prune.start=1", "prune.sparsity=0.25"],
    "lottery": ["prune=lottery", "prune.sparsity=0.36", "prune.rate=0.2"],  # two rounds of two epochs
    "svd": ["factorize=svd", "factorize.finetune_epochs=1"],
    "svd@start": ["factorize=svd", "factorize.at=start", "factorize.energy=0.7"],  # the trained student's factors train on
    "ptq": ["quantize=ptq", "quantize.calibration_batches=2"],
    "dynamic": ["quantize=dynamic"],
    "qat": ["quantize=qat"],
    "cluster": ["quantize=cluster", "quantize.start=3"],
    "binary": ["quantize=binary", "quantize.start=3"],
    "log": ["quantize=log", "quantize.start=3"],
}
WORKS = [p for p in PAIRS if p not in REFUSED]
BASE = ["distill=none", "model@student.model=lenet5", "trainer.max_epochs=4"]


@pytest.fixture(scope="module")
def trained_lenet5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained student.pt (LeNet-5, 4 epochs): factorize.at=start factorises a trained model."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, FAST

    out = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, *BASE, f"paths.output_root={out / 'outputs'}", f"paths.run_dir={out / 'run'}"])
    run(cfg)
    return out / "run" / "student.pt"


@pytest.mark.parametrize(("earlier", "later"), WORKS, ids=[f"{a}+{b}" for a, b in WORKS])
def test_a_pair_the_table_allows_runs_end_to_end(make_cfg, request, earlier, later):
    start = [f"student.init_checkpoint={request.getfixturevalue('trained_lenet5')}"] if earlier in BEFORE_TRAINING else []
    cfg = make_cfg(*BASE, *STAGE[earlier], *STAGE[later], *start)
    metrics = run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert student.info.status == "FINISHED"
    assert len(student.data.tags["kd.compression"].split(" + ")) == 2  # both stages ran and are named
    assert metrics["test/acc"] > 0.2 and "model/params" in metrics  # chance is 0.1; 4 epochs of a small LeNet-5
    if later in ("ptq", "dynamic", "qat"):
        assert metrics["quant/size_reduction"] > 1.5 and (Path(cfg.paths.run_dir) / "student_int8.pt").is_file()
    if earlier in ("magnitude", "lottery"):
        assert metrics["model/nonzero_params"] < 0.9 * metrics["dense/params"]  # the zeros survive the later stage
    if earlier in ("structured", "svd@start"):
        assert metrics["model/params"] < metrics["dense/params"]  # the thinned (or factorised) model went on


REFUSALS = sorted(p for p in REFUSED if p in PAIRS)


@pytest.mark.parametrize(("earlier", "later"), REFUSALS, ids=[f"{a}+{b}" for a, b in REFUSALS])
def test_a_pair_the_table_refuses_fails_before_anything_is_written(make_cfg, earlier, later):
    cfg = make_cfg(*BASE, *STAGE[earlier], *STAGE[later])
    with pytest.raises(ValueError, match="is not supported"):
        run(cfg)
    assert not Path(cfg.paths.output_root).exists()


def test_the_docs_show_the_table_the_code_enforces():
    assert combination_table() in (ROOT / "docs" / "compression.md").read_text()


TOY_STAGE = '''
"""A toy stage: after training, round every weight to a grid of `step` (quantize group)."""
import torch
from torch import nn

from callbacks.stage import StageContext, StageResult


class WeightRounding:
    group = "quantize"
    kind = "rounding"
    prepares_graph = False

    def __init__(self, step: float = 0.01) -> None:
        if not step > 0:
            raise ValueError(f"quantize.step must be > 0, got {step!r}")
        self.step = step

    def describe(self) -> str:
        return f"rounding {self.step:g}"

    def check(self, model: nn.Module, context: StageContext) -> None:
        pass

    def prepare(self, model: nn.Module, context: StageContext) -> nn.Module:
        return model

    def callbacks(self) -> list:
        return []

    def selectable(self, epoch: int) -> bool:
        return True

    @torch.no_grad()
    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        for p in model.parameters():
            p.copy_(torch.round(p / self.step) * self.step)
        distinct = max(int(torch.unique(p).numel()) for p in model.parameters())
        return StageResult(model, {"quant/max_distinct_weights": float(distinct)}, test_acc=context.test_accuracy(model))
'''


def test_a_toy_stage_added_by_the_recipe_runs_end_to_end(make_cfg, tmp_path, monkeypatch):
    (tmp_path / "toy_stage.py").write_text(TOY_STAGE)
    (tmp_path / "conf" / "quantize").mkdir(parents=True)
    (tmp_path / "conf" / "quantize" / "rounding.yaml").write_text("_target_: toy_stage.WeightRounding\nstep: 0.05\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "quantize=rounding", "prune=magnitude", "prune.start=1")
    metrics = run(cfg)
    state = torch.load(Path(cfg.paths.run_dir) / "student.pt", weights_only=True)
    for name, w in state.items():  # the saved student is the rounded one: every weight on the 0.05 grid
        assert torch.allclose(w / 0.05, torch.round(w / 0.05), atol=1e-3), name
    assert metrics["quant/max_distinct_weights"] >= 2
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    student = [r for r in client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
               if r.data.tags.get("kd.role") == "student"][0]  # fmt: skip
    assert student.data.tags["kd.compression"] == "prune magnitude s=0.5 + rounding 0.05"
    assert student.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])

"""Lottery tickets: round arithmetic, rewinding to the initial (or iteration-k) weights, the
random-reinit control with the ticket's masks, and per-round tracking in MLflow."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from callbacks import LotteryTicket
from kd.run.experiment import run
from kd.models import MLP
from tests.compression.pruning_helpers import digits, module, trainer


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[64, 32])


def test_rounds_reach_the_target_exactly_and_the_output_layer_prunes_at_half_rate():
    cb = LotteryTicket(0.9, rate=0.2)
    assert cb.rounds == 11  # 0.8**10 = 0.107 > 0.1 >= 0.8**11
    assert cb.round_sparsity(10) == pytest.approx(1 - 0.8**10) and cb.round_sparsity(11) == 0.9
    assert cb.round_sparsity(11, output=True) == pytest.approx(1 - 0.9**11)


class _Record(pl.Callback):
    """The weights and masks at the start of every epoch (after the round transition)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def _fit(cb: LotteryTicket, per_round: int = 2, seed: int = 0):
    pl.seed_everything(seed, verbose=False)
    model = _mlp(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    record = _Record()
    lit = module(model, scheduler=True)
    trainer([cb, record], max_epochs=per_round).fit(lit, datamodule=digits())
    return lit, init, record.epochs


def test_each_round_prunes_the_remaining_and_rewinds_survivors_to_their_initial_values():
    cb = LotteryTicket(0.5, rate=0.3)
    lit, init, epochs = _fit(cb)
    assert cb.rounds == 2 and lit.trainer.current_epoch == 2 * 3  # (rounds + 1) rounds of 2 epochs
    for r, epoch in [(1, 2), (2, 4)]:  # the first epoch of each pruned round
        state = epochs[epoch]
        mask = state["layers.0.weight_mask"]
        assert float(1 - mask.mean()) == pytest.approx(cb.round_sparsity(r), abs=1e-3)
        kept = mask.bool()
        torch.testing.assert_close(state["layers.0.weight_orig"][kept], init["layers.0.weight"][kept])  # rewound
        torch.testing.assert_close(state["layers.0.bias"], init["layers.0.bias"])
    assert bool((epochs[4]["layers.0.weight_mask"] <= epochs[2]["layers.0.weight_mask"]).all())  # nested masks
    assert lit.trainer.optimizers[0].param_groups[0]["lr"] < 0.05  # the schedule ran again in the last round
    rounds = [row["round"] for row in cb._history]
    assert rounds == [0.0, 1.0, 2.0] and cb._history[-1]["sparsity"] > cb._history[1]["sparsity"]


def test_late_rewinding_goes_back_to_the_weights_of_iteration_k():
    captured = {}

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5 and "w" not in captured:
                captured["w"] = pl_module.model.layers[0].weight_orig.detach().clone()

    cb = LotteryTicket(0.2, rate=0.2, rewind=5)
    pl.seed_everything(0, verbose=False)
    record = _Record()
    trainer([cb, Capture(), record], max_epochs=1).fit(module(_mlp()), datamodule=digits())
    kept = record.epochs[1]["layers.0.weight_mask"].bool()
    torch.testing.assert_close(record.epochs[1]["layers.0.weight_orig"][kept], captured["w"][kept])


def test_random_reinit_control_replays_the_tickets_masks_with_fresh_weights(tmp_path):
    ticket = LotteryTicket(0.5, rate=0.3)
    _, init, ticket_epochs = _fit(ticket)
    (_, masks, _) = ticket.artifacts(tmp_path)[:3]
    control = LotteryTicket(0.5, rate=0.3, reinit="random", masks_from=str(masks))
    control.build_model = lambda: MLP(num_classes=10, input_shape=(1, 8, 8), hidden=[64, 32])
    _, _, control_epochs = _fit(control)
    for epoch in (2, 4):
        assert torch.equal(control_epochs[epoch]["head.weight_mask"], ticket_epochs[epoch]["head.weight_mask"])
        assert not torch.allclose(control_epochs[epoch]["layers.0.weight_orig"], init["layers.0.weight"])


def test_the_control_refuses_masks_of_another_recipe(tmp_path):
    ticket = LotteryTicket(0.3, rate=0.3)
    _fit(ticket)
    masks = ticket.artifacts(tmp_path)[1]
    control = LotteryTicket(0.9, rate=0.3, reinit="random", masks_from=str(masks))
    control.build_model = _mlp
    with pytest.raises(ValueError, match="has no masks for rounds"):
        control.check_layers(_mlp(), (1, 8, 8))


def test_every_round_is_tracked_in_mlflow_with_its_early_stop_iteration(make_cfg):
    cfg = make_cfg("distill=none", "prune=lottery", "prune.sparsity=0.5", "prune.rate=0.3", "trainer.max_epochs=2")
    metrics = run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (student,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kd.role") == "student"]
    for key in ("lottery/sparsity", "lottery/val_acc_best", "lottery/early_stop_iteration"):
        history = client.get_metric_history(student.info.run_id, key)
        assert sorted(h.step for h in history) == [0, 1, 2], key
    iterations = client.get_metric_history(student.info.run_id, "lottery/early_stop_iteration")
    steps_per_epoch = -(-len(digits().train.y) // 64)
    assert all(0 < h.value <= 2 * steps_per_epoch for h in iterations)  # an iteration within its round
    artifacts = {a.path for a in client.list_artifacts(student.info.run_id)}
    assert {"lottery_rounds.csv", "lottery_masks.pt", "lottery_rounds.png", "student.pt"} <= artifacts
    assert metrics["val/acc_best"] == pytest.approx(
        max(h.value for h in client.get_metric_history(student.info.run_id, "lottery/val_acc_best") if h.step == 2)
    )  # the model kept is the last round's (at the target), not an earlier denser one


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_rounds_rewind_weights_and_history_survive_a_checkpoint_resume(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tests.compression.pruning_helpers import KillAt

    def fit(root, ckpt=None, kill=False):
        pl.seed_everything(0, verbose=False)
        lit = module(_mlp(), scheduler=True)
        cb = LotteryTicket(0.5, rate=0.3)
        callbacks = [cb, ModelCheckpoint(dirpath=root, save_last=True), *([KillAt(3)] if kill else [])]
        trainer(callbacks, 2, enable_checkpointing=True).fit(lit, datamodule=digits(), ckpt_path=ckpt)
        return lit, cb

    full, full_cb = fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "cut", kill=True)  # killed inside round 1, after its first epoch
    resumed, cb = fit(tmp_path / "cut", ckpt=str(tmp_path / "cut" / "last.ckpt"))
    assert [r["round"] for r in cb._history] == [0.0, 1.0, 2.0]
    assert [r["val_acc_best"] for r in cb._history] == [r["val_acc_best"] for r in full_cb._history]
    torch.testing.assert_close(dict(full.model.state_dict()), dict(resumed.model.state_dict()))

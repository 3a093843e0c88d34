"""Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning with rewinding.

One ``trainer.fit`` holds all rounds; ``trainer.max_epochs`` is the length of *one* round and
the callback extends the fit to ``(rounds + 1) * max_epochs``. Round 0 trains the dense
network. At the start of each later round, ``rate`` of the remaining weights of every chosen
layer is pruned by magnitude (``output_rate``, half of it by default, for the output layer, as
in the paper), and the survivors are *rewound*: to their initial values (``rewind=0``), to
their values at iteration ``k`` of round 0 (``rewind=k``, late rewinding, Frankle et al. 2020),
or, for the control, re-drawn at random from the initialisation (``reinit=random``). The
optimizer's state and the learning-rate schedule restart with every round. The last round
ends exactly at ``sparsity`` for the hidden layers.

The random-reinit control of the paper keeps the *ticket's* masks: a ticket run writes
``lottery_masks.pt`` (every round's masks), and the control run replays them with
``reinit=random masks_from=<that file>``. Each round's sparsity, best validation accuracy and
the iteration of that best epoch (the early-stop point) are logged with the round as the step
(``lottery/*``), and written to ``lottery_rounds.csv`` and a plot.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from kd.tracking.figures import new_figure, save_figure
from callbacks.base import PruningCallback
from kd.tracking import keys
from kd.compression.layers import check_fraction, output_layer, select_layers

REINIT = ("rewind", "random")


class LotteryTicket(PruningCallback):
    """Iterative magnitude pruning by rounds with rewinding (module docstring).

    Args:
        sparsity: final fraction of the hidden layers' weights removed, in [0, 1).
        rate: fraction of the remaining weights pruned per round (the paper: 0.2).
        output_rate: the same for the output layer; None for ``rate / 2``.
        rewind: 0 rewinds to the initial weights; ``k > 0`` to those after ``k`` optimizer
            steps of round 0.
        reinit: ``rewind`` (the ticket) or ``random`` (the control: fresh random weights with
            the same masks; give the ticket's ``masks_from``).
        masks_from: a ``lottery_masks.pt`` written by a ticket run, to replay its masks.
        layers, skip: fnmatch patterns of the conv/linear layers to prune / keep dense.
        seed: base seed of the random re-initialisations.
    """

    kind = "lottery"

    def __init__(
        self,
        sparsity: float,
        rate: float = 0.2,
        output_rate: float | None = None,
        rewind: int = 0,
        reinit: str = "rewind",
        masks_from: str | None = None,
        layers: Sequence[str] | None = None,
        skip: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        self.sparsity = check_fraction("prune.sparsity", sparsity)
        self.rate = check_fraction("prune.rate", rate)
        self.output_rate = check_fraction("prune.output_rate", output_rate if output_rate is not None else rate / 2)
        if self.rate == 0.0 and self.sparsity > 0:
            raise ValueError("prune.rate must be > 0 to reach a sparsity above 0")
        if reinit not in REINIT:
            raise ValueError(f"prune.reinit must be one of {REINIT}, got {reinit!r}")
        if rewind < 0:
            raise ValueError(f"prune.rewind is an optimizer step (>= 0), got {rewind}")
        self.rounds = 0 if self.sparsity == 0 else math.ceil(math.log(1 - self.sparsity) / math.log(1 - self.rate) - 1e-9)
        self.rewind, self.reinit, self.seed = rewind, reinit, seed
        self.masks_from = Path(masks_from) if masks_from else None
        self.layers, self.skip = list(layers) if layers is not None else None, list(skip)
        self._targets: dict[str, nn.Module] = {}
        self._output: str | None = None
        self._round = 0
        self._epochs_per_round = 0
        self._rewind_state: dict[str, Tensor] | None = None
        self._start_state: dict[str, object] | None = None  # optimizer lrs and scheduler at fit start
        self._history: list[dict[str, float]] = []  # one row per finished round
        self._best: tuple[float, int] = (-1.0, 0)  # best val acc of the running round, its iteration
        self._round_start_step = 0
        self._masks: dict[int, dict[str, Tensor]] = {}
        self._replay: dict[int, dict[str, Tensor]] | None = None
        self._files: list[Path] = []

    # ---- configuration ------------------------------------------------------------------
    def describe(self) -> str:
        what = "lottery" if self.reinit == "rewind" else "lottery-random-reinit"
        return f"prune {what} s={self.sparsity:g} r={self.rate:g}"

    def round_sparsity(self, r: int, output: bool = False) -> float:
        """Target sparsity after ``r`` pruning rounds (the last round lands on ``sparsity``)."""
        if not output and r >= self.rounds:
            return self.sparsity
        return 1.0 - (1.0 - (self.output_rate if output else self.rate)) ** r

    @property
    def at_target(self) -> bool:
        return self._round == self.rounds

    def check_layers(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
        select_layers(model, self.layers, self.skip)
        if self.reinit == "random" and self.build_model is None:
            raise ValueError("prune.reinit=random needs the model's builder (set by kd.run.experiment)")
        if self.masks_from is not None:
            self._load_replay(select_layers(model, self.layers, self.skip))

    def _load_replay(self, targets: dict[str, nn.Module]) -> None:
        if not self.masks_from.is_file():  # type: ignore[union-attr]
            raise FileNotFoundError(f"prune.masks_from: no such file {self.masks_from}")
        replay = torch.load(self.masks_from, map_location="cpu", weights_only=True)
        missing = [r for r in range(1, self.rounds + 1) if r not in replay]
        if missing:
            raise ValueError(f"{self.masks_from} has no masks for rounds {missing}: was it written with the same sparsity and rate?")
        for r in range(1, self.rounds + 1):
            for name, module in targets.items():
                if name not in replay[r] or replay[r][name].shape != module.weight.shape:
                    raise ValueError(f"{self.masks_from} round {r} has no mask of shape {tuple(module.weight.shape)} for {name!r}")
        self._replay = replay

    # ---- Lightning hooks ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._epochs_per_round = trainer.max_epochs
        trainer.fit_loop.max_epochs = self._epochs_per_round * (self.rounds + 1)  # max_epochs is per round
        model = pl_module.model
        self._targets = select_layers(model, self.layers, self.skip)
        out = output_layer(model, tuple(trainer.datamodule.input_shape))
        self._output = next((n for n, m in self._targets.items() if m is out), None)
        for module in self._targets.values():
            if not hasattr(module, "weight_mask"):
                prune.identity(module, "weight")
        if self.masks_from is not None and self._replay is None:
            self._load_replay(self._targets)
        if self.rewind > 0 and self.rewind >= trainer.num_training_batches * self._epochs_per_round:
            raise ValueError(f"prune.rewind={self.rewind} lies beyond round 0 ({trainer.num_training_batches * self._epochs_per_round} steps)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start_state is None:  # not when resuming: the saved start state is restored
            self._start_state = {
                "lrs": [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers],
                "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            }
            if self.rewind == 0:
                self._rewind_state = _weights(pl_module.model)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int) -> None:
        if self.rewind > 0 and self._rewind_state is None and trainer.global_step == self.rewind:
            self._rewind_state = _weights(pl_module.model)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch and epoch % self._epochs_per_round == 0 and epoch // self._epochs_per_round > self._round:
            self._finish_round(trainer)
            self._next_round(trainer, pl_module)
        pl_module.log("lottery/round", float(self._round), on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_sparsity(pl_module, {n: m.weight_mask for n, m in self._targets.items()})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        acc = trainer.callback_metrics.get(keys.VAL_ACC)
        if acc is not None and not trainer.sanity_checking and float(acc) > self._best[0]:
            self._best = (float(acc), trainer.global_step - self._round_start_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self._history) == self._round:  # the last round's row
            self._finish_round(trainer)

    # ---- rounds ---------------------------------------------------------------------------
    def _finish_round(self, trainer: pl.Trainer) -> None:
        kept = sum(int(m.weight_mask.sum()) for m in self._targets.values())
        total = sum(m.weight_mask.numel() for m in self._targets.values())
        row = {
            "round": float(self._round),
            "sparsity": 1.0 - kept / total,
            "remaining_percent": 100.0 * kept / total,
            "val_acc_best": self._best[0],
            "early_stop_iteration": float(self._best[1]),
        }
        self._history.append(row)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"lottery/{k}": v for k, v in row.items() if k != "round"}, step=self._round)

    @torch.no_grad()
    def _next_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._round += 1
        r = self._round
        for name, module in self._targets.items():
            if self._replay is not None:
                mask = self._replay[r][name].to(module.weight_mask.device, module.weight_mask.dtype)
                module.weight_mask.copy_(mask * module.weight_mask)  # survivors of the ticket's round r
            else:
                target = self.round_sparsity(r, output=name == self._output)
                extra = round(target * module.weight_mask.numel()) - int((module.weight_mask == 0).sum())
                if extra > 0:
                    prune.l1_unstructured(module, "weight", amount=extra)
        self._masks[r] = {n: m.weight_mask.detach().bool().cpu().clone() for n, m in self._targets.items()}
        self._restart(trainer, pl_module)
        self._best, self._round_start_step = (-1.0, 0), trainer.global_step

    def _restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rewind (or re-draw) the surviving weights and restart the optimizer and schedule."""
        if self.reinit == "random":
            torch.manual_seed(self.seed + 1000 * self._round)
            source = _weights(self.build_model())  # type: ignore[misc]
        else:
            assert self._rewind_state is not None, "rewind weights were never captured"
            source = self._rewind_state
        state = pl_module.model.state_dict()
        for key, value in source.items():
            target = key if key in state else key.replace(".weight", ".weight_orig")
            state[target].copy_(value.to(state[target].device))
        assert self._start_state is not None
        for opt, lrs in zip(trainer.optimizers, self._start_state["lrs"]):  # type: ignore[arg-type]
            opt.state.clear()
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        for config, sched in zip(trainer.lr_scheduler_configs, self._start_state["schedulers"]):  # type: ignore[arg-type]
            config.scheduler.load_state_dict(copy.deepcopy(sched))

    # ---- outputs ----------------------------------------------------------------------------
    def artifacts(self, run_dir: Path) -> list[Path]:
        if not self._history:
            return []
        run_dir.mkdir(parents=True, exist_ok=True)
        table = run_dir / "lottery_rounds.csv"
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self._history[0]))
            writer.writeheader()
            writer.writerows(self._history)
        masks = run_dir / "lottery_masks.pt"
        torch.save(self._masks, masks)  # {round: {layer: bool mask}}: plain tensors, weights_only-loadable
        return [table, masks, self._plot(run_dir / "lottery_rounds.png")]

    def _plot(self, path: Path) -> Path:
        fig, ax = new_figure((6, 4))
        x = [h["remaining_percent"] for h in self._history]
        ax.plot(x, [100 * h["val_acc_best"] for h in self._history], marker="o", label=self.describe())
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%), log scale")
        ax.set_ylabel("best validation accuracy (%)")
        return save_figure(fig, ax, path)

    def fold(self, model: nn.Module) -> nn.Module:
        for module in self._targets.values():
            if hasattr(module, "weight_mask"):
                prune.remove(module, "weight")
        return model

    # ---- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {
            "round": self._round, "history": self._history, "best": self._best,
            "round_start_step": self._round_start_step, "rewind_state": self._rewind_state,
            "start_state": self._start_state, "masks": self._masks,
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self._round = int(state_dict["round"])  # type: ignore[arg-type]
        self._history = list(state_dict["history"])  # type: ignore[arg-type]
        self._best = tuple(state_dict["best"])  # type: ignore[assignment,arg-type]
        self._round_start_step = int(state_dict["round_start_step"])  # type: ignore[arg-type]
        self._rewind_state = state_dict["rewind_state"]  # type: ignore[assignment]
        self._start_state = state_dict["start_state"]  # type: ignore[assignment]
        self._masks = dict(state_dict["masks"])  # type: ignore[arg-type]


def _weights(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name, cloned, with the pruning masks left out and
    ``weight_orig`` named ``weight`` (what a rewind copies back)."""
    return {
        k.replace(".weight_orig", ".weight"): v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("_mask")
    }

"""Quantization-aware training (``quantize=qat``): the fake-quantized student trains, while
distilling and while unstructured pruning masks it, and is converted to int8 at the end; after
structured pruning it is a fine-tuning phase of the thinned model. The shared quantization
contract, the traps it handles and the FX flow: ``callbacks/quantization.py``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from kd.compression import mixed_precision as mp
from kd.compression.layers import select_layers
from kd.data import calibration_batches, labelled_batches
from callbacks.qat_features import qat_feature_aliases
from callbacks.quantization import QuantizationCallback
from callbacks.stage import THINNING, StageContext, StageResult


class QuantizationAwareTraining(QuantizationCallback):
    """Fake-quantized training, then int8 (``quantize=qat``).

    After structured pruning the fake-quant graph cannot be prepared when fitting starts: the
    channels go only when the pruner finalises. Then QAT is a fine-tuning phase of its own: the
    thinned model is prepared, trained ``finetune_epochs`` more epochs at ``lr_scale`` times the
    rate with the run's objective (distillation-aware), tested and converted.

    Args:
        per_channel, backend: as for PTQ.
        freeze_observers_epoch: from this epoch on the ranges stop moving (None: never); in the
            fine-tuning phase after structured pruning, epochs count from its start.
        freeze_bn_epoch: from this epoch on BatchNorm uses its running statistics (None: never).
        bits: width of the weights, 2..8.
        activation_bits: width of the activations, 2..8 (None: as ``bits``). ``bits=4,
            activation_bits=8`` is the whitepaper's 4-bit-weights setting (Krishnamoorthi 2018).
        finetune_epochs, lr_scale: the fine-tuning phase after structured pruning or with a
            budget (unused otherwise).
        budget_bits: mixed precision (``kd/compression/mixed_precision.py``): the average weight
            bits of the conv and linear layers, 2..8; each layer's width is chosen from
            ``bit_choices`` by ``sensitivity`` on the trained float student, which then
            fine-tunes at those widths (``finetune_epochs`` at ``lr_scale``). None: every layer
            at ``bits``.
        bit_choices: the widths a layer may get.
        sensitivity: ``measured`` (validation loss increase of each layer quantized alone) or
            ``hessian`` (HAWQ-v2: Hutchinson estimate of the Hessian trace times the quantization
            error), over ``sensitivity_batches`` training batches.
        engine: ``auto`` (PT2E, or FX for distillation-aware QAT and QAT with unstructured
            pruning: ``callbacks/quant_engine.py``), ``pt2e`` or ``fx``.
    """

    mode = "qat"
    # graph surgery comes first: a pruner then registers its masks on the prepared (fake-quant)
    # modules, which share the float weights, so masks and fake-quant train together and resume
    prepares_graph = True

    def __init__(self, per_channel: bool = True, backend: str = "auto", freeze_observers_epoch: int | None = None,
                 freeze_bn_epoch: int | None = None, bits: int = 8, activation_bits: int | None = None,
                 finetune_epochs: int = 2, lr_scale: float = 0.1, engine: str = "auto", budget_bits: float | None = None,
                 bit_choices: tuple[int, ...] = mp.CANDIDATES, sensitivity: str = "measured", sensitivity_batches: int = 4) -> None:  # fmt: skip
        super().__init__(backend, per_channel, engine)
        self.budget_bits, self.layer_bits = budget_bits, None  # layer_bits: chosen when the float student has trained
        if budget_bits is not None:
            self.bit_choices = mp.check_budget(budget_bits, list(bit_choices))
            if bits != 8:
                raise ValueError(f"quantize.bits={bits} is one width for every layer; with quantize.budget_bits each layer's "
                                 "width is chosen from quantize.bit_choices: leave quantize.bits at 8")  # fmt: skip
            if sensitivity not in mp.SENSITIVITIES:
                raise ValueError(f"quantize.sensitivity must be one of {mp.SENSITIVITIES}, got {sensitivity!r}")
            if sensitivity_batches < 1:
                raise ValueError(f"quantize.sensitivity_batches must be >= 1, got {sensitivity_batches}")
            activation_bits = 8 if activation_bits is None else activation_bits  # the budget is the weights'
        self.sensitivity, self.sensitivity_batches = sensitivity, sensitivity_batches
        self.costs: dict[str, dict[int, float]] = {}
        self.layer_params: dict[str, int] = {}
        self._coded: float | None = None
        if finetune_epochs < 1 or lr_scale <= 0:
            raise ValueError(f"quantize.finetune_epochs must be >= 1 and quantize.lr_scale > 0, got {finetune_epochs}, {lr_scale}")
        self.finetune_epochs, self.lr_scale = finetune_epochs, lr_scale
        self.after_thinning = False  # set by check(): a structured pruner thins the model first
        for name, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
            if value is not None and value < 0:
                raise ValueError(f"quantize.{name} must be >= 0 or null, got {value}")
        activation_bits = bits if activation_bits is None else activation_bits
        for name, value in (("bits", bits), ("activation_bits", activation_bits)):
            if not 2 <= value <= 8:
                raise ValueError(f"quantize.{name} must lie in [2, 8], got {value}")
        self.freeze_observers_epoch, self.freeze_bn_epoch = freeze_observers_epoch, freeze_bn_epoch
        self.bits, self.activation_bits = bits, activation_bits
        self._observing = True

    @property
    def converts(self) -> bool:
        """Only 8-bit training converts to int8 kernels: an int8 model of a 4-bit fake-quant
        model would not clamp to 4 bits, so lower widths are evaluated as the fake-quant model."""
        return self.bits == 8 and self.activation_bits == 8 and all(b == 8 for b in (self.layer_bits or {}).values())

    @property
    def mixed(self) -> bool:
        return self.budget_bits is not None

    def recipe(self) -> dict[str, Any]:
        extra = {"layer_bits": dict(self.layer_bits), "budget_bits": self.budget_bits} if self.layer_bits is not None else {}
        return super().recipe() | {"bits": self.bits, "activation_bits": self.activation_bits} | extra

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        metrics = {"quant/activation_bits": float(self.activation_bits)}
        if self.layer_bits is not None:
            average = mp.average_bits(self.layer_bits, self.layer_params)
            metrics |= {"quant/bits": average, "quant/budget_bits": float(self.budget_bits), "quant/weight_bits_avg": average}
            metrics |= {f"quant/layer_bits/{name}": float(b) for name, b in self.layer_bits.items()}
        return metrics

    def coded_bytes(self, model: nn.Module) -> float | None:
        return self._coded

    def describe(self) -> str:
        if self.mixed:
            return f"mixed w{self.budget_bits:g}a{self.activation_bits} qat ({self.sensitivity})"
        width = f"int{self.bits}" if self.bits == self.activation_bits else f"w{self.bits}a{self.activation_bits}"
        return f"{width} qat" + ("" if self.converts else " (simulated)")

    def check_with(self, objective: Any, pruner: Any, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        self.after_thinning = pruner is not None and pruner.kind in THINNING
        if self.mixed and pruner is not None and not self.after_thinning:
            raise ValueError(f"quantize.budget_bits with prune={pruner.kind} is not supported: the widths are chosen after training "
                             "and QAT then fine-tunes without the pruner, which would let the pruned weights grow back; "
                             "use prune=structured, or quantize the pruned student in a second run (student.init_checkpoint)")  # fmt: skip
        if input_shape is not None and objective is not None and objective.needs_features:  # distillation-aware QAT
            example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
            qat_feature_aliases(model, self.flow().prepare_for_qat(copy.deepcopy(model), self.recipe(), example), objective)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine_setting == "auto":  # a run decided in check(); callbacks used alone decide here
            pruner = next((c for c in trainer.callbacks if getattr(c, "group", None) == "prune"), None)
            self.use_engine(getattr(pl_module, "objective", None), pruner)
        if stage == "fit" and not isinstance(pl_module.model, torch.fx.GraphModule):
            device = next(pl_module.model.parameters()).device
            example = torch.zeros(1, *trainer.datamodule.input_shape, device=device)
            prepared = self.flow().prepare_for_qat(pl_module.model, self.recipe(), example)
            objective = getattr(pl_module, "objective", None)
            aliases = qat_feature_aliases(pl_module.model, prepared, objective) if objective is not None else {}
            pl_module.replace_model(prepared, aliases)
            # initial ranges from one training batch, so a validation before any training step
            # (Lightning's sanity check) has quantization parameters of the right shapes
            with torch.no_grad():
                pl_module.model(calibration_batches(trainer.datamodule, 1)[0].to(device))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._observing = self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch
        flow = self.flow()
        pl_module.model.apply(flow.enable_observer if self._observing else flow.disable_observer)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            flow.freeze_bn(pl_module.model)
        pl_module.log("quant/observing", float(self._observing), on_step=False, on_epoch=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.apply(self.flow().disable_observer)  # eval data must not move the ranges

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._observing:
            pl_module.model.apply(self.flow().enable_observer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.apply(self.flow().disable_observer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training is over: the ranges are final, and no later forward pass may move them
        pl_module.model.apply(self.flow().disable_observer)

    @property
    def finetunes(self) -> bool:
        """QAT is a fine-tuning phase after the float training: after thinning, or with a budget
        (the widths are chosen on the trained float student)."""
        return self.after_thinning or self.mixed

    def callbacks(self) -> list[Callback]:
        return [] if self.finetunes else [self]  # then: in finalize's fine-tuning phase

    def selectable(self, epoch: int) -> bool:
        return self.finetunes or super().selectable(epoch)

    def choose_widths(self, model: nn.Module, data: Any) -> dict[str, int]:
        """Each conv and linear layer's weight width under the budget, by this callback's
        sensitivity estimate on ``model`` (the trained float student); sets :attr:`costs` and the
        coded size."""
        layers = select_layers(model, None, ())
        self.layer_params = {name: m.weight.numel() for name, m in layers.items()}
        narrow, device = self.backend == "xnnpack", next(model.parameters()).device
        was_training = model.training
        model.eval()
        if self.sensitivity == "measured":
            x, y = data.val.x, data.val.y

            @torch.no_grad()
            def loss(m: nn.Module) -> float:
                total = sum(float(nn.functional.cross_entropy(m(xb.to(device)), yb.to(device), reduction="sum"))
                            for xb, yb in zip(x.split(1024), y.split(1024)))  # fmt: skip
                return total / len(y)

            self.costs = mp.measured_sensitivity(model, layers, loss, self.bit_choices, narrow)
        else:
            batches = [(xb.to(device), yb.to(device)) for xb, yb in labelled_batches(data, self.sensitivity_batches)]
            traces = mp.hessian_traces(model, layers, lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb), batches)
            self.costs = mp.hessian_sensitivity(layers, traces, self.bit_choices, narrow)
        model.train(was_training)
        bits = mp.choose_bits(self.costs, self.layer_params, float(self.budget_bits))
        quantized = {id(m.weight) for m in layers.values()}
        others = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
        scales = sum(m.weight.shape[0] for m in layers.values())  # one 32-bit scale per output channel
        self._coded = (sum(self.layer_params[n] * b for n, b in bits.items()) + 32 * (others + scales)) / 8
        return bits

    def artifacts(self, run_dir: Path) -> list[Path]:
        if self.layer_bits is None:
            return []
        table = mp.write_table(run_dir / "mixed_precision.csv", self.layer_bits, self.layer_params, self.costs)
        figure = mp.plot(run_dir / "mixed_precision.png", self.layer_bits, self.layer_params, float(self.budget_bits), self.sensitivity)
        return [table, figure]

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        if not self.finetunes:
            return super().finalize(model, context)
        assert context.finetune is not None and context.test_accuracy is not None
        if self.mixed:
            self.layer_bits = self.choose_widths(model, context.data)
        prepared = context.finetune(self.finetune_epochs, self.lr_scale, [self])  # setup() prepares the thinned model
        result = super().finalize(prepared, context)
        result.test_acc = context.test_accuracy(prepared)  # the fake-quant model replaces the tested float one
        result.metrics["quant/qat_finetune_epochs"] = float(self.finetune_epochs)
        return result

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        return self.flow().quantize_model(model, self.recipe(), []) if self.converts else model

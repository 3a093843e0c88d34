"""Quantization to real int8 models (``quantize=ptq|dynamic|qat``), with PyTorch's FX graph mode
(``torch.ao.quantization.quantize_fx``), the path that gives int8 CPU kernels today.

- ``PostTrainingQuantization`` (``ptq``, ``dynamic``): after training, the validation-selected
  model is traced, observed on ``calibration_batches`` training batches with the chosen range
  estimator (``minmax``, ``moving_average``, ``histogram``: torch's histogram observer, which
  searches the clipping range minimising the L2 quantization error, ``percentile`` or
  ``entropy``: the KL-divergence threshold, see ``callbacks/observers.py``) and converted to an
  int8 model; ``dynamic`` quantizes the weights of linear layers only, activations on the fly.
  ``compare=true`` also converts with every estimator and dynamically, and writes their int8
  test accuracies side by side (``ptq_compare.csv``, ``quant/compare/<estimator>/test_acc``).
- ``QuantizationAwareTraining`` (``qat``): graph preparation (fake-quant modules, conv-BN fusion)
  in ``setup()``, before a checkpoint is restored, so resuming works; the fake-quantized student
  trains (while distilling, and while unstructured pruning masks it); observers freeze and BatchNorm statistics fix at chosen epochs,
  and at the end the model is converted to int8. Lightning's old QAT callback patched
  ``forward`` and broke resuming; this replaces ``pl_module.model`` by the prepared graph.

Two traps handled here. Observers are switched off for validation and test, and for good
when fitting ends (a moving-average observer updates in eval mode too, so evaluation data would
move the ranges). And activations use the full 8-bit range, not torch's x86/fbgemm default
``reduce_range`` (7 bits), which made the int8 model's logits differ visibly from the fake-quant
model's on a VNNI CPU (``tests/compression/test_quantization.py`` checks the agreement). ``reduce_range``
exists for CPUs without VNNI, whose x86/fbgemm int8 kernels saturate at 8 bits; qnnpack does not.
So ``backend=auto`` (the default) picks x86 where ``fx_quant.has_vnni()`` and qnnpack elsewhere;
the recipe saved beside the weights records the one used. The measurements behind this, with the
machines named: docs/quantization.md.

All of it sits behind ``callbacks/fx_quant.py`` (:func:`quantize_model`, :func:`prepare_for_qat`),
so the flow can move to torchao's PT2E export path (the successor, already in torch's
deprecation notes) in one place.
The int8 model is evaluated on the CPU (the int8 kernels are CPU kernels).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from callbacks.qat_features import qat_feature_aliases
from callbacks.stage import THINNING, StageContext, StageResult, write_selection
from callbacks.fx_quant import BACKENDS, OBSERVERS, RECIPE_KEY, calibration_batches, prepare_for_qat, quantize_model, resolve_backend
from kd.tracking.measure import accuracy

class QuantizationCallback(Callback):
    """Base of the quantization callbacks: a ``CompressionStage`` (``callbacks/stage.py``).

    ``check`` before training; the callback itself trains (QAT's fake-quant graph, clustering,
    binary and log weights); an epoch counts for model selection from :attr:`start` on (the epoch
    from which the model is in its quantized form); ``finalize`` hands on the int8 model as a
    separate deployable form (:attr:`converts`), or, for recipes evaluated as a float model
    (clustered, binary, log), the model itself with its coded size; :meth:`recipe` is saved
    beside the weights. :meth:`convert` is the conversion alone.
    """

    group = "quantize"
    mode = "static"
    converts = True
    prepares_graph = False  # True: set up before any pruner (its callbacks go first)
    start = 0  # the epoch from which the model is in its quantized form

    def __init__(self, backend: str = "auto", per_channel: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"quantize.backend must be one of {BACKENDS}, got {backend!r}")
        backend = resolve_backend(backend)
        if backend not in torch.backends.quantized.supported_engines:
            raise ValueError(f"quantize.backend={backend!r} is not built into this torch ({torch.backends.quantized.supported_engines})")
        self.backend, self.per_channel = backend, per_channel

    @property
    def kind(self) -> str:
        return {"static": "ptq"}.get(self.mode, self.mode)

    def recipe(self) -> dict[str, Any]:
        return {"mode": self.mode, "backend": self.backend, "per_channel": self.per_channel, "observer": getattr(self, "observer", "minmax")}

    def describe(self) -> str:
        return f"int8 {self.mode}"

    # -- the CompressionStage contract -----------------------------------------------------
    def check(self, model: nn.Module, context: StageContext) -> None:
        pruner = next((s for s in context.stages if s.group == "prune"), None)
        self.check_with(context.objective, pruner, model, context.input_shape)

    def prepare(self, model: nn.Module, context: StageContext) -> nn.Module:
        return model  # acts while training and after it

    def callbacks(self) -> list[Callback]:
        return [self]

    def selectable(self, epoch: int) -> bool:
        return epoch >= self.start

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        recipe = {RECIPE_KEY: self.recipe()}
        if self.converts:  # the int8 model: a separate deployable form, tested and measured against this float one
            int8 = self.convert(model, context.data)
            metrics = {f"quant/compare/{k}/test_acc": v for k, v in self.compared().items()}
            return StageResult(model, metrics, self.artifacts(Path(context.run_dir)), deployed=int8, deployed_extras=recipe)
        model = self.convert(model, context.data)  # clustered or low-bit: this model is the result
        metrics = {"quant/bits": float(self.recipe()["bits"])}
        if (coded := self.coded_bytes(model)) is not None:
            metrics["quant/size_bytes_coded"] = coded
            metrics["quant/bits_per_weight"] = 8 * coded / sum(p.numel() for p in model.parameters())
        metrics.update(self.extra_metrics(model))
        tags = {"kd.quant_eval": "the float model itself (no integer kernels for this recipe)"}
        return StageResult(model, metrics, self.artifacts(Path(context.run_dir)), recipe, tags)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_selection(trainer)

    # -- what the subclasses implement ------------------------------------------------------
    def check_with(self, objective: Any, pruner: Any, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        """Raise on what this quantizer cannot do with this objective, pruner and model (layer
        patterns that name nothing, a start before the pruning ends), before training."""

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        raise NotImplementedError

    def artifacts(self, run_dir: Path) -> list[Path]:
        """Files written for the run (comparison tables), to log as artifacts."""
        return []

    def compared(self) -> dict[str, float]:
        """Other recipes' int8 test accuracies measured while converting (``compare=true``)."""
        return {}

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        """Recipe-specific metrics of the final (float-evaluated) model, logged with the run."""
        return {}

    def coded_bytes(self, model: nn.Module) -> float | None:
        """Bytes of ``model`` in this recipe's compact encoding, for recipes that are evaluated
        as a float model (clustered, binary, log); None when the saved int8 model is the result."""
        return None


class PostTrainingQuantization(QuantizationCallback):
    """Int8 after training (``quantize=ptq``; ``dynamic=true`` for ``quantize=dynamic``).

    Args:
        observer: activation range estimator: ``minmax``, ``moving_average`` or ``histogram``.
        per_channel: per-output-channel weight scales (else one per tensor).
        backend: ``auto`` (x86 on a CPU with VNNI, else qnnpack), ``x86``, ``fbgemm`` or ``qnnpack``.
        calibration_batches: training batches observed before converting.
        dynamic: quantize linear layers' weights only, activations at run time (no calibration).
        compare: also convert with every estimator (and dynamically) and record each int8 test
            accuracy (``comparison``; the run logs it and writes ``ptq_compare.csv``).
    """

    def __init__(self, observer: str = "histogram", per_channel: bool = True, backend: str = "auto",
                 calibration_batches: int = 32, dynamic: bool = False, compare: bool = False) -> None:  # fmt: skip
        super().__init__(backend, per_channel)
        self.compare = compare
        self.comparison: dict[str, float] = {}  # estimator -> int8 test accuracy, when compare
        if observer not in OBSERVERS:
            raise ValueError(f"quantize.observer must be one of {tuple(OBSERVERS)}, got {observer!r}")
        if calibration_batches < 1:
            raise ValueError(f"quantize.calibration_batches must be >= 1, got {calibration_batches}")
        self.observer, self.calibration_batches = observer, calibration_batches
        self.mode = "dynamic" if dynamic else "static"

    def describe(self) -> str:
        if self.mode == "dynamic":
            return "int8 dynamic"
        return f"int8 ptq-{self.observer}" + ("" if self.per_channel else " per-tensor")

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        batches = calibration_batches(data, self.calibration_batches)
        if self.compare:
            for name in [*OBSERVERS, "dynamic"]:
                recipe = self.recipe() | ({"mode": "dynamic"} if name == "dynamic" else {"mode": "static", "observer": name})
                self.comparison[name] = accuracy(quantize_model(model, recipe, batches), data.test.x, data.test.y)
        return quantize_model(model, self.recipe(), batches)

    def compared(self) -> dict[str, float]:
        return dict(self.comparison)

    def artifacts(self, run_dir: Path) -> list[Path]:
        if not self.comparison:
            return []
        path = Path(run_dir) / "ptq_compare.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("estimator,int8_test_acc\n" + "".join(f"{k},{v:.6f}\n" for k, v in self.comparison.items()))
        return [path]


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
        finetune_epochs, lr_scale: the fine-tuning phase after structured pruning (unused otherwise).
    """

    mode = "qat"
    # graph surgery comes first: a pruner then registers its masks on the prepared (fake-quant)
    # modules, which share the float weights, so masks and fake-quant train together and resume
    prepares_graph = True

    def __init__(self, per_channel: bool = True, backend: str = "auto", freeze_observers_epoch: int | None = None,
                 freeze_bn_epoch: int | None = None, bits: int = 8, activation_bits: int | None = None,
                 finetune_epochs: int = 2, lr_scale: float = 0.1) -> None:  # fmt: skip
        super().__init__(backend, per_channel)
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
        return self.bits == 8 and self.activation_bits == 8

    def recipe(self) -> dict[str, Any]:
        return super().recipe() | {"bits": self.bits, "activation_bits": self.activation_bits}

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        return {"quant/activation_bits": float(self.activation_bits)}

    def describe(self) -> str:
        width = f"int{self.bits}" if self.bits == self.activation_bits else f"w{self.bits}a{self.activation_bits}"
        return f"{width} qat" + ("" if self.converts else " (simulated)")

    def check_with(self, objective: Any, pruner: Any, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        self.after_thinning = pruner is not None and pruner.kind in THINNING
        if input_shape is not None and objective is not None and objective.needs_features:  # distillation-aware QAT
            example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
            qat_feature_aliases(model, prepare_for_qat(copy.deepcopy(model), self.recipe(), example), objective)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module.model, torch.fx.GraphModule):
            device = next(pl_module.model.parameters()).device
            example = torch.zeros(1, *trainer.datamodule.input_shape, device=device)
            prepared = prepare_for_qat(pl_module.model, self.recipe(), example)
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
        pl_module.model.apply(torch.ao.quantization.enable_observer if self._observing else torch.ao.quantization.disable_observer)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            pl_module.model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        pl_module.log("quant/observing", float(self._observing), on_step=False, on_epoch=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.apply(torch.ao.quantization.disable_observer)  # eval data must not move the ranges

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._observing:
            pl_module.model.apply(torch.ao.quantization.enable_observer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.apply(torch.ao.quantization.disable_observer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training is over: the ranges are final, and no later forward pass may move them
        pl_module.model.apply(torch.ao.quantization.disable_observer)

    def callbacks(self) -> list[Callback]:
        return [] if self.after_thinning else [self]  # after thinning: in finalize's fine-tuning phase

    def selectable(self, epoch: int) -> bool:
        return self.after_thinning or super().selectable(epoch)

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        if not self.after_thinning:
            return super().finalize(model, context)
        assert context.finetune is not None and context.test_accuracy is not None
        prepared = context.finetune(self.finetune_epochs, self.lr_scale, [self])  # setup() prepares the thinned model
        result = super().finalize(prepared, context)
        result.test_acc = context.test_accuracy(prepared)  # the fake-quant model replaces the tested float one
        result.metrics["quant/qat_finetune_epochs"] = float(self.finetune_epochs)
        return result

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        return quantize_model(model, self.recipe(), []) if self.converts else model

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
- ``QuantizationAwareTraining`` (``qat``, ``callbacks/qat.py``): graph preparation (fake-quant modules, conv-BN fusion)
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

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from callbacks.stage import StageContext, StageResult, write_selection
from callbacks.fx_quant import BACKENDS, OBSERVERS, RECIPE_KEY, calibration_batches, quantize_model, resolve_backend
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

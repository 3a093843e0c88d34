"""Quantization to real int8 models (``quantize=ptq|dynamic|qat``), with torchao's PT2E flow
(``callbacks/pt2e_quant.py``: ``torch.export``, ``prepare_pt2e``/``convert_pt2e``, int8 kernels through
Inductor) or, where PT2E cannot do it yet, torch's FX graph mode (``callbacks/fx_quant.py``); which
one, and why, is ``callbacks/quant_engine.py``'s business (``quantize.engine``).

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
``reduce_range`` (7 bits), which made the FX int8 model's logits differ visibly from the fake-quant
model's on a VNNI CPU (``tests/compression/test_quantization.py`` checks the agreement). ``reduce_range``
exists for CPUs without VNNI, whose x86/fbgemm int8 kernels saturate at 8 bits; qnnpack does not.
So on the FX flow ``backend=auto`` (the default) picks x86 where ``fx_quant.has_vnni()`` and qnnpack
elsewhere; on PT2E it picks the quantizer of the machine's architecture. The recipe saved beside
the weights records the flow and backend used. The measurements behind this: docs/quantization.md.

Both flows have the same functions (:func:`quantize_model`, :func:`prepare_for_qat`, observer
switches, ``freeze_bn``, ``load_quantized``); the callbacks call them through ``self.flow()``.
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
from callbacks.fx_quant import OBSERVERS
from kd.data import calibration_batches
from callbacks.quant_engine import ENGINES, RECIPE_KEY, flow, fx_reason, resolve_backend
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
    engine = "none"  # the flow that makes the int8 model (quant_engine): "pt2e" or "fx"; none for float-evaluated recipes
    engine_reason: str | None = None  # why engine=auto chose the FX flow

    def __init__(self, backend: str = "auto", per_channel: bool = True, engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"quantize.engine must be one of {ENGINES}, got {engine!r}")
        self.engine_setting, self.backend_setting = engine, backend
        self.engine = "fx" if engine == "fx" else "pt2e"
        self.backend = resolve_backend(backend, self.engine)
        self.per_channel = per_channel

    def use_engine(self, objective: Any, pruner: Any) -> None:
        """Pick the flow for this run (before training): PT2E unless this recipe needs the FX flow
        (``quant_engine.fx_reason``); ``engine=pt2e`` with such a recipe is refused."""
        reason = fx_reason(self.mode, objective, pruner)
        if reason is None or self.engine_setting == "fx":
            return
        if self.engine_setting == "pt2e":
            raise ValueError(f"quantize.engine=pt2e cannot do this run's quantization: {reason}; use quantize.engine=auto (or fx)")
        self.engine, self.engine_reason = "fx", reason
        self.backend = resolve_backend(self.backend_setting, "fx")

    def flow(self):
        """The module of this callback's flow: ``callbacks/pt2e_quant.py`` or ``callbacks/fx_quant.py``."""
        return flow(self.engine)

    @property
    def kind(self) -> str:
        return {"static": "ptq"}.get(self.mode, self.mode)

    def recipe(self) -> dict[str, Any]:
        return {"mode": self.mode, "engine": self.engine, "backend": self.backend, "per_channel": self.per_channel,
                "observer": getattr(self, "observer", "minmax")}  # fmt: skip

    def describe(self) -> str:
        return f"int8 {self.mode}"

    # -- the CompressionStage contract -----------------------------------------------------
    def check(self, model: nn.Module, context: StageContext) -> None:
        pruner = next((s for s in context.stages if s.group == "prune"), None)
        if self.converts or self.mode == "qat":
            self.use_engine(context.objective, pruner)
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
            tags = {"kd.quant_engine": self.engine + (f" ({self.engine_reason})" if self.engine_reason else "")}
            return StageResult(model, metrics, self.artifacts(Path(context.run_dir)), tags=tags, deployed=int8, deployed_extras=recipe)
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
        backend: ``auto``, ``x86``, ``fbgemm``, ``qnnpack`` or ``xnnpack`` (``quant_engine.resolve_backend``).
        calibration_batches: training batches observed before converting.
        dynamic: quantize linear layers' weights only, activations at run time (no calibration).
        compare: also convert with every estimator (and dynamically) and record each int8 test
            accuracy (``comparison``; the run logs it and writes ``ptq_compare.csv``).
        engine: ``auto`` or ``pt2e`` (torchao's PT2E flow) or ``fx`` (torch's FX graph mode).
    """

    def __init__(self, observer: str = "histogram", per_channel: bool = True, backend: str = "auto",
                 calibration_batches: int = 32, dynamic: bool = False, compare: bool = False, engine: str = "auto") -> None:  # fmt: skip
        super().__init__(backend, per_channel, engine)
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
                self.comparison[name] = accuracy(self.flow().quantize_model(model, recipe, batches), data.test.x, data.test.y)
        return self.flow().quantize_model(model, self.recipe(), batches)

    def compared(self) -> dict[str, float]:
        return dict(self.comparison)

    def artifacts(self, run_dir: Path) -> list[Path]:
        if not self.comparison:
            return []
        path = Path(run_dir) / "ptq_compare.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("estimator,int8_test_acc\n" + "".join(f"{k},{v:.6f}\n" for k, v in self.comparison.items()))
        return [path]

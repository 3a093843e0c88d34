"""The run's ONNX export (``export=onnx``): the final student as ``model.onnx`` and, when the run
made an int8 model, ``model_int8.onnx``, each checked in onnxruntime on the test set against the
torch model it stands for, timed beside it, and logged (``export/float/*``, ``export/int8/*``).

The int8 file is the run's PT2E int8 model exported as a QDQ graph (the same function), or, for an
int8 model of the FX flow (whose modules do not export), onnxruntime's static quantization of the
float graph calibrated on the batches the quantizer saw; the tag ``kd.export_int8`` says which, and
the check is then against the FX int8 model kd tested. An export below the agreement it must reach
(``kd.deploy.onnx.FLOAT_AGREEMENT``, ``INT8_AGREEMENT``) is named in a warning and the tag
``kd.export_mismatch``: the file does not predict what kd measured.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

from torch import nn

from callbacks.quant_engine import RECIPE_KEY, load_quantized
from kd.data import TensorDataModule, calibration_batches
from kd.deploy import onnx
from kd.tracking import keys
from kd.tracking.measure import Measurement
from kd.tracking.store import resolve_uri
from kd.train.checkpoint import load_weights

log = logging.getLogger(__name__)

EXPORTS = ("none", "onnx")
CALIBRATION_BATCHES = 32  # for onnxruntime's static quantization (the PTQ default)


def _checked(kind: str, reference: nn.Module, path: Path, data: TensorDataModule, measurement: Measurement) -> dict[str, float]:
    assert data.test is not None
    runtime = onnx.OnnxModule(path, measurement.threads)
    metrics = onnx.check(reference, runtime, data.test.x) | {"size_bytes": float(path.stat().st_size)}
    if measurement.latency:
        for batch in (1, measurement.large_batch):
            metrics[f"ort_{keys.LATENCY}{batch}"] = onnx.latency_ms(runtime, data.input_shape, batch, measurement.threads,
                                                                    measurement.latency == "full").median_ms  # fmt: skip
    return {keys.key(keys.EXPORT, f"{kind}/{name}"): value for name, value in metrics.items()}


def export_widths(plains: dict[float, nn.Module], data: TensorDataModule, measurement: Measurement,
                  run_dir: Path) -> tuple[dict[str, float], dict[str, str], list[Path]]:  # fmt: skip
    """A slimmable student's narrower widths (plain models) as ``model_w<w>.onnx``, each checked
    in onnxruntime against its torch model (``export/w<w>/*``); returns metrics, tags and files."""
    found: dict[str, float] = {}
    tags: dict[str, str] = {}
    files: list[Path] = []
    for width, plain in plains.items():
        try:
            path = onnx.export(plain, data.input_shape, run_dir / f"model_w{width:g}.onnx")
            files.append(path)
            found |= _checked(f"w{width:g}", plain, path, data, measurement)
        except Exception as err:  # as for the float student: named, tagged, the run goes on
            tags[f"kd.export_w{width:g}"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log.warning("width %g was not exported to ONNX: %s", width, tags[f"kd.export_w{width:g}"])
    return found, tags, files


def export_student(
    model: nn.Module | None, int8: nn.Module | None, int8_engine: str | None, data: TensorDataModule, measurement: Measurement,
    run_dir: Path, metrics: dict[str, float],
) -> tuple[dict[str, float], dict[str, str], list[Path]]:  # fmt: skip
    """Export and check the float ``model`` and the ``int8`` one (made by ``int8_engine``);
    returns the metrics, tags and files. ``metrics``: the run's so far, for the speed-ups over
    torch (``export/*/ort_speedup_b*``: torch's latency over onnxruntime's)."""
    files: list[Path] = []
    found: dict[str, float] = {}
    tags: dict[str, str] = {}
    float_path: Path | None = None
    if model is None or any("FakeQuantize" in type(m).__name__ for m in model.modules()):
        tags["kd.export_float"] = "not exported: the student is QAT's fake-quant graph (its int8 model is the deployable form)"
    else:
        try:
            float_path = onnx.export(model, data.input_shape, run_dir / "model.onnx")
            files.append(float_path)
            found |= _checked("float", model, float_path, data, measurement)
        except Exception as err:  # an exporter gap must not lose a trained run: named, tagged, the rest goes on
            tags["kd.export_float"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log.warning("the float student was not exported to ONNX: %s", tags["kd.export_float"])
    if int8 is not None:
        path = run_dir / "model_int8.onnx"
        try:
            if int8_engine == "pt2e":
                files.append(onnx.export(int8, data.input_shape, path))
                tags["kd.export_int8"] = "the PT2E int8 model exported as a QDQ graph"
            elif float_path is not None:
                files.append(onnx.quantize_static(float_path, path, calibration_batches(data, CALIBRATION_BATCHES)))
                tags["kd.export_int8"] = (f"onnxruntime's static quantization of model.onnx ({CALIBRATION_BATCHES} calibration batches): "
                                          f"the {int8_engine} int8 model does not export")  # fmt: skip
            else:
                tags["kd.export_int8"] = f"not exported: the {int8_engine} int8 model does not export and there is no float graph to quantize"
            if path.is_file():
                found |= _checked("int8", int8, path, data, measurement)
        except Exception as err:
            tags["kd.export_int8"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log.warning("the int8 model was not exported to ONNX: %s", tags["kd.export_int8"])
    for kind, torch_family in (("float", keys.MODEL), ("int8", keys.QUANT)):
        for batch in (1, measurement.large_batch):
            ort, torch_ms = found.get(keys.key(keys.EXPORT, f"{kind}/ort_{keys.LATENCY}{batch}")), metrics.get(keys.key(torch_family, f"{keys.LATENCY}{batch}"))
            if ort and torch_ms:
                found[keys.key(keys.EXPORT, f"{kind}/ort_speedup_b{batch}")] = torch_ms / ort
    short = [f"{kind} agrees on {found[keys.key(keys.EXPORT, f'{kind}/argmax_agreement')]:.2%} (needs {bar:.1%})"
             for kind, bar in (("float", onnx.FLOAT_AGREEMENT), ("int8", onnx.INT8_AGREEMENT))
             if keys.key(keys.EXPORT, f"{kind}/argmax_agreement") in found and found[keys.key(keys.EXPORT, f"{kind}/argmax_agreement")] < bar]  # fmt: skip
    if short:
        log.warning("the ONNX export does not predict what kd measured: %s", "; ".join(short))
        tags["kd.export_mismatch"] = "; ".join(short)
    return found, tags, files


# ---- python -m kd.export: a finished run's files -------------------------------------------
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _source(source: str, uri: str, into: Path) -> tuple[Path, str | None]:
    """The folder holding ``config.yaml`` and ``student.pt`` of ``source`` (a run folder, or an
    MLflow run id whose artifacts are downloaded into ``into``), and the run id (None for a folder)."""
    folder = Path(source)
    if folder.is_dir():
        config = folder / "config.yaml" if (folder / "config.yaml").is_file() else folder / ".hydra" / "config.yaml"
        if not config.is_file() or not (folder / "student.pt").is_file():
            raise FileNotFoundError(f"{folder} is not a finished run's folder: it needs student.pt and .hydra/config.yaml (or config.yaml)")
        if config.parent != folder:
            shutil.copy(config, into / "config.yaml")
            for name in ("student.pt", "student_int8.pt"):
                if (folder / name).is_file():
                    shutil.copy(folder / name, into / name)
            return into, None
        return folder, None
    if not RUN_ID.match(source):
        raise ValueError(f"{source!r} is neither a run folder nor an MLflow run id (32 hexadecimal characters)")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(source)
    except MlflowException as err:
        raise LookupError(f"no MLflow run {source} in {uri}") from err
    names = {a.path for a in client.list_artifacts(source)}
    if "student.pt" not in names or "config.yaml" not in names:
        raise LookupError(f"run {source} ({run.info.status}) has no student.pt and config.yaml artifacts: was it a finished student run?")
    for name in ("config.yaml", "student.pt", "student_int8.pt"):
        if name in names:
            client.download_artifacts(source, name, str(into))
    return into, source


def main(argv: list[str] | None = None) -> int:
    """The CLI: export a finished run's student (and its int8 model) to ONNX, check it in
    onnxruntime, write the files beside it (``--out``) and, for a run id, log them to that run."""
    import argparse
    import tempfile

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog="python -m kd.export", description="Export a finished run's student to ONNX, checked in onnxruntime.")
    parser.add_argument("source", help="a run folder (outputs/runs/...) or an MLflow run id")
    parser.add_argument("--uri", default=None, help="tracking URI (default: as a run resolves it)")
    parser.add_argument("--out", type=Path, default=None, help="where the .onnx files go (default: the run folder, or ./exports/<run id>)")
    parser.add_argument("--latency", default="quick", choices=["quick", "full", "false"], help="time onnxruntime (default: quick)")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri, Path("outputs"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder, run_id = _source(args.source, uri, Path(tmp))
        except (ValueError, LookupError, FileNotFoundError) as err:
            print(f"kd.export: {err}", file=sys.stderr)
            return 2
        cfg = OmegaConf.load(folder / "config.yaml")
        data: TensorDataModule = instantiate(cfg.data)
        data.prepare_data()
        data.setup("fit")
        build = lambda: instantiate(cfg.student.model)(num_classes=data.num_classes, input_shape=data.input_shape)  # noqa: E731
        model = None
        try:
            model = load_weights(build(), folder / "student.pt", input_shape=data.input_shape).eval()
        except ValueError as err:  # a QAT run's student.pt is its fake-quant graph
            log.warning("the float student is not exported: %s", err)
        int8, engine = None, None
        if (folder / "student_int8.pt").is_file():
            import torch

            engine = torch.load(folder / "student_int8.pt", map_location="cpu", weights_only=True)[RECIPE_KEY].get("engine", "fx")
            int8 = load_quantized(build(), folder / "student_int8.pt", data.input_shape)
        if model is None and int8 is None:
            import torch

            recipe = torch.load(folder / "student.pt", map_location="cpu", weights_only=True).get(RECIPE_KEY) or {}
            why = ("it is a QAT run below 8 bits, whose student.pt is its fake-quant graph (no integer kernels exist for those "
                   "widths, so no int8 model was made)" if recipe.get("mode") == "qat" else
                   "its student.pt does not fit the architecture of its config")  # fmt: skip
            print(f"kd.export: nothing to export from {args.source}: {why}", file=sys.stderr)
            return 2
        out = args.out or (Path(args.source) if run_id is None else Path("exports") / run_id)
        out.mkdir(parents=True, exist_ok=True)
        latency = {"quick": "quick", "full": "full", "false": False}[args.latency]
        found, tags, files = export_student(model, int8, engine, data, Measurement(latency=latency), out, {})
    for name, value in sorted(found.items()):
        print(f"{name}: {value:.6g}")
    for name, value in tags.items():
        print(f"{name}: {value}")
    print("files: " + ", ".join(str(f) for f in files))
    if run_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in files:
            client.log_artifact(run_id, str(path))
        for name, value in found.items():
            client.log_metric(run_id, name, value)
        for name, value in tags.items():
            client.set_tag(run_id, name, value)
        print(f"logged to MLflow run {run_id}")
    return 1 if "kd.export_mismatch" in tags else 0

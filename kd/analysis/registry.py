"""Register the best student of an experiment (or sweep) in the MLflow model registry:
``python -m kd.registry --experiment kd --name digits-student [--sweep TAG] [--metric val/acc_best]``.

The best run is chosen by a *validation* metric by default (model selection never looks at the
test set); its ``student.pt`` becomes a new version of the registered model, tagged with its
accuracy and compression measurements, the run it came from, and the command that reproduces it.
A run exported to ONNX (``export=onnx``) registers as an MLflow ONNX model instead: its int8 (or
else float) ``.onnx`` with the input and output signature, loadable with ``mlflow.pyfunc`` or
``mlflow.onnx``, with ``student.pt`` and the other ``.onnx`` inside (the run's artifact folder
``registered_model/``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kd.analysis.report import load_runs
from kd.tracking import keys
from kd.tracking.store import resolve_uri

# measurements copied onto the model version as tags
TAGS = (keys.TEST_ACC, keys.VAL_ACC_BEST,
        *(keys.key(keys.MODEL, name) for name in (keys.PARAMS, keys.NONZERO, keys.SIZE, keys.SIZE_ZIP, keys.MACS,
                                                  keys.LATENCY + "1", keys.LATENCY + "256")),
        keys.COMPRESSION_RATIO, keys.key(keys.PRUNE, "param_reduction"), keys.key(keys.PRUNE, "nonzero_reduction"))  # fmt: skip


def signature(path: str | Path):
    """The MLflow signature of the ONNX file at ``path``: float32 tensors of its input and output
    shapes, the batch dimension (dynamic in kd.export's files) left open as -1."""
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        return TensorSpec(np.dtype(np.float32), dims, value.name)

    return ModelSignature(Schema([spec(v) for v in graph.input]), Schema([spec(v) for v in graph.output]))


def save_mlflow_model(path: str | Path, folder: str | Path, extra_files: list[Path] = ()) -> Path:
    """``folder`` as an MLflow model of the ONNX file at ``path`` (onnx flavor and pyfunc, so
    ``mlflow.pyfunc.load_model`` predicts with onnxruntime) with :func:`signature`; ``extra_files``
    (the torch state dict, the other export) travel inside it."""
    import mlflow.onnx
    import onnx

    with contextlib.redirect_stdout(io.StringIO()):
        mlflow.onnx.save_model(onnx.load(str(path)), str(folder), signature=signature(path), extra_files=[str(f) for f in extra_files],
                               save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])  # fmt: skip
    return Path(folder)


ONNX_FILES = ("model_int8.onnx", "model.onnx")  # kd.export's files, the deployable one first
PACKAGE = "registered_model"  # the run's artifact folder that a version with an ONNX export points at


def _package(client: MlflowClient, run_id: str, onnx_files: list[str]) -> str:
    """Log the run's first ONNX file as an MLflow model (onnx and pyfunc flavors, input and output
    signature) with ``student.pt`` and the other ONNX file inside, under the run's
    :data:`PACKAGE` artifact folder; returns that folder."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(client.download_artifacts(run_id, f, tmp)) for f in (*onnx_files, "student.pt")]
        save_mlflow_model(files[0], Path(tmp) / PACKAGE, files[1:])
        client.log_artifacts(run_id, str(Path(tmp) / PACKAGE), PACKAGE)
    return PACKAGE


def best_run(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> dict[str, Any]:
    """The FINISHED row with the best ``metric`` (``mode`` max or min); ties go to the oldest."""
    finished = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None]
    if not finished:
        raise LookupError(f"no FINISHED student run has the metric {metric!r}")
    sign = 1.0 if mode == "max" else -1.0
    return max(finished, key=lambda r: sign * r[metric])  # max() keeps the first of equals


def register_best(
    client: MlflowClient, experiment: str, name: str, metric: str = "val/acc_best", mode: str = "max", sweep: str | None = None
) -> ModelVersion:
    """Register the best run as a new version of model ``name``: its ``student.pt``, or its ONNX
    export as an MLflow model (:func:`_package`) when it has one."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    best = best_run(load_runs(client, experiment, sweep, metric), metric, mode)
    run = client.get_run(best["run_id"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "student.pt" not in logged:
        raise LookupError(f"run {run.info.run_id} has no student.pt artifact to register")
    metrics = run.data.metrics
    tags = {key: f"{metrics[key]:.6g}" for key in TAGS if key in metrics}
    overrides = run.data.tags.get("kd.overrides", "")
    tags |= {
        "kd.selected_by": f"{mode} {metric} = {best[metric]:.6g}",
        "kd.run_id": run.info.run_id,
        "kd.objective": run.data.tags.get("kd.objective", ""),
        "kd.compression": run.data.tags.get("kd.compression", "none"),
        "kd.command": f"python run.py {overrides}".strip() if overrides != "(defaults)" else "python run.py",
    }
    source = f"{run.info.artifact_uri}/student.pt"
    onnx_files = [f for f in ONNX_FILES if f in logged]
    if onnx_files:  # the run was exported: the version is an MLflow ONNX model with its signature
        source = f"{run.info.artifact_uri}/{_package(client, run.info.run_id, onnx_files)}"
        tags["kd.onnx"] = f"{onnx_files[0]} (inside too: {', '.join(['student.pt', *onnx_files[1:]])})"
    try:
        client.get_registered_model(name)
    except Exception:  # mlflow raises RestException / MlflowException for a missing name
        client.create_registered_model(name, description=f"kd students registered from experiment '{experiment}'")
    return client.create_model_version(
        name, source=source, run_id=run.info.run_id, tags=tags,
        description=f"best of '{experiment}'" + (f", sweep {sweep}" if sweep else "") + f" by {metric} ({mode})",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=None, help="tracking URI (default: as a run resolves it)")
    parser.add_argument("--experiment", default="kd")
    parser.add_argument("--sweep", default=None, help="only runs whose tag kd.sweep equals this")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--metric", default="val/acc_best", help="selection metric (default: val/acc_best)")
    parser.add_argument("--mode", default="max", choices=["max", "min"])
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri, Path("outputs"))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        print(f"kd.analysis.registry: no store at {uri}")
        return 2
    try:
        version = register_best(MlflowClient(tracking_uri=uri), args.experiment, args.name, args.metric, args.mode, args.sweep)
    except LookupError as err:
        print(f"kd.analysis.registry: {err} (experiment '{args.experiment}' in {uri})")
        return 2
    print(f"registered {args.name} version {version.version} from run {version.run_id}: {version.tags.get('kd.selected_by')}")
    if "kd.onnx" in version.tags:
        print(f"as an MLflow ONNX model: {version.tags['kd.onnx']}; load it with mlflow.pyfunc.load_model('models:/{args.name}/{version.version}')")
    print(f"reproduce: {version.tags.get('kd.command')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

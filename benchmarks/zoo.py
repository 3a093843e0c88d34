"""Step cost of every distillation method of the zoo against KD, same pair, side by side.

What is measured, on digits with student resnet8 <- teacher resnet20 (the issue's pair), for
every ``conf/distill/*.yaml`` built exactly as a run builds it (Hydra compose + instantiate, the
models' declared feature stages): the steady-state wall time of one training epoch through
Lightning (same student init, same data, first epoch dropped, methods interleaved round by round
with the references so a drifting machine affects all alike), and in a fresh subprocess per
method the peak resident memory (``ru_maxrss``) after a few epochs.

References, measured in the same rounds:

* ``kd online``: soft targets with the teacher run every step: what feature methods must beat
  within ``1.5x`` (they need the teacher's features, so cannot cache);
* ``kd cached``: soft targets with the teacher's logits looked up by sample index: what logit-only
  methods (DKD, DIST, CTKD, MLKD, LS) use where inputs are deterministic, target ``1.5x`` too.

Methods with a pre-training stage (FT's paraphraser, AB's initialisation) are timed twice: the
stage itself (``<name> stage 1``) and the main training (the stage skipped), reported separately.
CRD's ``nce_k`` is lowered to 512 (digits has ~1,100 training images; the CIFAR default is 16,384).

Ratios are medians of per-round ratios; absolute times are context only. Run on an otherwise
idle machine. Usage: ``.venv/bin/python benchmarks/zoo.py [--quick] [--only dkd crd ...]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd.data import DigitsDataModule
from kd.losses import Objective, SoftTargetKD
from kd.models import CIFARResNet
from kd.train.modules import DistillationModule
from feature_step import epoch_seconds  # benchmarks/ is on sys.path when run as a script
from kd_step import SGD, quiet

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGET = 1.5
OVERRIDES = {"crd": ["distill.terms.crd.nce_k=512"], "kd_crd": ["distill.terms.crd.nce_k=512"]}


def methods() -> list[str]:
    return sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if p.stem not in ("none", "kd"))


def objective_for(method: str, stage: str) -> Objective:
    """The objective ``distill=<method>`` builds; ``stage``: "main" skips a pre-training stage,
    "pre" keeps every epoch in it, "" leaves it as configured."""
    if method in ("kd online", "kd cached"):
        return SoftTargetKD()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"distill={method}", *OVERRIDES.get(method, [])])
    objective = instantiate(cfg.distill)
    for term in objective.terms.values():
        if stage == "main":
            term.pretrain_epochs = 0
        elif stage == "pre" and term.pretrain_epochs:
            term.pretrain_epochs = 10_000
    return objective


def build(method: str, stage: str, data: DigitsDataModule) -> DistillationModule:
    torch.manual_seed(0)
    shape, k = data.input_shape, data.num_classes
    student, teacher = CIFARResNet(k, shape, depth=8), CIFARResNet(k, shape, depth=20)
    objective = objective_for(method, stage)
    cache = data.train.x if method == "kd cached" or (method != "kd online" and not objective.needs_features) else None
    return DistillationModule(student, teacher, k, SGD, objective, shape, teacher_inputs=cache, num_samples=len(data.train.y))


def step_memory_mib(method: str, stage: str, data: DigitsDataModule) -> tuple[float, float]:
    """(MiB saved for the backward of one training step of 64 samples, MiB of the method's own state)."""
    module = build(method, stage, data)
    module.on_fit_start()  # the teacher-logit cache, where the row uses it
    module.objective.start_epoch(0, 10)
    x, y = data.train.x[:64], data.train.y[:64]
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.step_outputs(x, y, torch.arange(64))[0]
    loss.backward()
    own = sum(t.numel() * t.element_size() for t in [*module.objective.parameters(), *module.objective.buffers()])
    return sum(saved.values()) / 2**20, own / 2**20


def has_stage(method: str) -> bool:
    return objective_for(method, "").pretrain_epochs() > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and rounds")
    parser.add_argument("--only", nargs="+", help="these methods (conf/distill names) only")
    args = parser.parse_args()
    quiet()
    data = DigitsDataModule()
    data.setup("fit")

    print(f"machine: processor={platform.processor() or platform.machine()!r} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} load avg {os.getloadavg()[0]:.2f}")
    epochs, rounds = (2, 2) if args.quick else (4, 3)
    rows = [("kd online", ""), ("kd cached", "")]
    for method in args.only or methods():
        rows += [(method, "pre"), (method, "main")] if has_stage(method) else [(method, "")]
    times: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    for _ in range(rounds):  # interleaved: every row once per round
        for row in rows:
            times[row].append(epoch_seconds(build(*row, data), data, epochs))
    print(f"digits, student resnet8 <- teacher resnet20, batch {data.batch_size}, {epochs} epochs x {rounds} rounds")
    print(f"{'method':<18} {'teacher':>7} {'epoch ms':>9} {'vs kd online':>19} {'vs kd cached':>19} "
          f"{'saved MiB':>9} {'own MiB':>8}")  # fmt: skip
    missed = []
    for row in rows:
        method, stage = row
        module = build(method, stage, data)
        logits = module.cached_teacher_logits is not None or module._teacher_inputs is not None
        vs = {ref: [a / b for a, b in zip(times[row], times[(ref, "")])] for ref in ("kd online", "kd cached")}
        label = method + {"pre": " stage 1", "main": "", "": ""}[stage]
        cells = [f"{statistics.median(r):>6.2f}x [{min(r):.2f}-{max(r):.2f}]" for r in vs.values()]
        saved, own = step_memory_mib(method, stage, data)
        print(f"{label:<18} {'cached' if logits else 'online':>7} {statistics.median(times[row]) * 1e3:>9.1f} "
              f"{cells[0]:>19} {cells[1]:>19} {saved:>9.2f} {own:>8.2f}")  # fmt: skip
        reference = "kd cached" if logits else "kd online"
        if stage != "pre" and statistics.median(vs[reference]) > TARGET:
            missed.append(f"{label} ({statistics.median(vs[reference]):.2f}x {reference})")
    print(f"target <= {TARGET}x of KD with the same teacher access: {'ok' if not missed else 'MISSED: ' + ', '.join(missed)}")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""REPRODUCTIONS.md from the MLflow store: ``python -m kd.reproductions [--out REPRODUCTIONS.md]``.

Every ``conf/experiment/*.yaml`` with a ``reproduce`` block is one paper's table. The block holds
the facts about the paper (in one place): ``paper`` (the key runs are tagged with), ``title``,
``source``, ``commands`` (what produces each row), ``metrics`` (metric -> label), ``rows``
(setting -> the paper's numbers), optional ``references`` (a column label -> {setting: a published
number of a related setting}, e.g. the CIFAR-100 tables beside a small reproduction), ``claims``
and a ``note``. Runs carry the tags ``kd.paper`` and
``kd.setting`` (the row; ``reproduce.setting=...`` on the command line). For each row this reads
the FINISHED student runs, takes the mean and population std of each metric over seeds, and
puts the paper's number beside it; then it checks the claims:

- ``{metric, setting, vs, min_diff / max_diff}``: mean(setting) - mean(vs) within the bounds
  (``vs_metric``: compare with another metric of row ``vs``, e.g. int8 vs float accuracy);
- ``{metric, setting, min / max}``: mean(setting) within the bounds;
- ``{metric, setting, low, high_metric, min}``: the fraction of the gap between row ``low`` and
  ``high_metric`` (averaged over the setting's runs, e.g. ``teacher/test_acc``) that ``setting``
  closes, at least ``min``.

The verdict is "reproduced" when every claim holds, "partly" when some do, "not reproduced" when
none do, and "not run" while a row has no runs. The differences are printed with their standard
error over seeds, so a reader can see a claim that holds by less than the noise.

``--only EXPERIMENT ...`` regenerates just those sections and keeps every other section of the
existing file as it stands: the local store lives under ``outputs/``, which is never committed, so
a new machine (or a colleague) that re-runs one paper must not turn the other papers' tables into
"not run". Each section lists its own runs and wall time; the total sums the sections'.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kd.tracking.store import resolve_uri

CONF = Path(__file__).resolve().parents[2] / "conf" / "experiment"
EXPERIMENT = "reproductions"


def papers(conf: Path = CONF) -> list[dict[str, Any]]:
    """The ``reproduce`` blocks of the experiment files that have one, by file name, each with
    its file's name under ``experiment``."""
    found = []
    for path in sorted(conf.glob("*.yaml")):
        block = OmegaConf.load(path).get("reproduce")
        if block and block.get("paper"):
            found.append(OmegaConf.to_container(block) | {"experiment": path.stem})
    return found


def load_runs(client: MlflowClient, experiment: str = EXPERIMENT) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """FINISHED student runs tagged with a paper: ``{(paper, setting): [{metrics, seed, epochs, seconds}]}``."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    query = "tags.`kd.role` = 'student' and attributes.status = 'FINISHED'"
    token = None
    while True:
        page = client.search_runs([found.experiment_id], query, ViewType.ACTIVE_ONLY, 1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if "kd.paper" not in tags:
                continue
            runs[(tags["kd.paper"], tags["kd.setting"])].append({
                "metrics": run.data.metrics,
                "seed": run.data.params.get("seed"),
                "epochs": run.data.params.get("trainer.max_epochs"),
                "data": run.data.params.get("data._target_", "?").rsplit(".", 1)[-1].removesuffix("DataModule"),
                "seconds": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0,
            })  # fmt: skip
        token = page.token
        if not token:
            return runs


def _stats(runs: list[dict[str, Any]], metric: str) -> tuple[float, float, int] | None:
    values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
    return (statistics.fmean(values), statistics.pstdev(values), len(values)) if values else None


def _fmt(metric: str, value: float | None, scale: bool = True) -> str:
    if value is None:
        return "-"
    if "acc" in metric and scale:
        return f"{value:.2%}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def check(claim: dict[str, Any], rows: Any) -> tuple[bool | None, str]:
    """Whether ``claim`` holds on ``rows`` (a function: row name -> its runs; ``paper:setting``
    names another paper's row), and the numbers behind it; None when a row it needs has no runs."""
    metric, mine = claim["metric"], _stats(rows(claim["setting"]), claim["metric"])
    pct = 100.0 if "acc" in metric else 1.0
    unit = " points" if pct == 100.0 else ""
    if mine is None:
        return None, f"no runs of '{claim['setting']}'"
    if "vs" in claim:
        vs_metric = claim.get("vs_metric", metric)
        other = _stats(rows(claim["vs"]), vs_metric)
        if other is None:
            return None, f"no runs of '{claim['vs']}'"
        diff = mine[0] - other[0]
        se = math.sqrt(mine[1] ** 2 / mine[2] + other[1] ** 2 / other[2])
        holds = diff >= claim.get("min_diff", -math.inf) and diff <= claim.get("max_diff", math.inf)
        bounds = " and ".join(f"{op} {claim[k] * pct:+.3g}" for k, op in (("min_diff", ">="), ("max_diff", "<=")) if k in claim)
        names = (claim["setting"], claim["vs"]) if vs_metric == metric else (f"{claim['setting']} {metric}", f"{claim['vs']} {vs_metric}")
        return holds, f"{names[0]} - {names[1]} = {diff * pct:+.3g} ± {se * pct:.2g}{unit} (needs {bounds})"
    if "low" in claim:
        low = _stats(rows(claim["low"]), metric)
        high = _stats(rows(claim["setting"]), claim["high_metric"])
        if low is None or high is None:
            return None, f"no runs of '{claim['low']}' or no {claim['high_metric']}"
        if high[0] <= low[0]:  # nothing to close: the fraction would read backwards
            return False, f"{claim['high_metric']} ({_fmt(metric, high[0])}) is not above {claim['low']} ({_fmt(metric, low[0])}): no gap to close"
        closed = (mine[0] - low[0]) / (high[0] - low[0])
        return closed >= claim["min"], (f"{claim['setting']} closes {closed:.0%} of the gap from {claim['low']} "
                                        f"({_fmt(metric, low[0])}) to {claim['high_metric']} ({_fmt(metric, high[0])}) "
                                        f"(needs >= {claim['min']:.0%})")  # fmt: skip
    holds = mine[0] >= claim.get("min", -math.inf) and mine[0] <= claim.get("max", math.inf)
    bounds = " and ".join(f"{op} {_fmt(metric, claim[k])}" for k, op in (("min", ">="), ("max", "<=")) if k in claim)
    return holds, f"{claim['setting']}: {_fmt(metric, mine[0])} ± {_fmt(metric, mine[1])} (needs {bounds})"


def section(paper: dict[str, Any], runs: dict[tuple[str, str], list[dict[str, Any]]]) -> tuple[str, float]:
    """One paper's markdown section, and the wall seconds of its runs."""
    rows = {s: runs.get((paper["paper"], s), []) for s in paper["rows"]}
    metrics: dict[str, str] = paper["metrics"]
    lines = [f"## {paper['title']}", "", f"Paper: {paper['source']}. Config: `conf/experiment/{paper['experiment']}.yaml`.", ""]
    lines += ["```bash", *paper["commands"], "```", ""]
    references: dict[str, dict[str, float]] = paper.get("references") or {}  # published numbers of other settings
    header = ["setting", "runs (seeds)", "data, epochs"] + [cell for label in metrics.values() for cell in (f"{label}: ours", "paper")]
    header += list(references)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, members in rows.items():
        seeds = ",".join(sorted({str(r["seed"]) for r in members})) or "-"
        where = ", ".join(sorted({f"{r['data']} {r['epochs']}" for r in members})) or "-"
        cells = [setting, f"{len(members)} ({seeds})", where]
        for metric in metrics:
            stats = _stats(members, metric)
            ours = f"{_fmt(metric, stats[0])} ± {_fmt(metric, stats[1])}" if stats else "-"
            cells.append(f"{ours} | {_fmt(metric, paper['rows'][setting].get(metric))}")
        cells += [_fmt("acc", table.get(setting)) for table in references.values()]
        lines.append("| " + " | ".join(cells) + " |")
    def lookup(name: str) -> list[dict[str, Any]]:
        key = tuple(name.split(":", 1)) if ":" in name else (paper["paper"], name)
        return runs.get(key, [])  # type: ignore[arg-type]

    results = [(claim, *check(claim, lookup)) for claim in paper.get("claims", [])]
    lines += ["", "Claims:"]
    for claim, holds, why in results:
        mark = {True: "holds", False: "does NOT hold", None: "not run"}[holds]
        lines.append(f"- {claim['text']}: **{mark}**; {why}.")
    decided = [h for _, h, _ in results if h is not None]
    if not decided:
        verdict = "not run (no claim has the runs it needs yet)"
    else:  # judged on the claims that could be checked; the others say which rows are missing
        verdict = "reproduced" if all(decided) else "partly reproduced" if any(decided) else "not reproduced"
        if len(decided) < len(results):
            verdict += f" on the {len(decided)} of {len(results)} claims whose rows were run"
    seconds = sum(r["seconds"] for members in rows.values() for r in members)
    lines += ["", f"**Verdict: {verdict}.** Wall time of these runs: {seconds / 60:.1f} min.", ""]
    if paper.get("note"):
        lines += [paper["note"].strip(), ""]
    return "\n".join(lines), seconds


WALL = re.compile(r"Wall time of these runs: ([0-9.]+) min\.")
CONFIG = re.compile(r"Config: `conf/experiment/([^`]+)\.yaml`")


def kept_sections(text: str) -> dict[str, tuple[str, float]]:
    """The sections of an existing REPRODUCTIONS.md by experiment name (their ``Config:`` line),
    each with its wall seconds as printed."""
    found = {}
    for chunk in text.split("\n## ")[1:]:
        name, wall = CONFIG.search(chunk), WALL.search(chunk)
        if name:
            found[name.group(1)] = ("## " + chunk.rstrip("\n") + "\n", float(wall.group(1)) * 60 if wall else 0.0)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.reproductions", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=None, help="tracking URI (default: as a run resolves it)")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default: {EXPERIMENT})")
    parser.add_argument("--out", type=Path, default=Path("REPRODUCTIONS.md"))
    parser.add_argument("--conf", type=Path, default=CONF, help="folder of the experiment configs (default: conf/experiment)")
    parser.add_argument("--only", nargs="+", metavar="EXPERIMENT", default=None,
                        help="regenerate only these experiments' sections (config names); keep the others from --out")  # fmt: skip
    args = parser.parse_args(argv)
    known = [paper["experiment"] for paper in papers(args.conf)]
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"--only: no reproduce block in {', '.join(unknown)} (experiments with one: {', '.join(known)})")
    if args.only and not args.out.exists():
        parser.error(f"--only keeps the other sections of {args.out}, which does not exist (run without --only)")
    kept = kept_sections(args.out.read_text()) if args.only else {}
    uri = resolve_uri(args.uri, Path("outputs"))
    present = not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()
    runs = load_runs(MlflowClient(tracking_uri=uri), args.experiment) if present else {}
    sections, total, reused = [], 0.0, 0
    for paper in papers(args.conf):
        keep = args.only is not None and paper["experiment"] not in args.only and paper["experiment"] in kept
        text, seconds = kept[paper["experiment"]] if keep else section(paper, runs)
        sections.append(text)
        total, reused = total + seconds, reused + keep
    head = [
        "# Reproductions",
        "",
        "Generated from the MLflow store by `python -m kd.reproductions` (do not edit by hand: change the "
        "`reproduce` block of the experiment config, re-run, regenerate; `--only EXPERIMENT` regenerates one "
        "section and keeps the others, so sections may come from different stores). Ours: mean ± population std over "
        "seeds of the test accuracy of the validation-selected epoch. Fashion-MNIST (offline here) is harder "
        "than the papers' MNIST: compare effects (signs and relative sizes), not digits.",
        "",
        f"Total wall time of the runs below on this 2-core CPU: {total / 60:.1f} min.",
        "",
    ]
    args.out.write_text("\n".join(head + sections))
    print(f"wrote {args.out}: {len(sections) - reused} of {len(sections)} papers from {sum(len(v) for v in runs.values())} "
          f"runs in {uri}" + (f", {reused} kept as they were" if reused else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

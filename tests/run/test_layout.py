"""The dependency rules of the layout (docs/extending.md), read from the code's own imports: they
hold because a test fails when someone breaks them, not because a page says so."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every import of a file."""
    tree = ast.parse(path.read_text())
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)) and n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in nested))
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_kd_imports_callbacks_only_in_the_orchestrator():
    importers = {p.relative_to(ROOT).as_posix() for p in _sources("kd") for m, _ in _imports(p) if m.split(".")[0] == "callbacks"}
    assert importers == {"kd/run/experiment.py", "kd/run/export.py"}  # the run, and the export of a finished run's int8 model


def test_no_library_module_imports_kd_or_callbacks_inside_a_function():
    # function-local imports of our own modules are how a cycle hides; only run.py defers one (fast --help),
    # and the quantization flows defer PT2E's module (torchao's import costs a run that does not quantize 2.5 s)
    local = [(p.relative_to(ROOT).as_posix(), m) for folder in ("kd", "callbacks") for p in _sources(folder)
             for m, inside in _imports(p) if inside and m.split(".")[0] in ("kd", "callbacks")]  # fmt: skip
    assert local == [("callbacks/quant_engine.py", "callbacks")]


def test_the_analysis_reads_the_store_not_the_training_code():
    allowed = ("kd.analysis", "kd.tracking")
    used = {m for p in _sources("kd/analysis") for m, _ in _imports(p) if m.startswith("kd")}
    assert used and all(m.startswith(allowed) for m in used), used


def test_the_run_and_the_generic_stage_code_spell_metric_families_through_the_schema():
    # the orchestrator and the generic stage code use kd.tracking.keys, never a literal family prefix
    for path in (ROOT / "kd/run/experiment.py", ROOT / "kd/run/compress.py", ROOT / "callbacks/base.py", ROOT / "callbacks/factorize.py"):
        text = path.read_text()
        for family in ("dense/", "model/", "teacher/", "factorize/"):
            assert f'"{family}' not in text and f"f\"{family}" not in text, (path.name, family)

"""The report's tables (kd/analysis/tables.py) from hand-made summary rows."""

from __future__ import annotations

import csv

from kd.analysis.tables import NOTE, table_rows, write_csv, write_markdown


def _row(**values):
    base = {"objective": "kd", "compression": "none", "config": {"distill.temperature": "4.0", "seed": "0"}, "n": 3,
            "mean": 0.9512, "std": 0.0123, "val/acc_best_mean": 0.9, "val/acc_best_std": 0.01, "val/acc_last_mean": 0.88,
            "val/acc_last_std": 0.02, "nonzero_params": 2410, "teacher/test_acc": 0.9833, "teacher": "20997e235172bab36123"}  # fmt: skip
    return base | values


def test_the_comparison_table_names_the_differing_keys_and_gives_mean_and_std():
    header, rows = table_rows([_row(), _row(objective="ce", n=1, config={"distill.temperature": "8", "seed": "0"}, **{"teacher/test_acc": None})],
                              "test/acc", ["distill.temperature"])  # fmt: skip
    assert header == ["distill.temperature", "n", "test/acc mean ± std", "val acc, best epoch", "val acc, last epoch", "non-zero params", "teacher test acc"]
    assert rows[0] == ["4", "3", "95.12% ± 1.23%", "90.00% ± 1.00%", "88.00% ± 2.00%", "2410", "98.33% (20997e23)"]
    assert rows[1] == ["8", "1", "95.12%", "90.00%", "88.00%", "2410", "-"]  # one run: no ± ; no teacher: "-"
    _, (two,) = table_rows([_row(n=2)], "test/acc", ["seed"])
    assert two[2:5] == ["95.12% ± 1.23%", "90.00% ± 1.00%", "88.00% ± 2.00%"]  # two runs: a spread


def test_without_differing_keys_the_table_names_objective_and_compression():
    header, rows = table_rows([_row(objective="ce", compression="prune agp s=0.9", n=1, **{"val/acc_best_mean": None})], "val/acc_best", [])
    assert header[:2] == ["objective", "compression"]
    assert rows[0][:4] == ["ce (no teacher)", "prune agp s=0.9", "1", "95.12%"] and rows[0][4] == "-"


def test_values_that_are_not_accuracies_are_shown_as_numbers():
    _, rows = table_rows([_row(mean=0.1 + 0.2, std=0.25, nonzero_params=None)], "model/params", ["seed"])
    assert rows[0][:3] == ["0", "3", "0.3 ± 0.25"] and rows[0][5] == "-"  # %g: 0.3, not 0.30000000000000004
    _, rows = table_rows([_row(nonzero_params=2410.0)], "test/acc", ["seed"])
    assert rows[0][5] == "2410"  # MLflow's metrics are floats; a count is shown as one
    _, rows = table_rows([_row(mean=None, n=1)], "test/acc", ["seed"])
    assert rows[0][2] == "-"
    _, rows = table_rows([_row(mean=7, n=1)], "test/acc", ["seed"])
    assert rows[0][2] == "7"  # an int as written


def test_csv_drops_the_raw_params_and_writes_empty_cells_for_missing_values(tmp_path):
    path = tmp_path / "t.csv"
    write_csv(path, [{"a": 1, "b": None, "_params": {"x": 1}, "config": {}}, {"b": 0.5, "a": 2, "_params": {}, "config": {}}])
    with path.open() as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", ""], ["2", "0.5"]]  # the columns of the first row, in its order
    write_csv(path, [{"only": 3}])
    assert path.read_bytes() == b"only\r\n3\r\n"  # one row: its columns; csv's own line ends


def test_markdown_is_a_pipe_table_with_the_selection_note():
    text = write_markdown(["k", "n"], [["4", "3"], ["8", "1"]], "test/acc")
    assert text == "| k | n |\n|---|---|\n| 4 | 3 |\n| 8 | 1 |\n\ntest/acc: " + NOTE + ".\n"
    assert "validation" in NOTE and "ddof=0" in NOTE

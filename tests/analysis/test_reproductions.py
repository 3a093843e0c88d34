"""REPRODUCTIONS.md generation: claims checked against hand-made run statistics, and a whole
file written from a store holding tagged runs."""

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.analysis.reproductions import check, main, papers


def _runs(*values: float, metric: str = "test/acc", **extra: float) -> list[dict]:
    return [{"metrics": {metric: v, **extra}, "seed": i, "epochs": "5", "data": "Digits", "seconds": 60.0} for i, v in enumerate(values)]


ROWS = {"a": _runs(0.90, 0.92), "b": _runs(0.85, 0.87, **{"teacher/test_acc": 0.95}), "c": _runs(0.80, 0.80)}


def lookup(name: str) -> list[dict]:
    return ROWS.get(name, [])


def test_a_difference_claim_reports_the_difference_and_its_standard_error():
    holds, why = check({"metric": "test/acc", "setting": "a", "vs": "b", "min_diff": 0.04}, lookup)
    se = math.sqrt(0.01**2 / 2 + 0.01**2 / 2) * 100  # population std 0.01 in both rows
    assert holds and f"a - b = +5 ± {se:.2g} points" in why
    assert check({"metric": "test/acc", "setting": "a", "vs": "b", "min_diff": 0.06}, lookup)[0] is False
    assert check({"metric": "test/acc", "setting": "b", "vs": "a", "max_diff": 0.0}, lookup)[0] is True


def test_bounds_gap_and_missing_rows():
    assert check({"metric": "test/acc", "setting": "c", "min": 0.8}, lookup)[0] is True
    assert check({"metric": "test/acc", "setting": "c", "max": 0.79}, lookup)[0] is False
    # b closes (0.86 - 0.80) / (0.95 - 0.80) = 40% of the gap from c to its teacher
    holds, why = check({"metric": "test/acc", "setting": "b", "low": "c", "high_metric": "teacher/test_acc", "min": 0.5}, lookup)
    assert holds is False and "closes 40% of the gap" in why
    # a "teacher" below the low row leaves no gap: the claim fails instead of reading the fraction backwards
    holds, why = check({"metric": "test/acc", "setting": "c", "low": "a", "high_metric": "teacher/test_acc", "min": 0.5},
                       lambda name: {"c": _runs(0.8, **{"teacher/test_acc": 0.85}), "a": ROWS["a"]}[name])  # fmt: skip
    assert holds is False and "no gap to close" in why
    assert check({"metric": "test/acc", "setting": "zzz", "min": 0.5}, lookup)[0] is None
    assert check({"metric": "test/acc", "setting": "a", "vs": "zzz", "min_diff": 0.0}, lookup)[0] is None


def test_every_committed_reproduction_config_is_well_formed():
    found = papers()
    assert {p["paper"] for p in found} >= {"han2015_lenet300", "deep_compression_lenet300", "hinton2015_mlp"}
    for paper in found:
        assert paper["title"] and paper["source"] and paper["commands"] and paper["rows"], paper["experiment"]
        for claim in paper["claims"]:
            assert claim["setting"] in paper["rows"], (paper["experiment"], claim)
            assert {"vs", "min", "max", "low"} & set(claim), claim
            assert ":" in claim.get("vs", "") or claim.get("vs", claim["setting"]) in paper["rows"], claim


def _toy_conf(tmp_path: Path, *names: str) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    for name in names:
        (conf / f"{name}.yaml").write_text(
            f"# @package _global_\nreproduce:\n  paper: {name}\n  setting: big\n  title: Paper {name}\n  source: Toy 2020\n"
            f"  commands: [python run.py experiment={name}]\n  metrics: {{test/acc: test acc}}\n"
            "  rows: {small: {test/acc: 0.5}, big: {test/acc: 0.9}}\n"
            "  claims: [{text: big beats small, metric: test/acc, setting: big, vs: small, min_diff: 0.0}]\n"
            "  note: A toy.\n"
        )
    return conf


def _store(path: Path, paper: str, rows: dict[str, list[float]], failed: bool = False) -> str:
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name("reproductions")
    exp = found.experiment_id if found else client.create_experiment("reproductions")
    for setting, accs in rows.items():
        for seed, acc in enumerate(accs):
            run = client.create_run(exp, tags={"kd.role": "student", "kd.paper": paper, "kd.setting": setting})
            client.log_param(run.info.run_id, "seed", seed)
            client.log_metric(run.info.run_id, "test/acc", acc)
            client.set_terminated(run.info.run_id, "FINISHED")
    if failed:
        run = client.create_run(exp, tags={"kd.role": "student", "kd.paper": paper, "kd.setting": "big"})
        client.log_metric(run.info.run_id, "test/acc", 0.0)
        client.set_terminated(run.info.run_id, "FAILED")  # never counted
    return uri


def test_the_file_is_written_from_the_store(tmp_path):
    conf = _toy_conf(tmp_path, "toy")
    uri = _store(tmp_path / "mlflow.db", "toy", {"small": [0.6, 0.62], "big": [0.8, 0.84]}, failed=True)
    out = tmp_path / "REPRODUCTIONS.md"
    assert main(["--uri", uri, "--out", str(out), "--conf", str(conf)]) == 0
    text = out.read_text()
    assert "## Paper toy" in text and "python run.py experiment=toy" in text
    assert "| big | 2 (0,1) |" in text and "82.00% ± 2.00% | 90.00%" in text and "61.00% ± 1.00% | 50.00%" in text
    assert "big beats small: **holds**" in text and "**Verdict: reproduced.**" in text and "A toy." in text


def test_reference_columns_show_published_numbers_of_related_settings(tmp_path):
    conf = _toy_conf(tmp_path, "toy")
    text = (conf / "toy.yaml").read_text().replace("  note:", "  references: {CIFAR-100: {big: 0.7551}, other: {small: 0.5}}\n  note:")
    (conf / "toy.yaml").write_text(text)
    uri = _store(tmp_path / "mlflow.db", "toy", {"small": [0.6], "big": [0.8]})
    out = tmp_path / "R.md"
    assert main(["--uri", uri, "--out", str(out), "--conf", str(conf)]) == 0
    lines = out.read_text().splitlines()
    assert "| setting | runs (seeds) | data, epochs | test acc: ours | paper | CIFAR-100 | other |" in lines
    assert any(line.startswith("| big |") and line.endswith("| 90.00% | 75.51% | - |") for line in lines)
    assert any(line.startswith("| small |") and line.endswith("| 50.00% | - | 50.00% |") for line in lines)


def test_a_verdict_judges_the_claims_that_were_run_and_says_how_many(tmp_path):
    conf = _toy_conf(tmp_path, "toy")
    text = (conf / "toy.yaml").read_text().replace(
        "  claims: [", "  claims: [{text: big beats huge, metric: test/acc, setting: big, vs: huge, min_diff: 0.0}, ")
    (conf / "toy.yaml").write_text(text.replace("big: {test/acc: 0.9}}", "big: {test/acc: 0.9}, huge: {}}"))
    out = tmp_path / "R.md"
    for rows, verdict in (({"small": [0.6], "big": [0.8]}, "reproduced on the 1 of 2 claims whose rows were run"),
                          ({"small": [0.9], "big": [0.8]}, "not reproduced on the 1 of 2 claims whose rows were run"),
                          ({}, "not run (no claim has the runs it needs yet)")):  # fmt: skip
        db = tmp_path / f"{len(rows)}-{rows.get('small')}.db"
        uri = _store(db, "toy", rows) if rows else f"sqlite:///{db}"
        assert main(["--uri", uri, "--out", str(out), "--conf", str(conf)]) == 0
        text = out.read_text()
        assert f"**Verdict: {verdict}.**" in text and "big beats huge: **not run**; no runs of '" in text


def test_only_regenerates_the_named_section_and_keeps_the_others(tmp_path):
    conf = _toy_conf(tmp_path, "one", "two")
    out = tmp_path / "REPRODUCTIONS.md"
    first = _store(tmp_path / "first.db", "one", {"small": [0.6], "big": [0.8]})
    _store(tmp_path / "first.db", "two", {"small": [0.7], "big": [0.75]})
    assert main(["--uri", first, "--out", str(out), "--conf", str(conf)]) == 0
    before = out.read_text()
    two = before[before.index("## Paper two"):]
    assert "75.00% ± 0.00%" in two and "Total wall time" in before
    # a new machine's store holds only paper one's runs, with other numbers
    second = _store(tmp_path / "second.db", "one", {"small": [0.65], "big": [0.6]})
    assert main(["--uri", second, "--out", str(out), "--conf", str(conf), "--only", "one"]) == 0
    after = out.read_text()
    assert after.endswith(two) and after.count("## Paper") == 2  # paper two's section kept, byte for byte
    one = after[after.index("## Paper one"):after.index("## Paper two")]
    assert "60.00% ± 0.00%" in one and "**does NOT hold**" in one and "80.00%" not in one
    # without --only the second store has nothing for paper two
    assert main(["--uri", second, "--out", str(out), "--conf", str(conf)]) == 0
    assert "no runs of" in out.read_text().split("## Paper two")[1]
    with pytest.raises(SystemExit) as bad:  # a typo must not silently regenerate nothing
        main(["--uri", second, "--out", str(out), "--conf", str(conf), "--only", "three"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit):  # nothing to keep: the others would all read "not run"
        main(["--uri", second, "--out", str(tmp_path / "missing.md"), "--conf", str(conf), "--only", "one"])
    assert not (tmp_path / "missing.md").exists()


def test_an_empty_store_says_not_run(tmp_path):
    out = tmp_path / "R.md"
    assert main(["--uri", f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out)]) == 0
    assert "not run" in out.read_text() and not (tmp_path / "none.db").exists()


def test_a_run_is_tagged_with_its_paper_and_row_but_not_the_papers_facts(make_cfg):
    from kd.run.experiment import run

    cfg = make_cfg("reproduce.paper=toy", "reproduce.setting=small+fast", "+reproduce.rows={small+fast: {test/acc: 0.5}}")
    run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.paths.output_root) / 'mlflow.db'}")
    (student,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.role` = 'student'")
    assert student.data.tags["kd.paper"] == "toy" and student.data.tags["kd.setting"] == "small+fast"
    assert student.data.params["reproduce.setting"] == "small+fast"
    assert not any(k.startswith("reproduce.rows") for k in student.data.params)  # a '+' there is no valid param key

"""bench/matrix.py, the one driver of PruneJob matrices: every cell is a real `selfpruner run` on a
tiny model, the report has a row per allocation with each held-out text, and a rerun reads
finished cells back instead of evaluating them again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import matrix  # noqa: E402


def test_a_two_by_one_matrix_runs_every_cell_and_reports_every_allocation(tiny_job, tmp_path, capsys):
    doc = tiny_job("base", search={"strategy": "owl", "baselines": ["uniform"]})
    extra = tmp_path / "other.txt"
    extra.write_text(open(doc["spec"]["fitness"]["heldOutText"]).read()[::-1])
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(doc))
    work = tmp_path / "matrix"
    args = ["--base", str(base), "--axis", "target.ratio=0.2,0.4", "--set", f"fitness.heldOutTexts=[{extra}]",
            "--workdir", str(work), "--jobs", "2"]
    assert matrix.main(args) == 0
    report = json.loads((work / "matrix.json").read_text())
    assert report["unfinished"] == []
    assert report["held_out_texts"] == [doc["spec"]["fitness"]["heldOutText"], str(extra)]
    rows = report["rows"]
    assert [(r["target.ratio"], r["allocation"]) for r in rows] == [
        (0.2, "dense"), (0.2, "uniform"), (0.2, "searched"), (0.4, "dense"), (0.4, "uniform"), (0.4, "searched")]
    for r in rows:
        result = json.loads((work / r["cell"] / "result.json").read_text())
        assert result["target_ratio"] == r["target.ratio"]
        assert len(r["held_out"]) == 2 and r["geometric_mean"] == pytest.approx(
            (r["held_out"][0] * r["held_out"][1]) ** 0.5)
    dense = [r for r in rows if r["allocation"] == "dense"]
    assert all(r["vs_dense"] == pytest.approx(1.0) for r in dense)
    pruned = {(r["target.ratio"], r["allocation"]): r["vs_dense"] for r in rows if r["allocation"] != "dense"}
    assert all(v > 1.0 for v in pruned.values())  # pruning a trained-on-nothing model still costs perplexity
    md = (work / "matrix.md").read_text()
    assert "| target.ratio | allocation | fitness | held-out 1 | held-out 2 | geo-mean | × dense |" in md

    # a rerun evaluates nothing: every cell is read back
    capsys.readouterr()
    assert matrix.main(args) == 0
    assert capsys.readouterr().out.count("done before") == 2

    # the searched row says what its search cost and where it started
    searched = [r for r in rows if r["allocation"] == "searched"]
    for r in searched:
        result = json.loads((work / r["cell"] / "result.json").read_text())
        assert r["evaluations"] == result["cost"]["evaluations"] and r["initial_best"] == result["best_per_generation"][0]
    # mean ± sd over an axis: one row per allocation, over both cells
    assert matrix.main(args + ["--report-only", "--group", "target.ratio"]) == 0
    summary = json.loads((work / "matrix.json").read_text())["groups"]
    assert [(g["allocation"], g["n"]) for g in summary] == [("dense", 2), ("uniform", 2), ("searched", 2)]
    assert summary[2]["fitness"] == pytest.approx((searched[0]["fitness"] + searched[1]["fitness"]) / 2)
    assert summary[2]["fitness_sd"] == pytest.approx(abs(searched[0]["fitness"] - searched[1]["fitness"]) / 2 ** 0.5)
    assert "mean ± sd over target.ratio:" in (work / "matrix.md").read_text()
    with pytest.raises(SystemExit, match="not one of the axes"):
        matrix.main(args + ["--report-only", "--group", "search.seed"])


def test_two_cells_with_one_name_are_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
                                    "metadata": {"name": "b"}, "spec": {"model": {"source": "demo"}}}))
    with pytest.raises(SystemExit, match="both named"):
        matrix.cells(matrix.parse_args(["--base", str(base), "--axis", "calibration.text=a/x.txt,b/x.txt",
                                        "--workdir", str(tmp_path / "w")]))


def test_keys_joined_by_plus_take_one_value_in_every_cell(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
                                    "metadata": {"name": "b"}, "spec": {"model": {"source": "demo"}}}))
    out = matrix.cells(matrix.parse_args(["--base", str(base), "--axis", "search.seed+llm.seed=0,2",
                                          "--axis", "target.ratio=0.3", "--workdir", str(tmp_path / "w")]))
    assert [name for name, _, _ in out] == ["seed-0-ratio-0-3", "seed-2-ratio-0-3"]
    assert [(d["spec"]["search"]["seed"], d["spec"]["llm"]["seed"]) for _, _, d in out] == [(0, 0), (2, 2)]


def test_a_cell_whose_shared_gpu_ran_out_of_memory_is_rerun_and_resumes(tiny_job, tmp_path, monkeypatch, capsys):
    """Cells sharing one GPU: one starts while the others fill it, and its model does not fit. Its
    run exits 3 (device failed or full, resumable); the driver waits and reruns it, and the cell
    finishes. The failing GPU is injected into the child processes (tests/device_faults: torch's
    OutOfMemoryError on the first model load); everything else is a real `selfpruner run`."""
    doc = tiny_job("shared", search={"strategy": "owl", "baselines": []})
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(doc))
    work = tmp_path / "matrix"
    faults = Path(__file__).resolve().parent / "device_faults"
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(faults), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SELFPRUNER_TEST_OOM_LOADS", "1")
    monkeypatch.setenv("SELFPRUNER_TEST_OOM_COUNT", str(tmp_path / "oom-count"))
    args = ["--base", str(base), "--workdir", str(work), "--retry-wait", "0"]
    assert matrix.main(args + ["--device-retries", "0"]) == 0  # no rerun: the cell stays failed
    assert "base: failed (3)" in capsys.readouterr().out  # a matrix without axes: one cell, "base"
    log = (work / "base.log").read_text()
    assert "selfpruner: error: the device failed while loading" in log and "Traceback" not in log
    (tmp_path / "oom-count").write_text("0")  # the GPU is full again for the next start
    assert matrix.main(args + ["--device-retries", "2"]) == 0
    assert "base: finished after 1 rerun(s)" in capsys.readouterr().out
    assert "rerun 1 of 2" in (work / "base.log").read_text()
    assert json.loads((work / "matrix.json").read_text())["unfinished"] == []

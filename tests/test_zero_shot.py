"""Zero-shot accuracy through lm-evaluation-harness itself, on local copies of the paper's
seven tasks: our scores equal lm-eval's own command line on the same data, and a search
scores dense, baselines and best, in memory, as the exported checkpoint scores."""

import json
import os
import subprocess
import sys

import pytest

from selfpruner import model_source, spec, zero_shot
from selfpruner.errors import UserError
from selfpruner.search import report
from test_search import run

LIMIT = 4


def test_task_names_are_checked_before_anything_loads():
    assert zero_shot.parse_tasks("paper") == list(zero_shot.PAPER_TASKS)
    assert zero_shot.parse_tasks(["piqa", "paper"])[0] == "piqa" and len(zero_shot.parse_tasks("piqa,paper")) == 7
    with pytest.raises(UserError, match="'squad' has no offline data; use any of boolq"):
        zero_shot.parse_tasks("boolq,squad")


def test_a_prunejob_naming_an_unknown_task_is_refused_in_one_line(tiny_job):
    doc = tiny_job("bad-task", search={"zeroShotTasks": ["squad"]})
    with pytest.raises(UserError) as e:
        spec.parse(doc)
    assert "zeroShotTasks" in str(e.value) and "squad" in str(e.value) and "\n" not in str(e.value)


def test_the_local_data_is_the_seven_validation_splits(task_data):
    import datasets

    sizes = {t: len(datasets.load_from_disk(str(task_data / folder / "validation")))
             for t, (folder, _, _) in zero_shot.TASKS.items()}
    assert sizes == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
                     "arc_challenge": 299, "openbookqa": 500}


def test_a_search_scores_dense_baselines_and_best_as_their_checkpoints_score(tiny_job, task_data):
    doc = tiny_job("zero-shot", search={"strategy": "genetic", "baselines": ["uniform"],
                                        "zeroShotTasks": ["arc_easy", "boolq"], "zeroShotLimit": LIMIT})
    result = run(doc)
    zs = result["zero_shot"]
    assert set(zs["table"]["rows"]) == {"dense", "best", "uniform"}
    assert zs["table"]["tasks"] == ["arc_easy", "boolq"] and zs["table"]["limit"] == LIMIT
    for name, scores in zs["models"].items():
        for task, s in scores.items():
            assert s["documents"] == LIMIT and 0.0 <= s["accuracy"] <= 1.0
            assert s["accuracy"] == s["metrics"][zero_shot.HEADLINE.get(task, "acc_norm")]
    assert zs["table"]["rows"]["dense"]["mean_drop"] == 0.0
    # the in-memory (sliced) best scores exactly as its exported checkpoint, loaded afresh
    loaded = model_source.load(result["checkpoint"])
    again = zero_shot.evaluate(loaded.model, loaded.tokenizer, ["arc_easy", "boolq"], limit=LIMIT, device="cpu")
    assert {t: s["metrics"] for t, s in again.items()} == {t: s["metrics"] for t, s in zs["models"]["best"].items()}
    table = report.summary_table(result)
    assert "zero-shot accuracy (%), first 4 documents per task" in table and "| uniform |" in table


@pytest.mark.slow
def test_our_scores_equal_lm_evals_own_run_on_the_same_local_data(task_data, tmp_path):
    """The demo model, dense: `selfpruner eval --tasks` against `lm_eval run --include_path`."""
    tasks = "arc_easy,piqa,winogrande"  # the short ones: both runs load the model, which dominates
    ours = tmp_path / "ours.json"
    cli = [sys.executable, "-m", "selfpruner.cli", "eval", "--tasks", tasks, "--limit", str(LIMIT), "--device", "cpu",
           "--output", str(ours)]
    subprocess.run(cli, check=True, capture_output=True, text=True)
    folder, _ = model_source.resolve("demo")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    theirs = tmp_path / "lm-eval"
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                    f"pretrained={folder},dtype=float32", "--tasks", tasks, "--include_path", str(zero_shot.task_dir()),
                    "--limit", str(LIMIT), "--batch_size", "8", "--device", "cpu", "--output_path", str(theirs)],
                   check=True, capture_output=True, text=True, env=env)
    [path] = theirs.rglob("results_*.json")
    reference = json.loads(path.read_text())["results"]
    scores = json.loads(ours.read_text())["models"]["demo"]
    for task in tasks.split(","):
        want = {k.split(",")[0]: v for k, v in reference[task].items() if k in ("acc,none", "acc_norm,none")}
        assert scores[task]["metrics"] == pytest.approx(want, abs=1e-12), task

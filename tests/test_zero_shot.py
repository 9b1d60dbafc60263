"""Zero-shot accuracy through lm-evaluation-harness itself, on local copies of the paper's
seven tasks: our scores equal lm-eval's own command line on the same data, and a search
scores dense, baselines and best, in memory, as the exported checkpoint scores."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import char_tokenizer, tiny_model
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
                                        "zeroShotTasks": ["arc_easy", "boolq"], "zeroShotLimit": LIMIT,
                                        "zeroShotBatchSize": 2})
    result = run(doc)
    zs = result["zero_shot"]
    assert set(zs["table"]["rows"]) == {"dense", "best", "uniform"}
    assert zs["table"]["tasks"] == ["arc_easy", "boolq"] and zs["table"]["limit"] == LIMIT
    assert zs["table"]["batch_size"] == 2
    for name, scores in zs["models"].items():
        for task, s in scores.items():
            assert s["documents"] == LIMIT and 0.0 <= s["accuracy"] <= 1.0
            assert s["accuracy"] == s["metrics"][zero_shot.HEADLINE.get(task, "acc_norm")]
    assert zs["table"]["rows"]["dense"]["mean_drop"] == 0.0
    # the in-memory (sliced) best scores exactly as its exported checkpoint, loaded afresh
    loaded = model_source.load(result["checkpoint"])
    again = zero_shot.evaluate(loaded.model, loaded.tokenizer, ["arc_easy", "boolq"], limit=LIMIT, batch_size=2,
                               device="cpu")
    assert {t: s["metrics"] for t, s in again.items()} == {t: s["metrics"] for t, s in zs["models"]["best"].items()}
    table = report.summary_table(result)
    assert "zero-shot accuracy (%), first 4 documents per task" in table and "| uniform |" in table


def test_a_gpu_failing_in_the_zero_shot_step_stops_the_run_and_the_same_command_does_only_that_step(
        tiny_job, task_data, monkeypatch):
    """The last step's device failure (CUDA out of memory while another process fills a shared GPU)
    was recorded in result.json like any error, and the table was lost for good: the run stops
    instead, saying so, with the search kept; run again, with a smaller zero-shot batch (an OOM may
    be the batch's own), it scores the models and evaluates no candidate again. This machine has no
    GPU: torch's own OutOfMemoryError is raised where lm-eval would meet it, once."""
    import lm_eval

    from selfpruner.errors import DeviceFailed
    from test_search import history

    doc = tiny_job("zero-shot-oom", search={"strategy": "genetic", "baselines": [],
                                            "zeroShotTasks": ["arc_easy"], "zeroShotLimit": LIMIT})
    real, calls = lm_eval.simple_evaluate, []

    def on_a_full_gpu(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB. GPU 0 has a total "
                                         "capacity of 79.18 GiB of which 1.02 GiB is free.")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", on_a_full_gpu)
    with pytest.raises(DeviceFailed, match=r"during the zero-shot tasks \(OutOfMemoryError: CUDA out of memory.*"
                                           r"smaller search.zeroShotBatchSize"):
        run(doc)
    out = doc["spec"]["output"]["path"]
    assert not os.path.exists(f"{out}/result.json")
    evaluated = history(doc)
    doc["spec"]["search"]["zeroShotBatchSize"] = 2
    result = run(doc)
    assert set(result["zero_shot"]["table"]["rows"]) == {"dense", "best"} and "error" not in result["zero_shot"]
    assert result["zero_shot"]["table"]["batch_size"] == 2
    assert history(doc) == evaluated  # the search was not run again
    doc["spec"]["search"]["population"] = 5  # a field the search reads still refuses the folder
    with pytest.raises(UserError, match="different"):
        run(doc)



def test_weights_scored_before_are_read_back_and_changed_weights_are_scored_again(task_data, monkeypatch):
    """The dense model and the baselines are the same in every PruneJob of a model: their scores
    come from the cache, keyed by the weights as applied, never by a name."""
    import lm_eval

    model, tok = tiny_model("llama-gqa"), char_tokenizer()
    first = zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu", cache=True)
    s = first["arc_easy"]
    # lm-eval's closed-form standard error of a mean of 0/1 scores
    assert s["stderr"] == pytest.approx(math.sqrt(s["accuracy"] * (1 - s["accuracy"]) / (LIMIT - 1)))

    def scored_again(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(lm_eval, "simple_evaluate", scored_again)  # lm-eval is what must not run again
    assert zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu", cache=True) == first
    for other in ({"limit": LIMIT + 1}, {"batch_size": 4}, {"tasks": ["arc_easy", "piqa"]}):
        with pytest.raises(AssertionError, match="scored again"):
            zero_shot.evaluate(model, tok, **{"tasks": ["arc_easy"], "limit": LIMIT, "device": "cpu", "cache": True,
                                              **other})
    with pytest.raises(AssertionError, match="scored again"):  # without the cache, always scored
        zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu")
    weight = model.model.layers[1].mlp.down_proj.weight
    kept = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = kept + 0.5  # one weight changed
    with pytest.raises(AssertionError, match="scored again"):
        zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu", cache=True)
    with torch.no_grad():
        weight[0, 0] = kept
    # a forward hook changes what the same weights compute (a masked candidate): never from the cache
    handle = model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * 0)
    with pytest.raises(AssertionError, match="scored again"):
        zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu", cache=True)
    handle.remove()
    assert zero_shot.evaluate(model, tok, ["arc_easy"], limit=LIMIT, device="cpu", cache=True) == first


def test_the_table_gives_the_means_standard_error():
    scores = {name: {t: {"accuracy": acc, "stderr": se} for t, acc, se in rows}
              for name, rows in {"dense": [("a", 0.5, 0.03), ("b", 0.7, 0.04)],
                                 "best": [("a", 0.4, 0.03), ("b", 0.6, 0.04)]}.items()}
    tab = zero_shot.table(scores)
    assert tab["rows"]["dense"]["mean_stderr"] == pytest.approx(0.025)  # sqrt(0.03² + 0.04²) / 2
    assert tab["rows"]["best"]["mean_drop"] == pytest.approx(0.1)
    assert "| best | 40.0 | 60.0 | 50.0 ± 2.5 | 10.0 |" in zero_shot.markdown(tab)
    del scores["best"]["a"]["stderr"]  # scores from before standard errors were recorded
    assert zero_shot.table(scores)["rows"]["best"]["mean_stderr"] is None


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
        # accuracies and their standard errors (closed form for a mean, so the same in both runs)
        want = {k.split(",")[0]: v for k, v in reference[task].items()
                if k in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none")}
        assert "acc_stderr" in want and scores[task]["metrics"] == pytest.approx(want, abs=1e-12), task

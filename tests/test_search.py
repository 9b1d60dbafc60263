"""Every strategy, end to end on a tiny real model: budget, constraint, results, resume."""

import json

import numpy as np
import pytest

from selfpruner import spec as spec_mod
from selfpruner.errors import UserError
from selfpruner.search import runner
from selfpruner.search.factory import STRATEGIES


def run(doc, **kw):
    return runner.run(spec_mod.parse(doc), progress=False, **kw)


def history(doc):
    path = doc["spec"]["output"]["path"] + "/history.jsonl"
    return [json.loads(line) for line in open(path)]


def assert_on_constraint(rates, ratio=0.3, lo=0.0, hi=0.6, grid=0.01):
    r = np.asarray(rates)
    assert r.min() >= lo - 1e-9 and r.max() <= hi + 1e-9
    assert np.allclose(r / grid, np.round(r / grid))
    assert abs(r.mean() - ratio) <= grid / len(r) + 1e-9


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "llm-evolution"])
def test_strategy_respects_budget_and_constraint(tiny_job, strategy):
    doc = tiny_job(strategy, search={"strategy": strategy})
    result = run(doc)
    budget = 4 + 2 * (2 + 2)
    entries = [e for e in history(doc) if e["text"] == "fitness"]
    search = [e for e in entries if not e["origin"].startswith("report:")]
    full = sum(e["tokens_budget"] for e in search if e["tokens_budget"] == 512) / 512
    assert result["cost"]["budget_spent"] <= budget + 1e-9
    assert full <= budget
    for e in search:
        assert_on_constraint(e["rates"])
    # a screen's windows are drawn afresh: one candidate screened twice on other windows is two evaluations
    keys = [(json.dumps(e["rates"]), e["tokens_budget"], e["text"], e.get("sample")) for e in history(doc)]
    assert len(keys) == len(set(keys)), "an evaluation was repeated"
    best = result["best"]
    assert_on_constraint(best["rates"])
    assert best["fitness"] == min(e["fitness"] for e in search if e["tokens_budget"] == 512)
    assert result["dense"]["held_out_perplexity"] > 0
    out = doc["spec"]["output"]["path"]
    for name in ("result.json", "history.jsonl", "state.json", "fitness.png", "rates.png", "checkpoint/pruning.json"):
        assert (runner.Path(out) / name).is_file(), name


def test_multi_fidelity_screens_offspring(tiny_job):
    doc = tiny_job("screen", fitness={"screenTokens": 128, "screenKeep": 0.5})
    result = run(doc)
    entries = history(doc)
    screened = [e for e in entries if e["tokens_budget"] == 128]
    assert len(screened) == 2 * 4  # every offspring of both generations
    full_offspring = [e for e in entries if e["tokens_budget"] == 512 and e["generation"] >= 1 and e["origin"] in
                      ("crossover", "mutation")]
    assert len(full_offspring) == 2 * 2  # only the better half is evaluated fully
    assert result["cost"]["budget_spent"] == pytest.approx(4 + 2 * (4 * 128 / 512 + 2))


def test_separate_attention_and_mlp_rates(tiny_job):
    doc = tiny_job("separate", target={"separateRates": True}, search={"strategy": "random"})
    result = run(doc)
    rates = result["best"]["rates"]
    assert set(rates) == {"attention", "mlp"} and len(rates["attention"]) == 6
    assert abs(result["best"]["achieved_ratio"] - 0.3) <= 0.01


def test_resume_after_a_finished_run_evaluates_nothing_new(tiny_job):
    doc = tiny_job("again")
    first = run(doc)
    n = len(history(doc))
    second = run(doc)
    assert len(history(doc)) == n
    assert second["best"] == first["best"]


def test_a_device_out_of_memory_stops_the_search_and_the_same_command_resumes_it(tiny_job, monkeypatch):
    """Processes sharing one GPU: a search's evaluations run out of memory because another process
    took it. That is the device's failure, not the candidates': recorded as theirs, it was written
    into the checkpoint, and every resume stopped again with "every evaluation failed". Now the run
    stops saying what failed, records nothing for those candidates, and the same command ends where
    an undisturbed run ends. CUDA cannot run out of memory on this CPU-only machine, so torch's own
    exception is raised from the perplexity call the executor makes (the one thing mocked)."""
    import torch

    from selfpruner import evaluate
    from selfpruner.errors import DeviceFailed

    undisturbed = run(tiny_job("undisturbed"))
    doc = tiny_job("shared-gpu")
    state = runner.Path(doc["spec"]["output"]["path"]) / "state.json"
    real, after_checkpoint = evaluate.perplexity, []

    def another_process_took_the_memory(*args, **kwargs):
        if state.exists():  # from generation 1 on: the first evaluation still fits, the rest do not
            after_checkpoint.append(1)
            if len(after_checkpoint) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB. GPU 0 has a total "
                                             "capacity of 79.18 GiB of which 560.31 MiB is free.")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "perplexity", another_process_took_the_memory)
    with pytest.raises(DeviceFailed, match=r"device failed on 3 of 4 evaluation\(s\) of generation 1.*"
                                           r"CUDA out of memory.*run the same command again") as failure:
        run(doc)
    assert "\n" not in str(failure.value)
    entries = history(doc)
    assert not [e for e in entries if e.get("error")], "a device failure was recorded as the candidate's"
    assert [e["generation"] for e in entries].count(1) == 1  # the evaluation that fitted is kept
    assert json.loads(state.read_text())["strategy"]["generation"] == 1  # the last finished generation

    monkeypatch.setattr(evaluate, "perplexity", real)  # the other process is gone
    resumed = run(doc)
    assert resumed["best"] == undisturbed["best"]
    assert resumed["best_per_generation"] == undisturbed["best_per_generation"]
    keys = [(json.dumps(e["rates"]), e["tokens_budget"], e["text"], e.get("sample")) for e in history(doc)]
    assert len(keys) == len(set(keys)), "an evaluation was repeated"


def test_a_device_out_of_memory_while_loading_says_so_in_one_line(tiny_job, monkeypatch):
    """Processes started together on one GPU: the model of the last one no longer fits when it loads.
    A one-line reason, not a traceback of the loader. CUDA cannot run out of memory on this CPU-only
    machine, so torch's own exception is raised where the weights would be allocated."""
    import torch

    from selfpruner import model_source
    from selfpruner.errors import DeviceFailed

    def allocate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.89 GiB. GPU 0 has a total capacity "
                                     "of 79.18 GiB of which 2.31 GiB is free. " + "Process 959 has 2.79 GiB memory "
                                     "in use. " * 20)

    monkeypatch.setattr(model_source, "load", allocate)
    with pytest.raises(DeviceFailed, match=r"while loading and calibrating the model \(OutOfMemoryError: CUDA out "
                                           r"of memory.*…\); free it .*run the same command again") as failure:
        run(tiny_job("late-start"))
    assert "\n" not in str(failure.value) and len(str(failure.value)) < 500


def test_a_different_spec_in_the_same_folder_is_refused(tiny_job):
    doc = tiny_job("clash")
    run(doc)
    doc["spec"]["target"]["ratio"] = 0.4
    with pytest.raises(UserError, match="different PruneJob spec"):
        run(doc)


def test_a_state_written_before_the_zero_shot_fields_left_its_key_still_resumes(tiny_job):
    """Upgrading mid-run: a state keyed with every search field (as before the zero-shot fields,
    which only the last step reads, left the key) resumes, and evaluates nothing again."""
    doc = tiny_job("older-state")
    first = run(doc, stop_after_generation=0)
    assert first.get("interrupted")
    state = runner.Path(doc["spec"]["output"]["path"]) / "state.json"
    saved = json.loads(state.read_text())
    job = spec_mod.parse(doc)
    assert runner.spec_hash(job, finish_fields=True) != saved["spec_hash"]  # zeroShotTasks: [] is in every spec
    saved["spec_hash"] = runner.spec_hash(job, finish_fields=True)
    state.write_text(json.dumps(saved))
    n = len(history(doc))
    result = run(doc)
    assert result["best"]["fitness"] > 0
    assert len(history(doc)) > n and len({json.dumps(e["rates"]) + str(e["tokens"]) for e in history(doc)}) == \
        len(history(doc))  # went on from the state: nothing evaluated twice


def test_two_local_workers_give_the_same_result(tiny_job, monkeypatch):
    """One worker per device: two CPU workers stand in for two GPUs (the same code path,
    threads and all); results must not depend on how tasks were spread."""
    one = run(tiny_job("one-worker"))
    monkeypatch.setenv("SELFPRUNER_DEVICES", "cpu,cpu")
    two = run(tiny_job("two-workers"))
    assert two["best"] == one["best"]
    assert two["best_per_generation"] == one["best_per_generation"]

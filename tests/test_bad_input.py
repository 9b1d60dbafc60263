"""Bad input gets one line on stderr saying what to fix, exit code 2 and no traceback, before any
model loads; legal input that cannot be taken as asked gets a result that says what was done.
Every case runs the real `selfpruner` in a process, as a user does.

"Before any model loads" is shown by removing the tiny model's weights (`weightless`): a check
that came after loading would end with a different line (the weights are missing)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml


def selfpruner(*args):
    return subprocess.run([sys.executable, "-m", "selfpruner.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def one_line(done, *fragments) -> str:
    """Exit code 2 and exactly one error line, the last on stderr, holding every fragment."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("selfpruner: error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def weightless(folder):
    """The model folder without its weights: its config and tokenizer still read."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return folder


def write_job(tmp_path, doc, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def prune_args(folder, text, *extra):
    return ("prune", "--model", folder, "--calibration-text", text, "--calibration-windows", "4",
            "--calibration-seq-len", "128", "--device", "cpu", *extra)


# 1. resume state

@pytest.mark.parametrize("content", ['{"spec_hash": "ab', "[1, 2]", '{"spec_hash": "x"}'],
                         ids=["truncated", "a-list", "missing-fields"])
def test_a_damaged_resume_state_is_named_and_kept(tiny_job, tmp_path, content):
    doc = tiny_job()
    weightless(tmp_path / "tiny-llama")
    out = tmp_path / "runs" / "tiny"
    out.mkdir(parents=True)
    (out / "state.json").write_text(content)
    (out / "history.jsonl").write_text("")
    line = one_line(selfpruner("run", write_job(tmp_path, doc), "--quiet"), str(out / "state.json"), "remove it")
    assert "restore" in line
    assert (out / "state.json").read_text() == content  # nothing deleted or overwritten
    assert sorted(p.name for p in out.iterdir() if p.name != ".selfpruner.lock") == ["history.jsonl", "state.json"]


# 2. GGUF files

def _gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [100, -8], ids=["in-the-metadata", "in-the-tensor-data"])
def test_a_truncated_gguf_model_is_one_line(tiny_model_dir, tmp_path, keep):
    _, text = tiny_model_dir
    whole = _gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    one_line(selfpruner("eval", "--model", cut, "--text", text, "--device", "cpu"), str(cut), "truncated")


def test_a_truncated_gguf_as_the_local_llm_fails_before_the_model_loads(tiny_job, tmp_path):
    cut = tmp_path / "llm.gguf"
    cut.write_bytes(_gguf(tmp_path / "whole.gguf").read_bytes()[:100])
    doc = tiny_job(search={"strategy": "llm-evolution"}, llm={"provider": "local", "model": str(cut)})
    weightless(tmp_path / "tiny-llama")
    done = selfpruner("run", write_job(tmp_path, doc), "--quiet")
    one_line(done, str(cut), "truncated", "spec.llm.model")
    assert "memory plan" not in done.stderr


# 3. and 4. outputs that cannot be written, devices that do not exist

def test_prune_refuses_an_output_it_cannot_write_before_loading(tiny_model_dir, tmp_path):
    folder, text = tiny_model_dir
    weightless(folder)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line(selfpruner(*prune_args(folder, text, "--ratio", "0.3", "--output", blocker / "pruned")),
             "--output", str(blocker / "pruned"), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_prune_refuses_a_read_only_folder_before_loading(tiny_model_dir, tmp_path):
    folder, text = tiny_model_dir
    weightless(folder)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        one_line(selfpruner(*prune_args(folder, text, "--ratio", "0.3", "--output", locked / "pruned")),
                 "--output", "cannot be written")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("tasks", [False, True], ids=["perplexity", "tasks"])
def test_eval_refuses_an_output_it_cannot_write_before_loading(tiny_model_dir, tmp_path, tasks):
    folder, text = tiny_model_dir
    weightless(folder)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    extra = ("--tasks", "boolq", "--limit", "2") if tasks else ("--text", text)
    one_line(selfpruner("eval", "--model", folder, "--device", "cpu", "--output", blocker / "scores.json", *extra),
             "--output", "is a file")
    if not tasks:
        one_line(selfpruner("eval", "--model", folder, "--device", "cpu", "--output", tmp_path, *extra),
                 "--output", "is a folder")


@pytest.mark.parametrize("device, fragment", [("cuda:7", "cuda:7"), ("bogus", "'bogus' is not a device")])
def test_eval_refuses_a_device_this_machine_lacks_before_loading(tiny_model_dir, device, fragment):
    if device == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    folder, text = tiny_model_dir
    weightless(folder)
    one_line(selfpruner("eval", "--model", folder, "--text", text, "--device", device), "--device", fragment)


# 5. YAML keys a PruneJob cannot have

@pytest.mark.parametrize("yaml_text", ["? [a, b]\n: 1\n", "kind: PruneJob\nspec:\n  ? {x: 1}\n  : 2\n"],
                         ids=["list-key", "mapping-key"])
def test_validate_refuses_a_complex_mapping_key(tmp_path, yaml_text):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    one_line(selfpruner("validate", path), str(path), "line", "key")


# 6. texts too short for what is asked of them

def test_a_fitness_text_shorter_than_one_window_is_refused_before_loading(tiny_job, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    doc = tiny_job(fitness={"text": str(short)})
    weightless(tmp_path / "tiny-llama")
    done = selfpruner("run", write_job(tmp_path, doc), "--quiet")
    one_line(done, "spec.fitness.text", str(short), "3 tokens", "512")
    assert "memory plan" not in done.stderr


def test_a_fitness_text_shorter_than_fitness_tokens_is_refused(tiny_job, tmp_path):
    doc = tiny_job(fitness={"tokens": 100_000})
    weightless(tmp_path / "tiny-llama")
    one_line(selfpruner("run", write_job(tmp_path, doc), "--quiet"), "spec.fitness.text", "5000 tokens",
             "spec.fitness.tokens")


def test_a_calibration_text_too_short_for_its_windows_is_refused_before_loading(tiny_job, tmp_path):
    doc = tiny_job(calibration={"windows": 100})
    weightless(tmp_path / "tiny-llama")
    one_line(selfpruner("run", write_job(tmp_path, doc), "--quiet"), "spec.calibration", "5000 tokens", "39")


def test_eval_refuses_a_text_shorter_than_one_window(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    weightless(folder)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    one_line(selfpruner("eval", "--model", folder, "--text", short, "--seq-len", "128", "--device", "cpu"),
             str(short), "3 tokens", "--seq-len")


# 7. and 8. pruning settings that cannot do what they say

def test_an_mlp_multiple_wider_than_the_mlp_is_refused_before_loading(tiny_model_dir, tmp_path):
    folder, text = tiny_model_dir
    weightless(folder)
    one_line(selfpruner(*prune_args(folder, text, "--ratio", "0.3", "--mlp-multiple", "100000",
                                    "--output", tmp_path / "out")), "--mlp-multiple", "at most 80")
    assert not (tmp_path / "out").exists()


def test_an_mlp_multiple_that_misses_the_target_names_one_that_reaches_it(tiny_model_dir, tmp_path):
    folder, text = tiny_model_dir
    weightless(folder)
    one_line(selfpruner(*prune_args(folder, text, "--ratio", "0.3", "--mlp-multiple", "64",
                                    "--output", tmp_path / "out")), "--mlp-multiple 64", "give 16")


def test_a_prunejob_mlp_multiple_wider_than_the_mlp_is_refused(tiny_job, tmp_path):
    doc = tiny_job(pruning={"mlpMultiple": 1000})
    weightless(tmp_path / "tiny-llama")
    one_line(selfpruner("run", write_job(tmp_path, doc), "--quiet"), "spec.pruning.mlpMultiple", "at most 80")


@pytest.mark.parametrize("flag", ["--calibration-seq-len", "--eval-seq-len"])
def test_a_window_of_one_token_is_refused(tiny_model_dir, tmp_path, flag):
    folder, text = tiny_model_dir
    weightless(folder)
    args = list(prune_args(folder, text, "--ratio", "0.3", "--eval", "--eval-text", text, "--output", tmp_path / "o"))
    if flag in args:
        args[args.index(flag) + 1] = "1"
    else:
        args += [flag, "1"]
    one_line(selfpruner(*args), flag, "at least 2")


# 9. budgets

@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_token_budget_below_one_evaluation_is_refused(tiny_job, tmp_path, command):
    doc = tiny_job(search={"strategy": "random", "budget": {"tokens": 100}})
    one_line(selfpruner(command, write_job(tmp_path, doc)), "spec.search.budget", "512")


# 10. held-out tokens beyond the text, and what the report says (with the memory plan on the CPU)

def test_held_out_tokens_beyond_the_text_are_recorded_as_used(tiny_job, tmp_path):
    doc = tiny_job(search={"strategy": "uniform", "baselines": []}, fitness={"heldOutTokens": 100_000},
                   output={"path": str(tmp_path / "runs" / "tiny"), "export": False})
    env = {**os.environ, "SELFPRUNER_DEVICES": "cpu"}
    done = subprocess.run([sys.executable, "-m", "selfpruner.cli", "run", str(write_job(tmp_path, doc)), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    held = result["held_out_text"]
    assert held["tokens_asked"] == 100_000
    assert held["tokens"] == 39 * 127  # 5000 characters: 39 windows of 128, each predicting 127
    assert "held-out text" in done.stdout and "4953 tokens" in done.stdout and "100000" in done.stdout
    plan = [line for line in done.stderr.splitlines() if line.startswith("memory plan")]
    assert plan and "GPU" not in plan[0] and "CPU" in plan[0], plan


# the small texts

def test_help_names_every_command():
    done = selfpruner("--help")
    head = done.stdout.split("positional arguments")[0]
    for command in ("run", "validate", "prune", "eval"):
        assert command in head, head


def test_an_s3_model_says_where_it_works(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    line = one_line(selfpruner("eval", "--model", "s3://bucket/llama", "--text", text, "--device", "cpu"),
                    "s3://bucket/llama")
    assert "lacks" not in line and "spec.storage" in line

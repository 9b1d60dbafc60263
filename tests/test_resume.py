"""A search killed with SIGKILL mid-generation and run again gives the same result as an
uninterrupted run, and no evaluation is repeated. Real processes, real HTTP LLM server; and a
local LLM whose GPU fails mid-search (in-process: the GPU's error is injected)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from chat_server import ScriptedChat
from selfpruner.search.history import read_jsonl


def _default_sigint() -> None:
    # a test run started in the background (`make test &`, nohup) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the child would never see the Ctrl-C this test sends
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(spec_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfpruner.cli", "run", str(spec_path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)




def keys(entries):
    return [(json.dumps(e["rates"]), e["tokens_budget"], e["text"], e.get("sample")) for e in entries]


def test_sigkill_mid_generation_then_resume(tiny_job, tmp_path):
    with ScriptedChat(dim=6, delay=0.05) as server:
        def spec_file(name):
            doc = tiny_job(name, search={"strategy": "llm-evolution", "generations": 4},
                           fitness={"screenTokens": 128},
                           llm={"provider": "openai", "model": "scripted", "baseURL": server.url,
                                "offspringPerCall": 2})
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(doc))
            return path, Path(doc["spec"]["output"]["path"])

        ref_spec, ref_out = spec_file("reference")
        done = start(ref_spec)
        assert done.wait(timeout=300) == 0, done.stderr.read()

        spec, out = spec_file("killed")
        proc = start(spec)
        deadline = time.time() + 300
        while len(read_jsonl(out / "history.jsonl")) < 7 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "result.json").exists(), "the run finished before it could be killed"
        killed_at = len(read_jsonl(out / "history.jsonl"))
        state = json.loads((out / "state.json").read_text())
        assert state["strategy"]["generation"] >= 1  # killed after the first checkpoint, mid-search

        again = start(spec)
        assert again.wait(timeout=300) == 0, again.stderr.read()

    ref = json.loads((ref_out / "result.json").read_text())
    res = json.loads((out / "result.json").read_text())
    assert res["best"] == ref["best"]
    assert res["best_per_generation"] == ref["best_per_generation"]
    history, ref_history = read_jsonl(out / "history.jsonl"), read_jsonl(ref_out / "history.jsonl")
    assert len(keys(history)) == len(set(keys(history))), "an evaluation was repeated"
    assert sorted(keys(history)) == sorted(keys(ref_history)), "an evaluation was lost or added"
    assert killed_at < len(history)
    assert res["cost"]["llm"]["calls"] == ref["cost"]["llm"]["calls"]
    assert res["origins"] == ref["origins"]  # the per-origin table survives the kill too
    assert res["counters"] == ref["counters"]


def start_past_first_checkpoint(tiny_job, tmp_path, name):
    """A 60-generation run started in a process and left running once its first checkpoint is
    written (a few seconds of search remain): (spec file, output folder, process)."""
    doc = tiny_job(name, search={"generations": 60})
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = Path(doc["spec"]["output"]["path"])
    proc = start(spec)
    deadline = time.time() + 300
    while not (out / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    return spec, out, proc


def test_ctrl_c_stops_cleanly_and_resumes(tiny_job, tmp_path):
    spec, out, proc = start_past_first_checkpoint(tiny_job, tmp_path, "interrupted")
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "interrupted" in err and "Traceback" not in err and "run the same command again" in err
    assert not (out / "result.json").exists()
    again = start(spec)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    history = read_jsonl(out / "history.jsonl")
    assert len(keys(history)) == len(set(keys(history)))
    assert json.loads((out / "result.json").read_text())["best"]["fitness"] > 0


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(tiny_job, tmp_path):
    """The same command started twice (two terminals, a benchmark driver restarted while its first
    copy still runs): both would append to one history and overwrite each other's state. The
    second is refused in one line naming the first; the first finishes undisturbed; once it is
    gone, the same command reads its result back. Real processes."""
    spec, out, first = start_past_first_checkpoint(tiny_job, tmp_path, "twice")
    assert first.poll() is None, "the first run ended before the second started"
    second = start(spec)
    assert second.wait(timeout=120) == 2
    err = second.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"is in use by another selfpruner run (pid {first.pid} on " in err and "spec.output.path" in err
    assert first.poll() is None  # the refusal touched nothing of the first run's
    assert first.wait(timeout=300) == 0, first.stderr.read()
    history = read_jsonl(out / "history.jsonl")
    assert len(keys(history)) == len(set(keys(history)))
    third = start(spec)  # the first is gone, and with it its lock
    assert third.wait(timeout=300) == 0, third.stderr.read()
    assert len(read_jsonl(out / "history.jsonl")) == len(history)  # read back, nothing evaluated again


def test_the_llms_gpu_failing_mid_search_exits_3_and_the_same_command_resumes(tiny_job, tmp_path, monkeypatch,
                                                                             capsys):
    """Found on a shared H100: a local LLM (`llm.provider: local`) whose `generate` ran out of GPU
    memory ended the run with a cuBLAS traceback and exit 1, which a benchmark driver does not rerun.
    This machine has no GPU, so torch's own OutOfMemoryError is raised where `generate` would raise
    it, on the second call (generation 1's selection, after generation 0's checkpoint). The CLI says
    so in one line and exits 3; the same command resumes and ends with the result of a run that never
    failed."""
    import torch

    from conftest import tiny_chat_model
    from selfpruner import cli
    from selfpruner import spec as spec_mod
    from selfpruner.search import runner
    from selfpruner.search.llm_clients import LocalChat

    chat = tiny_chat_model(seed=1)
    folder = tmp_path / "tiny-chat"
    chat.model.save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    llm = {"provider": "local", "model": str(folder), "temperature": 1.0}
    clean = runner.run(spec_mod.parse(tiny_job("clean", search={"strategy": "llm-evolution"}, llm=llm)),
                       progress=False)

    doc = tiny_job("llm-oom", search={"strategy": "llm-evolution"}, llm=llm)
    path = tmp_path / "llm-oom.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = Path(doc["spec"]["output"]["path"])
    real, calls = LocalChat._generate, []

    def generate_on_a_full_gpu(self, prompts, first_index):
        calls.append(first_index)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.20 GiB. GPU 0 has a total "
                                         "capacity of 79.18 GiB of which 310.00 MiB is free.")
        return real(self, prompts, first_index)

    monkeypatch.setattr(LocalChat, "_generate", generate_on_a_full_gpu)
    capsys.readouterr()
    assert cli.main(["run", str(path), "--quiet"]) == cli.EXIT_DEVICE
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfpruner: error:")]
    assert len(err) == 1 and "the device failed (OutOfMemoryError: CUDA out of memory" in err[0]
    assert "run the same command again" in err[0]
    assert (out / "state.json").exists() and not (out / "result.json").exists()

    monkeypatch.setattr(LocalChat, "_generate", real)
    assert cli.main(["run", str(path), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["best"]["rates"] == clean["best"]["rates"]
    assert result["best"]["fitness"] == clean["best"]["fitness"]
    history = read_jsonl(out / "history.jsonl")
    assert len(keys(history)) == len(set(keys(history)))  # nothing evaluated twice

"""A search killed with SIGKILL mid-generation and run again gives the same result as an
uninterrupted run, and no evaluation is repeated. Real processes, real HTTP LLM server."""

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

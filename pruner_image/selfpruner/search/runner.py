"""`selfpruner run`: the search loop, its checkpoints, and the report.

After every generation the search state (population, RNG, LLM call count, counters) is
written to `state.json`; every evaluation is already in `history.jsonl` (the fitness
cache) and every LLM call in `llm_transcript.jsonl`. Rerunning the same command resumes
from there and reaches the same result as an uninterrupted run: interrupted work is
asked again, and answered from the cache and the transcript.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..spec import Section, budget as spec_budget
from ..executors.for_spec import make_executor
from . import factory, finish, report
from .history import Evaluator, History
from .llm_clients import LocalChat, OpenAIChat, Transcript

STATE = "state.json"
LOCK = ".selfpruner.lock"


def output_dir(spec: Section) -> Path:
    return Path(spec.spec.output.get("path") or Path("runs") / spec.metadata["name"])


SEARCH_FIELDS = ("model", "target", "pruning", "calibration", "fitness", "search", "llm")
# how the LLM is reached, not what it is asked: these may change mid-run (the CRD lets them; its
# transition rule on spec.llm holds every other field fixed, and a test checks the two agree)
LLM_CALL_FIELDS = ("apiKeySecret", "apiKeyEnv", "baseURL", "timeoutSeconds", "maxRetries", "concurrency")
# what only the last step reads (the zero-shot tasks after the search): changing them before a rerun,
# e.g. a smaller batch after the tasks ran out of GPU memory, must not throw the search away
FINISH_FIELDS = ("zeroShotTasks", "zeroShotLimit", "zeroShotBatchSize")


def spec_hash(spec: Section, finish_fields: bool = False) -> str:
    """What a resumed run must share with the one that wrote the state: the fields that
    decide the search's result (not where it is written, nor how the cluster runs it).
    `finish_fields`: the hash as states written before FINISH_FIELDS left it were keyed."""
    s = {k: v for k, v in spec["spec"].items() if k in SEARCH_FIELDS}
    s["llm"] = {k: v for k, v in (s.get("llm") or {}).items() if k not in LLM_CALL_FIELDS}
    if not finish_fields:
        s["search"] = {k: v for k, v in (s.get("search") or {}).items() if k not in FINISH_FIELDS}
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]


def make_llm(spec: Section, out: Path, client=None) -> Transcript:
    llm = spec.spec.llm
    if client is None:
        if llm.provider == "openai":
            client = OpenAIChat(llm.model, base_url=llm.get("baseURL"), api_key_env=llm.api_key_env,
                                temperature=llm.temperature, seed=llm.seed, max_tokens=llm.max_tokens,
                                timeout=llm.timeout_seconds, max_retries=llm.max_retries,
                                response_format=llm.response_format, concurrency=llm.concurrency)
        else:
            from ..model_source import default_device

            client = LocalChat(llm.model, temperature=llm.temperature, seed=llm.seed, max_tokens=llm.max_tokens,
                               device=os.environ.get("SELFPRUNER_LLM_DEVICE") or default_device(),
                               batch_size=llm.batch_size)
    return Transcript(client, out / "llm_transcript.jsonl")


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _damaged(path: Path, what: str) -> str:
    return (f"{path} is damaged: {what}. It was left as it is: restore it from a copy to resume, or remove it "
            f"to start the search over (the evaluations in {path.parent / 'history.jsonl'} are reused)")


def read_state(path: Path) -> dict | None:
    """The saved search state, None where there is none; a damaged file is one line naming it
    (and is never touched: it may be the only copy of a long search's progress)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(_damaged(path, f"it cannot be read ({e})")) from None
    try:
        saved = json.loads(text)
    except ValueError as e:
        raise UserError(_damaged(path, f"it is not JSON ({e})")) from None
    if not isinstance(saved, dict):
        raise UserError(_damaged(path, f"it holds a JSON {type(saved).__name__}, not the state object"))
    missing = [k for k in ("spec_hash", "strategy", "rng") if k not in saved]
    if missing:
        raise UserError(_damaged(path, f"it lacks {', '.join(missing)}"))
    return saved


def run(spec: Section, *, executor=None, llm_client=None, progress: bool = True, out_dir: str | Path | None = None,
        stop_after_generation: int | None = None, on_checkpoint=None) -> dict:
    """Run (or resume) the search a PruneJob describes; returns result.json's content.
    `stop_after_generation` ends early after that checkpoint (tests use it to interrupt);
    `on_checkpoint(out_dir, strategy)` runs after every checkpoint (the cluster controller
    copies the state to object storage and reports progress there)."""
    out = Path(out_dir) if out_dir else output_dir(spec)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the results folder {out}: {e.strerror or e}; set spec.output.path "
                        "(or --output) to a folder you can write") from None
    with _only_run_in(out):
        return _run(spec, out, executor=executor, llm_client=llm_client, progress=progress,
                    stop_after_generation=stop_after_generation, on_checkpoint=on_checkpoint)


@contextlib.contextmanager
def _only_run_in(out: Path):
    """Two runs in one folder would both append to its history and overwrite each other's state,
    and neither would notice (the same command in two terminals; a benchmark driver restarted
    while its first copy still runs): the second is refused. The lock is the kernel's, so a run
    killed by any signal leaves none behind."""
    lock = open(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{out} is in use by another selfpruner run ({holder}); wait for it to finish, or set "
                        "spec.output.path (or --output) to another folder") from None
    try:
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield
    finally:
        lock.close()  # closing releases the lock


def _run(spec: Section, out: Path, *, executor, llm_client, progress: bool, stop_after_generation, on_checkpoint):
    started = time.time()
    state_path = out / STATE
    saved = read_state(state_path)
    if saved and saved.get("spec_hash") not in (spec_hash(spec), spec_hash(spec, finish_fields=True)):
        raise UserError(f"{out} holds a search of a different PruneJob spec; set spec.output.path to another folder "
                        "or remove it")
    s = spec.spec.search
    if s.strategy == "llm-evolution" and spec.spec.llm.provider == "local" and llm_client is None:
        from ..model_source import check_source

        check_source(spec.spec.llm.model, "spec.llm.model")  # a bad LLM should not wait for the model to load
    executor = executor or make_executor(spec, progress, local_llm=llm_client is None)
    space = factory.make_space(spec, executor.geometry)
    budget = spec_budget(spec)
    ctx = factory.make_context(spec, space, executor.prior, budget)
    transcript = make_llm(spec, out, llm_client) if s.strategy == "llm-evolution" else None
    strategy = factory.make_strategy(s.strategy, spec, ctx, executor.geometry, transcript)
    history = History(out / "history.jsonl")
    evaluator = Evaluator(executor, history, space)
    wall = 0.0
    if saved:
        try:
            strategy.load_state(saved["strategy"])
            ctx.rng.bit_generator.state = saved["rng"]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(_damaged(state_path, f"its search state does not fit this search ({type(e).__name__}: "
                                                 f"{e})")) from None
        wall = saved.get("wall_seconds", 0.0)

    def checkpoint() -> None:
        _write_json(state_path, {"spec_hash": spec_hash(spec), "strategy": strategy.state(),
                                 "rng": ctx.rng.bit_generator.state,
                                 "wall_seconds": wall + time.time() - started})

    bar = report.Progress(budget, strategy, enabled=progress)
    try:
        while True:
            requests = strategy.ask()
            if not requests:
                break
            results = evaluator.evaluate(requests, strategy.generation)
            strategy.tell(requests, results)
            bar.update(strategy)
            if strategy.at_boundary:
                checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(out, strategy)
                if stop_after_generation is not None and strategy.generation > stop_after_generation:
                    return {"interrupted": True, "generation": strategy.generation}
    finally:
        bar.close()
    best = strategy.best()
    if best is None:
        raise UserError("every evaluation failed; see the errors in history.jsonl")
    return finish.finish(spec, out, strategy, space, evaluator, executor, transcript,
                         wall_seconds=wall + time.time() - started)

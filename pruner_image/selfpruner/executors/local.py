"""In-process evaluation: the model loaded once per device, candidates applied by slicing.

One worker per device (`devices`, default: every local GPU, else the CPU); tasks are
spread over the workers and run in threads (PyTorch releases the GIL in its kernels).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import corpus, engine, evaluate, export, prior, structure, zero_shot
from ..architecture import geometry_of
from .base import EvalOutcome, EvalTask


def local_devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


class _Worker:
    def __init__(self, model: str, dtype: str, device: str, settings: engine.PruneSettings, texts: dict[str, str],
                 seq_len: int, batch_size: int, progress: bool):
        self.device = device
        self.eng = engine.prepare(model, settings, dtype=dtype, device=device, progress=progress)
        self.geometry = geometry_of(self.eng.loaded.model.config)
        tok = self.eng.loaded.tokenizer
        self.ids = {name: corpus.tokenize(tok, text) for name, text in texts.items()}
        self.seq_len, self.batch_size = seq_len, batch_size
        self.lock = threading.Lock()

    def run(self, task: EvalTask) -> EvalOutcome:
        with self.lock:
            try:
                plan = self.plan(task.rates)
                self._sync()
                start = time.perf_counter()
                self.eng.pm.apply(plan)
                result = evaluate.perplexity(self.eng.loaded.model, self.ids[task.text], seq_len=self.seq_len,
                                             max_tokens=task.tokens or None, batch_size=self.batch_size)
                self._sync()
                seconds = time.perf_counter() - start
                return EvalOutcome(result.perplexity, result.tokens, seconds, plan.achieved_ratio)
            except Exception as e:  # recorded as a failed evaluation; the search goes on
                return EvalOutcome(None, 0, 0.0, None, f"{type(e).__name__}: {e}")
            finally:
                self.eng.pm.restore()

    def plan(self, rates):
        s = self.eng.settings
        return structure.plan_from_rates(self.geometry, structure.Rates.parse(rates, self.geometry.num_layers),
                                         head_mode=s.head_mode, mlp_multiple=s.mlp_multiple)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


class LocalExecutor:
    def __init__(self, model: str, settings: engine.PruneSettings, texts: dict[str, str], *, dtype: str = "float32",
                 seq_len: int = 512, batch_size: int = 1, devices: list[str] | None = None, progress: bool = True):
        devices = devices or local_devices()
        self.workers = [_Worker(model, dtype, d, settings, texts, seq_len, batch_size, progress) for d in devices]
        first = self.workers[0]
        self.geometry = first.geometry
        self.tokenizer = first.eng.loaded.tokenizer
        self.prior = prior.block_statistics(first.eng.loaded.model, first.eng.stats) if first.eng.stats else {}
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=len(self.workers)) if len(self.workers) > 1 else None

    def evaluate(self, tasks: list[EvalTask], on_result=None) -> list[EvalOutcome]:
        done = on_result or (lambda i, outcome: None)
        if self._pool is None:
            outcomes = []
            for i, t in enumerate(tasks):
                outcomes.append(self.workers[0].run(t))
                done(i, outcomes[-1])
            return outcomes
        lock = threading.Lock()

        def job(i, t):
            outcome = self.workers[i % len(self.workers)].run(t)
            with lock:
                done(i, outcome)
            return outcome

        futures = [self._pool.submit(job, i, t) for i, t in enumerate(tasks)]
        return [f.result() for f in futures]

    def plan(self, rates):
        return self.workers[0].plan(rates)

    def export(self, rates, out_dir: str, info: dict) -> str:
        w = self.workers[0]
        plan = self.plan(rates)
        with w.lock:
            w.eng.pm.apply(plan)
            try:
                return str(export.export(w.eng.pm, w.eng.loaded.tokenizer, out_dir, info=info, force=True))
            finally:
                w.eng.pm.restore()

    def zero_shot(self, request: dict) -> dict:
        """lm-eval's scores of each named candidate, applied (sliced) to the loaded model,
        as `zero_shot.request` asks; a failure is recorded, never raised (the search's
        results are already in hand)."""
        w = self.workers[0]
        try:
            scores = {}
            for name, rates in request["candidates"].items():
                plan = self.plan(rates)
                with w.lock:
                    w.eng.pm.apply(plan)
                    try:
                        scores[name] = zero_shot.evaluate(w.eng.loaded.model, w.eng.loaded.tokenizer, request["tasks"],
                                                          limit=request.get("limit"),
                                                          batch_size=request.get("batch_size", 8), device=w.device)
                    finally:
                        w.eng.pm.restore()
        except Exception as e:  # noqa: BLE001 - reported in result.json, the checkpoint is kept
            first = (str(e).splitlines() or [""])[0]
            return {"error": f"zero-shot tasks could not run: {type(e).__name__}: {first}", "tasks": request["tasks"]}
        return zero_shot.summary(scores, request.get("limit"))

    def finalize(self, rates, out_dir: str | None, info: dict, zero_shot_request: dict | None = None) -> dict:
        checkpoint = self.export(rates, out_dir, info) if out_dir else None
        scores = self.zero_shot(zero_shot_request) if zero_shot_request else {}
        return {"checkpoint": checkpoint, "zero_shot": scores}

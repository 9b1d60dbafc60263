"""In-process evaluation: the model loaded once per replica, candidates applied by slicing.

The devices (`devices`, default: every local GPU, else the CPU) are grouped into replicas of
k devices each, k from the memory plan (the fewest GPUs that hold the model and its working
set) or the spec's `evaluator.gpusPerReplica`: ⌊G/k⌋ replicas, each a full copy of the model
split over its k devices. Tasks are spread over the replicas and run in threads (PyTorch
releases the GIL in its kernels).

The fitness is perplexity, or (`metric="kl"`) the mean KL divergence of the candidate's next-token
distribution from the dense model's, against the dense top-k reference (`dense_reference`) of the
task's windows. A window's reference is computed the first time it is needed, before the candidate
is applied (the model is dense between tasks), and is not counted in the candidate's seconds.
Held-out text is always scored by perplexity, whatever the metric.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import calibration, corpus, dense_reference, engine, evaluate, export, memory_plan, prior, structure, zero_shot
from ..architecture import geometry_of
from ..errors import DeviceFailed, UserError, is_device_error
from ..model_source import indexed
from .base import EvalOutcome, EvalTask

METRICS = ("perplexity", "kl")


def local_devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


CONTEXT = 2 ** 30  # what this process's CUDA context and allocator hold before the model loads


def gpu_memory(devices: list[str]) -> tuple[int | None, int]:
    """(total, held): the smallest total memory of the CUDA devices among `devices` (None when none
    is one), and the most that other processes hold on one of them, beyond a CUDA context's worth
    (a GPU shared with other jobs: the plan counts only what they leave)."""
    cuda = [torch.device(d) for d in devices if d.startswith("cuda")]
    if not cuda:
        return None, 0
    infos = [torch.cuda.mem_get_info(d) for d in cuda]  # (free, total)
    return min(total for _, total in infos), max(max(0, total - free - CONTEXT) for free, total in infos)


def llm_beside(local_llm: tuple[str, int] | None, devices: list[str]) -> int:
    """The bytes of a local LLM (`for_spec.local_llm_need`) that sits on one of `devices`, else 0."""
    if not local_llm:
        return 0
    return local_llm[1] if local_llm[0] in {indexed(d) for d in devices} else 0


def replica_devices(devices: list[str], k: int) -> list[list[str]]:
    """⌊len(devices)/k⌋ groups of k consecutive devices; the rest stay idle."""
    return [devices[i * k:(i + 1) * k] for i in range(len(devices) // k)]


class _Worker:
    def __init__(self, model: str, dtype: str, devices: list[str], settings: engine.PruneSettings,
                 texts: dict[str, str], seq_len: int, batch_size: int, progress: bool,
                 workload: memory_plan.Workload | None = None, metric: str = "perplexity", top_k: int = 64):
        self.devices = devices
        self.device = devices[0]  # where inputs go; a split model's hooks move them on
        self.eng = engine.prepare(model, settings, dtype=dtype, devices=devices, progress=progress,
                                  workload=workload)
        self.geometry = geometry_of(self.eng.loaded.model.config)
        tok = self.eng.loaded.tokenizer
        self.ids = {name: corpus.tokenize(tok, text) for name, text in texts.items()}
        self.seq_len, self.batch_size = seq_len, batch_size
        self.metric, self.top_k = metric, top_k
        self._fingerprint: str | None = None  # of the dense model, for the reference's cache key
        self.lock = threading.Lock()

    def run(self, task: EvalTask) -> EvalOutcome:
        with self.lock:
            try:
                plan = self.plan(task.rates)
                model, ids, tokens = self.eng.loaded.model, self.ids[task.text], task.tokens or None
                kl = self.metric == "kl" and task.text == "fitness"
                if kl:  # the dense reference of the task's windows, before the candidate: not timed
                    picked, wins = evaluate.select_windows(ids, self.seq_len, tokens, task.sample)
                    reference = self.reference(ids, picked, wins.shape[1])
                self._sync()
                start = time.perf_counter()
                self.eng.pm.apply(plan)
                if kl:
                    result = evaluate.kl_of_windows(model, wins, reference, batch_size=self.batch_size)
                    fitness = result.kl
                else:
                    result = evaluate.perplexity(model, ids, seq_len=self.seq_len, max_tokens=tokens,
                                                 batch_size=self.batch_size, sample=task.sample)
                    fitness = result.perplexity
                self._sync()
                seconds = time.perf_counter() - start
                if not math.isfinite(fitness):
                    # NaN would win or lose every comparison at random, and no JSON reader (a status
                    # patch, history.jsonl) takes it: a failed evaluation that says so
                    return EvalOutcome(None, result.tokens, seconds, plan.achieved_ratio,
                                       f"NonFiniteFitness: the candidate's {self.metric if kl else 'perplexity'} "
                                       f"is {fitness} (its forward pass gave NaN or Inf logits)")
                return EvalOutcome(fitness, result.tokens, seconds, plan.achieved_ratio)
            except Exception as e:  # recorded as a failed evaluation; the search goes on
                return EvalOutcome(None, 0, 0.0, None, f"{type(e).__name__}: {e}")
            finally:
                self.eng.pm.restore()

    def reference(self, ids, picked: list[int], window_len: int) -> dense_reference.DenseTopK:
        """The dense top-k of windows `picked`; the model must be dense (no candidate applied)."""
        if self._fingerprint is None:
            self._fingerprint = calibration.model_fingerprint(self.eng.loaded.model)
        return dense_reference.dense_topk(self.eng.loaded.model, ids, picked, window_len=window_len, k=self.top_k,
                                          batch_size=self.batch_size, fingerprint=self._fingerprint)

    def plan(self, rates):
        s = self.eng.settings
        return structure.plan_from_rates(self.geometry, structure.Rates.parse(rates, self.geometry.num_layers),
                                         head_mode=s.head_mode, mlp_multiple=s.mlp_multiple)

    def _sync(self) -> None:
        for d in dict.fromkeys(self.devices):
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)


class LocalExecutor:
    def __init__(self, model: str, settings: engine.PruneSettings, texts: dict[str, str], *, dtype: str = "float32",
                 seq_len: int = 512, batch_size: int = 1, devices: list[str] | None = None, progress: bool = True,
                 gpus_per_replica: int = 0, metric: str = "perplexity", top_k: int = 64,
                 local_llm: tuple[str, int] | None = None):
        from ..model_source import load_config

        if metric not in METRICS:
            raise UserError(f"unknown fitness metric {metric!r}; use one of {', '.join(METRICS)}")
        if top_k < 1:
            raise UserError(f"fitness topK must be at least 1, got {top_k}")

        devices = devices or local_devices()
        workload = memory_plan.Workload(dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                                        calibration_seq_len=settings.calibration_seq_len, head_mode=settings.head_mode,
                                        refit=settings.refit)
        total, held = gpu_memory(devices)
        plan = memory_plan.plan(load_config(model), workload, gpus=len(devices), gpu_memory=total, held=held,
                                gpus_per_replica=gpus_per_replica, llm=llm_beside(local_llm, devices),
                                on_cpu=not any(d.startswith("cuda") for d in devices))
        print("\n".join(plan.lines()), file=sys.stderr, flush=True)
        self._plan = {**plan.to_dict(), "devices": devices}
        try:
            self.workers = [_Worker(model, dtype, group, settings, texts, seq_len, batch_size, progress, workload,
                                    metric=metric, top_k=top_k)
                            for group in replica_devices(devices, plan.gpus_per_replica)]
        except Exception as e:
            if not is_device_error(e):
                raise
            raise DeviceFailed(f"the device failed while loading and calibrating the model "
                               f"({DeviceFailed.describe(e)}); free it (another process may hold its memory) "
                               "and run the same command again") from e
        first = self.workers[0]
        self.geometry = first.geometry
        self.tokenizer = first.eng.loaded.tokenizer
        self.prior = prior.block_statistics(first.eng.loaded.model, first.eng.stats) if first.eng.stats else {}
        self.settings = settings
        self.metric, self.top_k = metric, top_k
        self._pool = ThreadPoolExecutor(max_workers=len(self.workers)) if len(self.workers) > 1 else None

    @property
    def memory_plan(self) -> dict:
        """The plan, with the most each CUDA device's allocator has held so far in this process (the
        model, candidates, evaluations, a local LLM on it): what a run puts in result.json, so that
        every run on a GPU checks the plan's arithmetic (per GPU: `per_gpu[].total` + `local_llm_bytes`)."""
        peaks = {d: torch.cuda.max_memory_allocated(d) for d in self._plan["devices"] if d.startswith("cuda")}
        return {**self._plan, **({"peak_allocated_bytes": peaks} if peaks else {})}

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

    def zero_shot(self, request: dict, device_failure_stops: bool = True) -> dict:
        """lm-eval's scores of each named candidate, applied (sliced) to the loaded model,
        as `zero_shot.request` asks; a failure is recorded, never raised (the search's
        results are already in hand), except the device's where `device_failure_stops`: on
        one machine, where another process may have filled the GPU, that one stops the run
        before result.json is written, and the same command does only this last step again (a
        recorded OOM would lose the table for good; the zero-shot fields may change meanwhile).
        A cluster's finalize pod records it: its spec cannot change, and a failed finalize Job
        would lose the checkpoint. Scores of weights scored before (the dense model, a
        baseline) come from the cache."""
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
                                                          batch_size=request.get("batch_size", 8), device=w.device,
                                                          cache=True)
                    finally:
                        w.eng.pm.restore()
        except Exception as e:  # noqa: BLE001 - reported in result.json, the checkpoint is kept
            if device_failure_stops and is_device_error(e):
                raise DeviceFailed(f"the device failed during the zero-shot tasks ({DeviceFailed.describe(e)}); "
                                   "the search is done and kept: run the same command again once the device "
                                   "is free (or with a smaller search.zeroShotBatchSize), and only the last step "
                                   "runs again") from e
            first = (str(e).splitlines() or [""])[0]
            return {"error": f"zero-shot tasks could not run: {type(e).__name__}: {first}", "tasks": request["tasks"]}
        return zero_shot.summary(scores, request.get("limit"), request.get("batch_size", 8))

    def finalize(self, rates, out_dir: str | None, info: dict, zero_shot_request: dict | None = None,
                 device_failure_stops: bool = True) -> dict:
        checkpoint = self.export(rates, out_dir, info) if out_dir else None
        scores = self.zero_shot(zero_shot_request, device_failure_stops) if zero_shot_request else {}
        return {"checkpoint": checkpoint, "zero_shot": scores}

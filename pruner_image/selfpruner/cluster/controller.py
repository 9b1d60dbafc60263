"""`selfpruner controller`: the search loop in a CPU pod, evaluations as GPU Jobs.

The PruneJob arrives as JSON in the environment. The search state lives in object
storage (copied there after every generation), so a replacement controller started by
the operator resumes where the lost one stopped. Progress goes to the PruneJob's status.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

from .. import memory_plan
from .. import spec as spec_mod
from ..executors.for_spec import workload
from ..search import runner
from ..storage import ObjectNotFound, StorageError, open_store
from . import failures, status
from .failures import Verdict
from .k8s_executor import KubernetesExecutor
from .kube import Kube
from .layout import STATE_FILES, Layout
from .pending import PendingTranscript


def store_for(spec) -> object:
    storage = spec.spec["storage"]
    return open_store(storage["uri"], endpoint_url=storage.get("endpointURL"), region=storage.get("region"))


def main() -> int:
    """Run the search; every ending is one line on stderr (a bug also keeps its traceback), with
    the exit code of `pod_env`'s table: 0 after success or after a final failure reported into the
    PruneJob's status (nothing to restart); 1 after a transient failure (the API server or the store
    unreachable or overloaded), so the operator starts a controller that resumes from storage; 42
    when the controller cannot identify or reach its PruneJob at all (a bad SELFPRUNER_PRUNEJOB, no
    API configuration, no permission, the PruneJob gone): there is no status to report into, and a
    new controller would fail the same way."""
    from ..errors import UserError
    from . import pod_env

    def transient(e: BaseException) -> int:
        print(f"selfpruner controller: transient failure ({type(e).__name__}: {pod_env.one_line(e)}); the "
              "operator starts another controller, which resumes from storage", file=sys.stderr)
        return pod_env.EXIT_TRANSIENT

    try:
        doc = pod_env.prunejob_document()
        kube = pod_env.kube_for(doc)
        pod_env.check_prunejob(kube, doc)
    except UserError as e:
        print(f"selfpruner controller: {pod_env.one_line(e)}", file=sys.stderr)
        return pod_env.EXIT_UNEVALUABLE
    except Exception as e:
        if pod_env.is_transient(e):
            return transient(e)
        raise
    try:
        return run(doc, kube)
    except Exception as e:
        verdict = failures.classify(e)
        if verdict is None:
            return transient(e)
        if verdict[0] == "ControllerError":
            traceback.print_exc()  # a bug: the line in status is not enough to fix it
        print(f"selfpruner controller: {verdict[0]}: {pod_env.one_line(verdict[1])}", file=sys.stderr)
        try:
            report_failure(kube, doc, *verdict)
        except Exception as lost:
            if pod_env.is_transient(lost):  # the next controller meets the same failure and reports it
                return transient(lost)
            raise
        return 0


def report_failure(kube: Kube, doc: dict, reason: str, message: str) -> None:
    name = doc["metadata"]["name"]
    pj = kube.read_prunejob(name) or doc
    kube.patch_status(name, status.failed(reason, message, pj["metadata"].get("generation")))
    kube.event(pj, status.FAILED, f"{reason}: {message}", type_="Warning")


def run(doc: dict, kube: Kube) -> int:
    job = spec_mod.parse(doc)
    if "storage" not in job.spec:
        raise spec_mod.UserError("spec.storage: a cluster run needs spec.storage.uri (s3://bucket/prefix)")
    name, uid = doc["metadata"]["name"], doc["metadata"]["uid"]
    store = store_for(job)
    layout = Layout(uid)
    if not store.exists(layout.spec):
        store.put_json(layout.spec, doc)
    work = Path(tempfile.mkdtemp(prefix="selfpruner-"))
    checkpoints = {"n": _latest_checkpoint(store, layout)}
    if checkpoints["n"]:  # resume: the last whole checkpoint a lost controller left behind
        for name_ in STATE_FILES:
            try:
                store.get_file(layout.state(name_, checkpoints["n"]), work / name_)
            except ObjectNotFound:
                pass
    pending = PendingTranscript(store, layout, work)
    pending.restore()  # the LLM's replies since that checkpoint, if a lost controller had asked a batch with them
    image = os.environ.get("SELFPRUNER_IMAGE", "selfpruner-pruner:latest")
    plan = check_fit(job)
    executor = KubernetesExecutor(with_cache_size(doc, job), store, kube, image, before_submit=pending.save)
    if checkpoints["n"]:  # the Jobs a resumed search creates carry its generation, not 0
        executor.generation = _resumed_generation(store, layout)
    pj = kube.read_prunejob(name) or doc
    generation = pj["metadata"].get("generation")
    # what bestFitness is measured in, and the budget status.progress counts against, from the start;
    # a new search shows 0/budget until its first checkpoint, a resumed one keeps what it had reached
    metric = job.spec.fitness.metric
    start = status.progress(0, spec_mod.budget(job))
    kube.patch_status(name, {"phase": status.RUNNING, "fitnessMetric": metric,
                             **(start if not checkpoints["n"] else {"budget": start["budget"]}), "conditions": [
        status.condition(status.RUNNING, "True", "SearchRunning", "the controller is running the search", generation)]})
    executor.prepare()
    executor.memory_plan = executor.memory_plan or plan

    max_failed = job.spec["evaluator"]["maxFailedEvaluations"]
    metrics = None
    if os.environ.get("SELFPRUNER_METRICS_PORT"):
        try:  # metrics must never break a search
            from .metrics import SearchMetrics
            metrics = SearchMetrics(name)
            metrics.serve(int(os.environ["SELFPRUNER_METRICS_PORT"]))
        except Exception as e:
            print(f"selfpruner: metrics off: {e!r}", file=sys.stderr)
            metrics = None

    def on_checkpoint(out: Path, strategy) -> None:
        try:
            metrics and metrics.update_from(out, strategy)
        except Exception as e:
            print(f"selfpruner: metrics update failed: {e!r}", file=sys.stderr)
        n = checkpoints["n"] + 1
        for name_ in STATE_FILES:
            if (out / name_).is_file():
                store.put_file(layout.state(name_, n), out / name_)
        store.put_json(layout.latest_state, {"checkpoint": n, "generation": strategy.generation})
        checkpoints["n"] = n
        executor.generation = strategy.generation
        best = strategy.best()
        history = runner.History(out / "history.jsonl")
        totals = history.totals()
        kube.patch_status(name, {"generation": strategy.generation, "evaluations": totals["evaluations"],
                                 **status.progress(strategy.spent, strategy.ctx.budget),
                                 **({"bestFitness": best.fitness, "fitnessMetric": metric} if best else {})})
        failed = totals["failed_evaluations"]
        if failed > max_failed:
            last = " ".join(next(e["error"] for e in reversed(history.entries) if e.get("error")).split())[:300]
            raise Verdict("TooManyFailedEvaluations", f"{failed} evaluations failed for good, more than "
                                                      f"spec.evaluator.maxFailedEvaluations ({max_failed}); the "
                                                      f"last: {last}")

    result = runner.run(job, executor=executor, out_dir=work, progress=False, on_checkpoint=on_checkpoint)
    for file in ("result.json", "fitness.png", "rates.png", *STATE_FILES):
        if (work / file).is_file():
            store.put_file(layout.output(file), work / file)
    c = result["cost"]
    llm = c.get("llm") or {}
    kube.patch_status(name, {
        "phase": status.SUCCEEDED, "generation": len(result["best_per_generation"]),
        "evaluations": c["evaluations"], "bestFitness": result["best"]["fitness"], "fitnessMetric": metric,
        **status.progress(c["budget_spent"], c["budget_full_evaluations"]),
        "achievedRatio": result["best"]["achieved_ratio"], "checkpointURI": result.get("checkpoint"),
        "cost": {"deviceSeconds": c["device_seconds"], "tokensEvaluated": c["tokens_evaluated"],
                 "llmCalls": llm.get("calls", 0),
                 "llmTokens": llm.get("prompt_tokens", 0) + llm.get("completion_tokens", 0)},
        "conditions": [status.condition(status.RUNNING, "False", "SearchFinished", "the search finished", generation),
                       status.condition(status.SUCCEEDED, "True", "CheckpointWritten",
                                 f"best held-out perplexity {_number(result['best'].get('held_out_perplexity'))}; "
                                 f"checkpoint {result.get('checkpoint')}", generation)],
    })
    kube.event(pj, status.SUCCEEDED, f"search finished: best fitness {_number(result['best'].get('fitness'))}, "
                                f"checkpoint {result.get('checkpoint')}")
    return 0


def _model_store(job):
    """The store holding an s3:// model, and the model's prefix in it."""
    storage = job.spec["storage"]
    bucket, _, prefix = job.spec.model.source[len("s3://"):].partition("/")
    return (open_store(f"s3://{bucket}", endpoint_url=storage.get("endpointURL"), region=storage.get("region")),
            prefix.rstrip("/"))


def with_cache_size(doc: dict, job) -> dict:
    """The PruneJob with evaluator.cacheSize filled in from the size of an s3:// model (1.25 × it,
    for the safetensors and their partial copies), so the pods' cache volumes ask for the disk."""
    ev = job.spec.evaluator
    if ev.get("cacheSize") or ev.get("nodeCache") or not job.spec.model.source.startswith("s3://"):
        return doc
    store, prefix = _model_store(job)
    size = sum(store.info(key).size for key in store.list(prefix + "/"))
    doc = json.loads(json.dumps(doc))
    doc["spec"].setdefault("evaluator", {})["cacheSize"] = f"{math.ceil(1.25 * size / 2**30) + 1}Gi"
    return doc


def check_fit(job) -> dict | None:
    """The memory plan from the model's config.json, before any GPU pod starts, where the spec
    says how much memory a GPU has (evaluator.gpuMemory) and the config is in storage (or a
    folder here); a model that cannot fit fails the PruneJob now, with the line saying what to change."""
    ev = job.spec.evaluator
    source = job.spec.model.source
    if ev.get("gpuMemory") is None or not ev.gpus_per_pod:
        return None
    if source.startswith("s3://"):
        store, prefix = _model_store(job)
        try:
            config = json.loads(store.get_bytes(f"{prefix}/config.json"))
        except ObjectNotFound:
            raise Verdict("InvalidInput", f"spec.model.source: {source} has no config.json; "
                                          "give the folder of a Hugging Face model") from None
    elif (Path(source) / "config.json").is_file():
        config = json.loads((Path(source) / "config.json").read_text())
    else:
        return None  # hf:// or the demo: the preparation pod plans with what it loads
    try:
        plan = memory_plan.plan(memory_plan.config_from_json(config), workload(job), gpus=ev.gpus_per_pod,
                                gpu_memory=memory_plan.parse_bytes(ev.gpu_memory),
                                gpus_per_replica=ev.gpus_per_replica)
    except spec_mod.UserError as e:
        raise Verdict("ModelDoesNotFit", str(e)) from None
    print("\n".join(plan.lines()), file=sys.stderr, flush=True)
    return plan.to_dict()


def _number(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"


def _resumed_generation(store, layout: Layout) -> int:
    try:
        return int(store.get_json(layout.latest_state).get("generation") or 0)
    except (ObjectNotFound, StorageError, ValueError, TypeError, AttributeError):
        return 0


def _latest_checkpoint(store, layout: Layout) -> int:
    """The newest checkpoint whose state was written whole; 0 if none. `latest.json` says
    which; if it was torn by a crash mid-write, the numbered folders still tell."""
    try:
        return int(store.get_json(layout.latest_state)["checkpoint"])
    except ObjectNotFound:
        return 0
    except StorageError:
        prefix = f"{layout.root}/state/"
        done = [int(k[len(prefix):].split("/")[0]) for k in store.list(prefix)
                if k.endswith("/state.json") and k[len(prefix):].split("/")[0].isdigit()]
        return max(done, default=0)


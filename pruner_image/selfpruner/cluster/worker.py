"""`selfpruner worker` and `selfpruner finalize`: what the GPU pods run.

A worker evaluates one shard of a batch (its `JOB_COMPLETION_INDEX`) and writes one
result object per candidate as soon as it has it, so a pod that dies loses at most the
candidate under way. The model comes from object storage into the node-local cache
once per node; the calibration statistics are computed once per PruneJob (the
preparation task) and shared through storage.

A candidate that cannot be evaluated (its error, or an exception while evaluating it) is
recorded as its result, with the error text, and the worker carries on with the shard: one bad
candidate costs only itself. Exit code `EXIT_UNEVALUABLE` is for a pod that cannot evaluate
anything for a reason a retry would not change (the model cannot be loaded, the node cache is
unusable): the pod failure policy then fails the index at once, without retries.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .. import corpus
from .. import spec as spec_mod
from ..errors import UserError
from ..executors.base import EvalOutcome, EvalTask
from ..paths import cache_dir
from ..executors.for_spec import make_executor
from ..storage import open_store
from .layout import Layout
from .manifests import EXIT_UNEVALUABLE


def _stores(spec):
    storage = spec.spec["storage"]
    opts = {"endpoint_url": storage.get("endpointURL"), "region": storage.get("region")}
    return open_store(storage["uri"], **opts), opts


def _local_model(spec, opts) -> str:
    """An s3:// model is fetched into the node cache (once per node); others load as given."""
    source = spec.spec.model.source
    if not source.startswith("s3://"):
        return source
    from ..storage.node_cache import NodeCache

    root = os.environ.get("SELFPRUNER_NODE_CACHE") or str(cache_dir("node"))
    bucket_uri, _, prefix = source[len("s3://"):].partition("/")
    store = open_store(f"s3://{bucket_uri}", **opts)
    return str(NodeCache(root).fetch(store, prefix.rstrip("/")))


def _local_text(source: str, opts) -> str:
    if not source.startswith("s3://"):
        return corpus.load_text(source)
    bucket, _, key = source[len("s3://"):].partition("/")
    return open_store(f"s3://{bucket}", **opts).get_bytes(key).decode("utf-8")


def _executor(spec, store, layout, opts):
    calib = cache_dir("calibration")
    prefix = layout.calibration + "/"
    for key in store.list(prefix):  # statistics computed once per PruneJob, reused by every pod
        target = calib / key[len(prefix):]
        if not target.exists():
            store.get_file(key, target)
    f = spec.spec.fitness
    texts = {"fitness": _local_text(f.text, opts), "heldout": _local_text(f.held_out_text, opts)}
    if spec.spec.calibration.text.startswith("s3://"):
        path = Path(tempfile.mkdtemp()) / "calibration.txt"
        path.write_text(_local_text(spec.spec.calibration.text, opts))
        spec.spec["calibration"]["text"] = str(path)
    return make_executor(spec, progress=False, model=_local_model(spec, opts), texts=texts)


def worker() -> int:
    uid = os.environ["SELFPRUNER_PRUNEJOB_UID"]
    layout = Layout(uid)
    store = open_store(os.environ["SELFPRUNER_STORE"], endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                       region=os.environ.get("AWS_DEFAULT_REGION"))
    doc = store.get_json(layout.spec)
    spec = spec_mod.parse(doc)
    store, opts = _stores(spec)
    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    shard = store.get_json(layout.shard(os.environ["SELFPRUNER_BATCH"], index))
    preparing = any(t.get("prepare") for t in shard["tasks"])
    todo = [t for t in shard["tasks"] if preparing or not store.exists(layout.result(t["id"]))]
    if not todo:
        return 0  # done by an earlier attempt, or by the Job of a controller that was restarted
    try:
        executor = _executor(spec, store, layout, opts)
    except UserError as e:
        print(f"selfpruner worker: cannot evaluate anything: {e}", file=sys.stderr)
        if preparing:  # the controller puts this in the PruneJob's status
            store.put_json(layout.prepare_failed, {"error": " ".join(str(e).split())})
        return EXIT_UNEVALUABLE
    if preparing:
        for path in cache_dir("calibration").glob("*.safetensors"):
            store.put_file(f"{layout.calibration}/{path.name}", path)
        store.put_json(layout.prepared, {"geometry": asdict(executor.geometry), "prior": executor.prior,
                                         "memory_plan": executor.memory_plan})
        return 0

    def record(i: int, outcome: EvalOutcome) -> None:
        task = todo[i]
        if outcome.error:
            print(f"selfpruner worker: candidate {task['id']} cannot be evaluated: {outcome.error}", file=sys.stderr)
        store.put_json(layout.result(task["id"]), asdict(outcome))

    # the executor's replicas evaluate the shard's candidates in parallel; each result is written
    # as it arrives, and a candidate that fails is recorded as such (the others go on)
    executor.evaluate([EvalTask(rates=t["rates"], tokens=t["tokens"], text=t["text"], sample=t.get("sample"))
                       for t in todo], on_result=record)
    return 0


def finalize() -> int:
    uid = os.environ["SELFPRUNER_PRUNEJOB_UID"]
    layout = Layout(uid)
    store = open_store(os.environ["SELFPRUNER_STORE"], endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                       region=os.environ.get("AWS_DEFAULT_REGION"))
    spec = spec_mod.parse(store.get_json(layout.spec))
    store, opts = _stores(spec)
    task = store.get_json(layout.finalize_task)
    executor = _executor(spec, store, layout, opts)
    out = Path(tempfile.mkdtemp()) / "checkpoint"
    done = executor.finalize(task["rates"], str(out) if task.get("export", True) else None, task["info"],
                             task.get("zero_shot"))
    uri = None
    if done["checkpoint"] is not None:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                store.put_file(f"{layout.checkpoint}/{path.relative_to(out)}", path)
        uri = store.uri(layout.checkpoint)
    store.put_json(layout.finalize_done, {"checkpoint": uri, "zero_shot": done["zero_shot"]})
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0

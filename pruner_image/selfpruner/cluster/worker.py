"""`selfpruner worker` and `selfpruner finalize`: what the GPU pods run.

A worker evaluates one shard of a batch (its `JOB_COMPLETION_INDEX`) and writes one
result object per candidate as soon as it has it, so a pod that dies loses at most the
candidate under way. The model comes from object storage into the node-local cache
once per node; the calibration statistics are computed once per PruneJob (the
preparation task) and shared through storage.

A candidate that cannot be evaluated (its error, or an exception while evaluating it) is
recorded as its result, with the error text, and the worker carries on with the shard: one bad
candidate costs only itself. A failure of the device (CUDA out of memory, a CUDA or NCCL error)
is not the candidate's: no result is written for it and the pod ends with `EXIT_DEVICE_ERROR`,
so the Job retries the index on another pod, which skips the candidates already done. Exit code
`EXIT_UNEVALUABLE` is for a pod that cannot evaluate anything for a reason a retry would not
change (a bad environment, a missing task, a model that cannot be loaded or read with this
PruneJob's credentials): the pod failure policy then fails the index at once, without retries.
`pod_env` reads the environment and holds the whole exit-code contract.
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
from ..errors import DeviceFailed, UserError
from ..executors.base import EvalOutcome, EvalTask
from ..paths import cache_dir
from ..executors.for_spec import load_texts, make_executor
from ..storage import ObjectNotFound, open_store
from . import pod_env
from .layout import Layout
from .manifests import EXIT_UNEVALUABLE
from .pod_env import EXIT_DEVICE_ERROR, DeviceError, PodEnvError, is_device_error

__all__ = ["worker", "finalize", "EXIT_DEVICE_ERROR", "is_device_error"]


def _stores(spec):
    storage = spec.spec["storage"]
    opts = {**pod_env.store_options(), "endpoint_url": storage.get("endpointURL"), "region": storage.get("region")}
    return open_store(storage["uri"], **opts), opts


def _required(store, key: str, what: str, fix: str = f"{pod_env.UID} and {pod_env.STORE}"):
    """The JSON object `key`, which the controller wrote before starting this pod: missing, the
    pod was pointed at the wrong run, and no retry will make it appear."""
    try:
        return store.get_json(key)
    except ObjectNotFound:
        raise PodEnvError(f"{what} {store.uri(key)} does not exist; check {fix}") from None


def _open_run(uid: str):
    """The PruneJob's spec as the controller stored it, its store and the store options."""
    store = open_store(pod_env.store_uri(), **pod_env.store_options())
    spec = spec_mod.parse(_required(store, Layout(uid).spec, "the PruneJob's spec"))
    if "storage" not in spec.spec:
        raise PodEnvError(f"the PruneJob's spec in {store.uri(Layout(uid).spec)} has no spec.storage")
    store, opts = _stores(spec)
    return spec, store, opts


def _local_model(spec, opts) -> str:
    """An s3:// model is fetched into the node cache (once per node); others load as given."""
    source = spec.spec.model.source
    if not source.startswith("s3://"):
        return source
    from ..storage.node_cache import NodeCache

    root = os.environ.get("SELFPRUNER_NODE_CACHE") or str(cache_dir("node"))
    bucket_uri, _, prefix = source[len("s3://"):].partition("/")
    store = open_store(f"s3://{bucket_uri}", **opts)
    try:  # a hit is handed out only once this PruneJob's credentials prove access (CacheRefused)
        return str(NodeCache(root).fetch(store, prefix.rstrip("/")))
    except ObjectNotFound as e:  # no model there: a retry would not make one appear
        raise UserError(f"spec.model.source: {e}") from None


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
    texts = load_texts(f, lambda source: _local_text(source, opts))
    if spec.spec.calibration.text.startswith("s3://"):
        path = Path(tempfile.mkdtemp()) / "calibration.txt"
        path.write_text(_local_text(spec.spec.calibration.text, opts))
        spec.spec["calibration"]["text"] = str(path)
    return make_executor(spec, progress=False, model=_local_model(spec, opts), texts=texts)


def worker() -> int:
    return pod_env.run_pod("worker", _worker)


def _worker() -> int:
    # every variable is checked before the first request
    uid, batch, index = pod_env.prunejob_uid(), pod_env.batch(), pod_env.completion_index()
    pod_env.store_uri(), pod_env.store_options()
    layout = Layout(uid)
    spec, store, opts = _open_run(uid)
    shard = _required(store, layout.shard(batch, index), "the task shard",
                      f"{pod_env.BATCH}={batch} and {pod_env.INDEX}={index}")
    preparing = any(t.get("prepare") for t in shard["tasks"])
    todo = [t for t in shard["tasks"] if preparing or not store.exists(layout.result(t["id"]))]
    if not todo:
        return 0  # done by an earlier attempt, or by the Job of a controller that was restarted
    try:
        executor = _executor(spec, store, layout, opts)
    except DeviceFailed:
        raise  # the device's failure, not this PruneJob's: run_pod exits so that the Job retries
    except UserError as e:
        print(f"selfpruner worker: cannot evaluate anything: {pod_env.one_line(e)}", file=sys.stderr)
        if preparing:  # the controller puts this in the PruneJob's status
            store.put_json(layout.prepare_failed, {"error": pod_env.one_line(e)})
        return EXIT_UNEVALUABLE
    if preparing:
        for path in cache_dir("calibration").glob("*.safetensors"):
            store.put_file(f"{layout.calibration}/{path.name}", path)
        store.put_json(layout.prepared, {"geometry": asdict(executor.geometry), "prior": executor.prior,
                                         "memory_plan": executor.memory_plan})
        return 0
    device_failures = record_results(store, layout, todo, executor)
    if device_failures:
        first = device_failures[0]
        raise DeviceError(f"{len(device_failures)} of {len(todo)} candidate(s) hit a device error, no result "
                          f"written for them (first: {first[0]}: {first[1]})")
    return 0


def record_results(store, layout: Layout, todo: list[dict], executor) -> list[tuple[str, str]]:
    """Evaluate `todo` and write each candidate's result as it arrives; a candidate that fails is
    recorded as such (the others go on), except when the device failed: that result is not the
    candidate's and is not written. Returns (task id, error) of those."""
    device_failures: list[tuple[str, str]] = []

    def record(i: int, outcome: EvalOutcome) -> None:
        task = todo[i]
        if outcome.error and is_device_error(outcome.error):
            # later candidates may still succeed (an OOM of one width); a broken device fails them fast
            device_failures.append((task["id"], pod_env.one_line(outcome.error)))
            return
        if outcome.error:
            print(f"selfpruner worker: candidate {task['id']} cannot be evaluated: {outcome.error}", file=sys.stderr)
        store.put_json(layout.result(task["id"]), asdict(outcome))

    # the executor's replicas evaluate the shard's candidates in parallel
    executor.evaluate([EvalTask(rates=t["rates"], tokens=t["tokens"], text=t["text"], sample=t.get("sample"))
                       for t in todo], on_result=record)
    return device_failures


def finalize() -> int:
    return pod_env.run_pod("finalize", _finalize)


def _finalize() -> int:
    uid = pod_env.prunejob_uid()
    pod_env.store_uri(), pod_env.store_options()  # every variable is checked before the first request
    layout = Layout(uid)
    spec, store, opts = _open_run(uid)
    task = _required(store, layout.finalize_task, "the finalize task")
    executor = _executor(spec, store, layout, opts)
    out = Path(tempfile.mkdtemp()) / "checkpoint"
    done = executor.finalize(task["rates"], str(out) if task.get("export", True) else None, task["info"],
                             task.get("zero_shot"), device_failure_stops=False)  # recorded: the spec cannot change
    uri = None
    if done["checkpoint"] is not None:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                store.put_file(f"{layout.checkpoint}/{path.relative_to(out)}", path)
        uri = store.uri(layout.checkpoint)
    store.put_json(layout.finalize_done, {"checkpoint": uri, "zero_shot": done["zero_shot"]})
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0

"""The in-cluster entry points (`selfpruner controller`, `worker`, `finalize`) answer bad input in
one line on stderr, with no traceback, naming what to fix, and exit with the code their Job acts
on (`cluster.pod_env`): 42 for bad input (retrying cannot help), 1 for a transient failure (the
store or the API server unreachable), 43 when the device failed (the index is retried elsewhere).

Each runs as a real process with a controlled environment, as a pod would; stores are file://
folders where storage is not the point, and moto's S3 server over HTTP where it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
import torch
from ports import free_port
from s3_server import FaultProxy, make_bucket, s3_endpoint  # noqa: F401  (fixture)

from selfpruner.cluster.layout import Layout
from selfpruner.cluster.pod_env import EXIT_DEVICE_ERROR, EXIT_TRANSIENT, is_device_error
from selfpruner.cluster.manifests import EXIT_UNEVALUABLE
from selfpruner.storage import open_store

UID = "0b5e1c2a-uid"
DROP = ("SELFPRUNER_", "JOB_COMPLETION_INDEX", "KUBERNETES_SERVICE", "KUBECONFIG", "AWS_ENDPOINT_URL",
        "AWS_MAX_ATTEMPTS")


def pod_env(tmp_path, **env) -> dict:
    """This process's environment without anything a pod's Job sets, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    base.update(HOME=str(tmp_path / "home"), KUBECONFIG=str(tmp_path / "no-kubeconfig"),
                SELFPRUNER_CACHE=str(tmp_path / "cache"), SELFPRUNER_DEVICES="cpu",
                SELFPRUNER_API_RETRIES="1", SELFPRUNER_API_BACKOFF="0.01")  # a lost API server: fail fast
    base.update({k: str(v) for k, v in env.items()})
    return base


def run_pod(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfpruner.cli", command], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_one_line(done, code: int, *fragments: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def prunejob(name="tiny", uid=UID, **spec) -> dict:
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
            "metadata": {"name": name, "namespace": "default", "uid": uid}, "spec": spec}


# ---- the controller ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, fragment", [
    (None, "SELFPRUNER_PRUNEJOB is not set"),
    ("{not json", "SELFPRUNER_PRUNEJOB is not valid JSON"),
    ("[1, 2]", "SELFPRUNER_PRUNEJOB must be a JSON object (a PruneJob), got a JSON list"),
    (json.dumps({"spec": {}}), "SELFPRUNER_PRUNEJOB has no metadata object"),
    (json.dumps({"metadata": {"uid": "u"}}), "SELFPRUNER_PRUNEJOB has no metadata.name"),
    (json.dumps({"metadata": {"name": "n"}}), "SELFPRUNER_PRUNEJOB has no metadata.uid"),
], ids=["missing", "not-json", "a-list", "no-metadata", "no-name", "no-uid"])
def test_controller_with_a_bad_prunejob_variable(tmp_path, value, fragment):
    env = pod_env(tmp_path, **({} if value is None else {"SELFPRUNER_PRUNEJOB": value}))
    assert_one_line(run_pod("controller", env), EXIT_UNEVALUABLE, "selfpruner controller: ", fragment)


def test_controller_outside_a_cluster_without_a_kubeconfig(tmp_path):
    """kubernetes.config raises ConfigException: the pod has no ServiceAccount token and no
    kubeconfig; a new controller would fail the same way."""
    done = run_pod("controller", pod_env(tmp_path, SELFPRUNER_PRUNEJOB=json.dumps(prunejob())))
    assert_one_line(done, EXIT_UNEVALUABLE, "no Kubernetes API configuration", "KUBECONFIG")


def kubeconfig(tmp_path, server: str):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "default"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return path


def test_controller_with_an_unreachable_api_server_is_transient(tmp_path):
    """A lost API server is not bad input: one line and exit 1, so the operator starts another
    controller (which resumes from storage) instead of the PruneJob failing."""
    env = pod_env(tmp_path, SELFPRUNER_PRUNEJOB=json.dumps(prunejob()),
                  KUBECONFIG=kubeconfig(tmp_path, f"http://127.0.0.1:{free_port()}"))
    line = assert_one_line(run_pod("controller", env), EXIT_TRANSIENT, "transient failure")
    assert "resumes from storage" in line


class ApiAnswer(BaseHTTPRequestHandler):
    """An API server that answers every request with the status the test sets (a fake, because no
    Kubernetes API server can run here and the operator tests' emulator is heavy for one GET)."""

    status, body = 404, {}

    def do_GET(self):
        data = json.dumps({"kind": "Status", "apiVersion": "v1", "code": self.status, **self.body}).encode()
        if self.status == 200:
            data = json.dumps(self.body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, body, code, fragment", [
    (404, {"reason": "NotFound"}, EXIT_UNEVALUABLE, "PruneJob default/tiny (from SELFPRUNER_PRUNEJOB) does not exist"),
    (403, {"reason": "Forbidden"}, EXIT_UNEVALUABLE, "may not read PruneJob default/tiny (403"),
    (200, {"metadata": {"name": "tiny", "uid": "another-uid"}}, EXIT_UNEVALUABLE, "deleted and re-created"),
    (503, {"reason": "ServiceUnavailable"}, EXIT_TRANSIENT, "transient failure"),
], ids=["gone", "forbidden", "recreated", "overloaded"])
def test_controller_that_cannot_identify_its_prunejob(tmp_path, status, body, code, fragment):
    """Before any work the controller reads its PruneJob by name and checks the uid: gone,
    re-created or unreadable is final (42, nowhere to report); an overloaded API server is not."""
    handler = type("Answer", (ApiAnswer,), {"status": status, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = pod_env(tmp_path, SELFPRUNER_PRUNEJOB=json.dumps(prunejob()),
                      KUBECONFIG=kubeconfig(tmp_path, f"http://127.0.0.1:{server.server_address[1]}"))
        assert_one_line(run_pod("controller", env), code, fragment)
    finally:
        server.shutdown()
        server.server_close()


# ---- worker and finalize: the environment ----------------------------------------------------------

def worker_env(tmp_path, **env):
    full = dict(SELFPRUNER_PRUNEJOB_UID=UID, SELFPRUNER_STORE=(tmp_path / "store").as_uri(),
                SELFPRUNER_BATCH="b1", JOB_COMPLETION_INDEX="0")
    full.update(env)
    return pod_env(tmp_path, **{k: v for k, v in full.items() if v is not None})


@pytest.mark.parametrize("command, env, fragment", [
    ("worker", {"SELFPRUNER_PRUNEJOB_UID": None}, "SELFPRUNER_PRUNEJOB_UID is not set"),
    ("worker", {"SELFPRUNER_STORE": None}, "SELFPRUNER_STORE is not set"),
    ("worker", {"SELFPRUNER_BATCH": None}, "SELFPRUNER_BATCH is not set"),
    ("worker", {"JOB_COMPLETION_INDEX": "abc"}, "JOB_COMPLETION_INDEX must be a non-negative integer, got 'abc'"),
    ("worker", {"AWS_MAX_ATTEMPTS": "many"}, "AWS_MAX_ATTEMPTS must be a positive integer"),
    ("finalize", {"SELFPRUNER_PRUNEJOB_UID": None}, "SELFPRUNER_PRUNEJOB_UID is not set"),
    ("finalize", {"SELFPRUNER_STORE": None}, "SELFPRUNER_STORE is not set"),
])
def test_a_bad_pod_environment_names_the_variable(tmp_path, command, env, fragment):
    assert_one_line(run_pod(command, worker_env(tmp_path, **env)), EXIT_UNEVALUABLE,
                    f"selfpruner {command}: ", fragment)
    assert not (tmp_path / "store").exists()  # checked before the first request


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    """Where the run's objects live, and the extra environment a pod needs to reach it."""
    if request.param == "file":
        return (tmp_path / "store").as_uri(), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{make_bucket(endpoint)}/runs-root", {"AWS_ENDPOINT_URL": endpoint}


@pytest.mark.parametrize("command", ["worker", "finalize"])
def test_no_prunejob_json_in_the_store(tmp_path, store_uri, command):
    uri, extra = store_uri
    done = run_pod(command, worker_env(tmp_path, SELFPRUNER_STORE=uri, **extra))
    line = assert_one_line(done, EXIT_UNEVALUABLE, f"runs/{UID}/prunejob.json does not exist",
                           "SELFPRUNER_PRUNEJOB_UID")
    assert uri.split("://")[0] + "://" in line


def stored_run(tmp_path, tiny_job) -> tuple:
    """A file store holding the PruneJob's spec, as the controller writes it first."""
    uri = (tmp_path / "store").as_uri()
    doc = tiny_job()
    doc["metadata"]["uid"] = UID
    doc["spec"]["storage"] = {"uri": uri}
    store = open_store(uri)
    store.put_json(Layout(UID).spec, doc)
    return uri, store


def test_a_missing_shard(tmp_path, tiny_job):
    uri, _ = stored_run(tmp_path, tiny_job)
    done = run_pod("worker", worker_env(tmp_path, SELFPRUNER_STORE=uri, JOB_COMPLETION_INDEX="3"))
    assert_one_line(done, EXIT_UNEVALUABLE, f"runs/{UID}/tasks/b1/3.json does not exist",
                    "SELFPRUNER_BATCH=b1 and JOB_COMPLETION_INDEX=3")


def test_a_missing_finalize_task(tmp_path, tiny_job):
    uri, _ = stored_run(tmp_path, tiny_job)
    done = run_pod("finalize", worker_env(tmp_path, SELFPRUNER_STORE=uri))
    assert_one_line(done, EXIT_UNEVALUABLE, f"runs/{UID}/finalize/task.json does not exist")


def test_an_unreachable_store_is_transient(tmp_path):
    """Connection refused: exit 1, so the Job retries the index (it is not the input's fault)."""
    env = worker_env(tmp_path, SELFPRUNER_STORE="s3://bucket/x", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                     AWS_MAX_ATTEMPTS="2", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    assert_one_line(run_pod("worker", env), EXIT_TRANSIENT, "transient failure", "Could not connect")


def test_a_store_answering_5xx_is_transient(tmp_path, s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.fail(100, status=503)
        env = worker_env(tmp_path, SELFPRUNER_STORE=f"s3://{bucket}", AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="2")
        assert_one_line(run_pod("worker", env), EXIT_TRANSIENT, "transient failure", "503")


# ---- device errors -----------------------------------------------------------------------------

def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


DEVICE_ERRORS = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                "of 79.10 GiB of which 1.06 GiB is free."),
    torch.AcceleratorError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable "
                           "device-side assertions."),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL "
                                       "version 2.21.5"),
    RuntimeError("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus."),
    # seen on a shared H100 in scaled_dot_product_attention; the rerun on a freer GPU passed
    RuntimeError("Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good() to be true, "
                 "but got false.  (Could this error message be improved?  If so, please report an enhancement "
                 "request to PyTorch.)"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
]
NOT_DEVICE_ERRORS = [
    ValueError("rates must be in [0, 1), got 1.2"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x48 and 40x48)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    KeyError("heldout"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                 "non-contiguous input."),
    # what the cluster records once a shard's Job has spent its retries: the candidates' failure from then on
    RuntimeError("evaluation failed after its retries (FailedIndexes: Job has failed indexes); its pods exited "
                 "43 (the GPU failed) 3 times"),
]


@pytest.mark.parametrize("error", DEVICE_ERRORS, ids=lambda e: type(e).__name__)
def test_device_errors_are_recognised_as_exceptions_and_as_recorded_text(error):
    assert is_device_error(error)
    assert is_device_error(f"{type(error).__name__}: {error}")  # what the executor records in EvalOutcome.error
    wrapped = _raised(RuntimeError("evaluating candidate 7 failed"))
    wrapped.__cause__ = error
    assert is_device_error(wrapped)  # a library wrapping the CUDA error in its own


@pytest.mark.parametrize("error", NOT_DEVICE_ERRORS, ids=lambda e: type(e).__name__)
def test_a_candidates_own_errors_are_not_device_errors(error):
    assert not is_device_error(error)
    assert not is_device_error(f"{type(error).__name__}: {error}")
    assert not is_device_error(None) and not is_device_error("")


def test_a_device_error_writes_no_result_and_the_retry_finishes_the_shard(tmp_path, tiny_job, monkeypatch, capsys):
    """The worker's real path: a file store, the tiny model evaluated on the CPU by the real
    executor. Only the failures are injected (this machine has no GPU to run out of memory):
    `evaluate.perplexity` raises torch's real OutOfMemoryError for one candidate and a shape error
    for another. The OOM candidate gets no result and the pod exits 43; the candidate's own error
    is recorded as its result; the retried pod evaluates only what is missing."""
    from selfpruner import evaluate
    from selfpruner.cluster import worker

    uri, store = stored_run(tmp_path, tiny_job)
    layout = Layout(UID)
    tasks = [{"id": f"t{i}", "rates": [0.2] * 6, "tokens": tokens, "text": "fitness"}
             for i, tokens in enumerate((256, 384, 320))]
    store.put_json(layout.shard("b1", 0), {"tasks": tasks})
    for name, value in dict(SELFPRUNER_PRUNEJOB_UID=UID, SELFPRUNER_STORE=uri, SELFPRUNER_BATCH="b1",
                            JOB_COMPLETION_INDEX="0", SELFPRUNER_DEVICES="cpu").items():
        monkeypatch.setenv(name, value)
    real = evaluate.perplexity
    calls = []

    def failing(model, ids, **kw):
        calls.append(kw.get("max_tokens"))
        if kw.get("max_tokens") == 384:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        if kw.get("max_tokens") == 320:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return real(model, ids, **kw)

    monkeypatch.setattr(evaluate, "perplexity", failing)
    assert worker.worker() == EXIT_DEVICE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert "the device failed" in err[-1] and "t1" in err[-1] and "Traceback" not in "\n".join(err)
    assert store.get_json(layout.result("t0"))["fitness"] > 1
    assert not store.exists(layout.result("t1"))  # the device's fault: not the candidate's result
    assert "shapes cannot be multiplied" in store.get_json(layout.result("t2"))["error"]
    first = {t: store.get_bytes(layout.result(t)) for t in ("t0", "t2")}

    monkeypatch.setattr(evaluate, "perplexity", real)  # the retry, on a healthy device
    assert worker.worker() == 0
    assert store.get_json(layout.result("t1"))["fitness"] > 1 and store.get_json(layout.result("t1"))["error"] is None
    assert {t: store.get_bytes(layout.result(t)) for t in ("t0", "t2")} == first  # kept, not re-evaluated

def test_a_finalize_pod_records_a_gpu_failure_in_the_zero_shot_tasks_and_keeps_the_checkpoint(
        tmp_path, tiny_job, task_data, monkeypatch):
    """On one machine a device failure in the zero-shot tasks stops the run so that the same command
    (perhaps with a smaller batch) does that step again; a finalize pod cannot rerun with another spec,
    and a finalize Job failed by retries would lose the checkpoint, so there it is recorded like any
    other error and the checkpoint is written. Only the failure is injected (no GPU here): torch's
    real OutOfMemoryError where lm-eval would meet it."""
    import lm_eval

    from selfpruner import zero_shot
    from selfpruner.cluster import worker

    uri, store = stored_run(tmp_path, tiny_job)
    layout = Layout(UID)
    request = zero_shot.request(["arc_easy"], {"dense": [0.0] * 6, "best": [0.2] * 6}, limit=2)
    store.put_json(layout.finalize_task, {"rates": [0.2] * 6, "info": {"prunejob": "tiny"}, "export": True,
                                          "zero_shot": request})
    for name, value in dict(SELFPRUNER_PRUNEJOB_UID=UID, SELFPRUNER_STORE=uri, SELFPRUNER_DEVICES="cpu").items():
        monkeypatch.setenv(name, value)

    def on_a_full_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB.")

    monkeypatch.setattr(lm_eval, "simple_evaluate", on_a_full_gpu)
    assert worker.finalize() == 0
    done = store.get_json(layout.finalize_done)
    assert "OutOfMemoryError: CUDA out of memory" in done["zero_shot"]["error"]
    assert done["checkpoint"] and store.exists(f"{layout.checkpoint}/pruning.json")


def test_a_worker_whose_model_does_not_fit_the_device_at_load_is_retried_elsewhere(tmp_path, tiny_job, monkeypatch,
                                                                                   capsys):
    """An evaluation pod that runs out of GPU memory loading the model (the GPU is shared, or smaller
    than planned) exits 43 so that its Job retries on another pod, not 2 (which would fail the
    candidates as unevaluable). Only the failure is injected (no GPU here): torch's real
    OutOfMemoryError where the weights would be allocated."""
    from selfpruner import model_source
    from selfpruner.cluster import worker

    uri, store = stored_run(tmp_path, tiny_job)
    layout = Layout(UID)
    store.put_json(layout.shard("b1", 0), {"tasks": [{"id": "t0", "rates": [0.2] * 6, "tokens": 256,
                                                      "text": "fitness"}]})
    for name, value in dict(SELFPRUNER_PRUNEJOB_UID=UID, SELFPRUNER_STORE=uri, SELFPRUNER_BATCH="b1",
                            JOB_COMPLETION_INDEX="0", SELFPRUNER_DEVICES="cpu").items():
        monkeypatch.setenv(name, value)

    def allocate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.89 GiB.")

    monkeypatch.setattr(model_source, "load", allocate)
    assert worker.worker() == EXIT_DEVICE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert "while loading" in err[-1] and "retries on another pod" in err[-1]
    assert not store.exists(layout.result("t0"))

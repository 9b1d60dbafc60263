"""Operator latency: PruneJob created -> controller Job exists, one at a time and 100 at once.

    .venv/bin/python bench/bench_operator.py --out bench/results/cpu_operator_latency.json

The published goals: "PruneJob created -> controller Job exists (median of 50)" and "100 PruneJobs
at once against the emulator".

This benchmark reuses the test infrastructure in `tests/` (imported through sys.path):
`k8s.Cluster` (tests/k8s/), the kmock-based Kubernetes emulator served over HTTP on 127.0.0.1
in a thread of this process, and `operator_world.Operator`, which runs our real operator
(`kopf run --standalone -m selfpruner_operator.handlers`) as a subprocess against it, as the
end-to-end tests do. No `Kubelet` is started: the controller Jobs are created but never run,
so only the operator is measured (watch event -> `start` handler -> validation -> GET + POST of
the Job -> status patch and event).

(a) `--n` times, one after the other: POST a valid PruneJob with a unique name, then poll
    (GET, every `--poll` seconds, 5 ms by default) until its first controller Job exists.
    The first `--warmup` PruneJobs are reported apart (lazy imports in the operator).
(b) in a fresh cluster + operator, warmed up the same way: POST `--burst` PruneJobs as fast as
    `--create-threads` threads can, and list the controller Jobs (every `--poll-burst` seconds)
    until all exist. `--cold` skips the warm-up of (b): the operator's first handler calls import
    the kubernetes client & co. (about 0.4 s alone), and a burst on a cold operator waits for that.

Absolute numbers come from an in-process emulator on whatever machine runs this (the dev box
has 2 shared cores, which the emulator, the operator and this poller share), so they say more
about kopf + the operator's handler than about a real API server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from k8s import Cluster, ClusterApiError  # noqa: E402
from operator_world import Operator  # noqa: E402  (imports torch & pytest: test infrastructure)

from selfpruner.cluster.manifests import PRUNEJOB_LABEL, child_name  # noqa: E402

# a cluster PruneJob needs a store (else it is Invalid); nothing here reads it: no kubelet runs the Jobs
SPEC = {"model": {"source": "demo"}, "target": {"ratio": 0.3}, "storage": {"uri": "s3://bench/runs"}}
CONTROLLER_SELECTOR = "app.kubernetes.io/component=controller"


def prunejob(name: str) -> dict:
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": name},
            "spec": json.loads(json.dumps(SPEC))}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": statistics.median(values) * 1e3, "p90_ms": pct(values, 90) * 1e3,
            "max_ms": max(values) * 1e3, "min_ms": min(values) * 1e3, "mean_ms": statistics.fmean(values) * 1e3}


def handler_metrics(op: Operator) -> dict:
    """The operator's own histogram of handler time (start handlers and timer reconciles together)."""
    try:
        text = op.metrics()
    except OSError:
        return {}
    out = {}
    for key in ("sum", "count"):
        m = re.search(rf"^selfpruner_operator_reconcile_duration_seconds_{key} (\S+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    if out.get("count"):
        out["mean_ms"] = out["sum"] / out["count"] * 1e3
    return out


class World:
    """A Cluster and the operator against it (no kubelet)."""

    def __init__(self, workdir: Path, interval: float):
        self.workdir, self.interval = workdir, interval

    def __enter__(self):
        self.cluster = Cluster(self.workdir / "cluster").start()
        t0 = time.perf_counter()
        self.operator = Operator(self.cluster, self.workdir / "operator.log", interval=self.interval).start()
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc):
        self.operator.stop()
        self.cluster.stop()


def sequential(world: World, n: int, warmup: int, poll: float, timeout: float) -> dict:
    cluster = world.cluster
    lat, warm = [], []
    for i in range(warmup + n):
        name = f"seq-{i:03d}"
        t0 = time.perf_counter()
        created = cluster.create(prunejob(name))
        t_created = time.perf_counter()
        job = child_name(created, "controller-0")  # the name carries the uid the API server gave
        while cluster.get("jobs.batch", job) is None:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{job} did not appear in {timeout}s; operator log:\n"
                                   + (world.workdir / "operator.log").read_text()[-3000:])
            time.sleep(poll)
        dt = time.perf_counter() - t0
        (warm if i < warmup else lat).append(dt)
        if i == warmup:  # the POST itself, for scale
            post_ms = (t_created - t0) * 1e3
    if not n:
        return {"warmup_s": warm}
    return {"warmup_s": warm, "latencies_s": lat, "post_ms_example": post_ms, **summary(lat)}


def burst(world: World, n: int, threads: int, poll: float, timeout: float) -> dict:
    cluster = world.cluster
    names = [f"burst-{i:03d}" for i in range(n)]
    created: dict[str, float] = {}
    seen: dict[str, float] = {}

    def post(name: str) -> None:
        for attempt in range(5):
            try:
                cluster.create(prunejob(name))
                break
            except ClusterApiError:
                if attempt == 4:
                    raise
                time.sleep(0.05)
        created[name] = time.perf_counter()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, names))
    t_posted = time.perf_counter()
    want = {name: name for name in names}  # a controller Job names its PruneJob in a label
    polls = 0
    while len(seen) < n:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"only {len(seen)}/{n} controller Jobs after {timeout}s")
        now = time.perf_counter()
        for job in cluster.list("jobs.batch", labels=CONTROLLER_SELECTOR):
            name = want.get((job["metadata"].get("labels") or {}).get(PRUNEJOB_LABEL))
            if name and name not in seen:
                seen[name] = now
        polls += 1
        if len(seen) < n:
            time.sleep(poll)
    t_all = max(seen.values()) - t0
    per_job = [seen[k] - created[k] for k in names]
    return {"n": n, "create_threads": threads, "post_all_s": t_posted - t0, "all_jobs_s": t_all,
            "throughput_per_s": n / t_all, "polls": polls,
            "per_job_latency": summary(per_job)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="sequential PruneJobs (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="sequential PruneJobs not counted")
    ap.add_argument("--burst", type=int, default=100, help="PruneJobs created at once (0: skip)")
    ap.add_argument("--cold", action="store_true", help="no warm-up before the burst")
    ap.add_argument("--create-threads", type=int, default=8, help="threads POSTing the burst")
    ap.add_argument("--reconcile-interval", type=float, default=5.0,
                    help="SELFPRUNER_RECONCILE_INTERVAL of the operator (s; the timer's period per PruneJob)")
    ap.add_argument("--poll", type=float, default=0.005, help="poll period of (a), seconds")
    ap.add_argument("--poll-burst", type=float, default=0.02, help="list period of (b), seconds")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="do not gc.freeze() this process (the emulator's) after the imports")
    ap.add_argument("--workdir", type=Path, help="keep the clusters' files and operator logs here (default: a temp dir)")
    args = ap.parse_args(argv)

    if not args.no_gc_freeze:
        # The emulator lives in this process, which imported torch & co. through operator_world;
        # a full garbage collection over that heap stalls the emulator for 150-250 ms once per
        # run (seen as the one outlier of (a)). Freezing what is imported so far keeps it out of
        # the collections; the operator's own process is not touched.
        gc.collect()
        gc.freeze()
    t_start = time.perf_counter()
    result: dict = {"benchmark": "operator_latency", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "spec": SPEC}
    try:
        import kopf
        result["machine"]["kopf"] = kopf.__version__
    except (ImportError, AttributeError):
        pass
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        tmp = args.workdir or Path(tmp)
        with World(tmp / "a", args.reconcile_interval) as world:
            result["operator_startup_s"] = world.startup_s
            result["sequential"] = sequential(world, args.n, args.warmup, args.poll, args.timeout)
            result["sequential"]["handler_metrics"] = handler_metrics(world.operator)
        if args.burst:
            with World(tmp / "b", args.reconcile_interval) as world:
                # the same warm-up as in (a), so that (b) measures a warm operator too
                warm = [] if args.cold or not args.warmup else \
                    sequential(world, 0, args.warmup, args.poll, args.timeout)["warmup_s"]
                before = handler_metrics(world.operator)
                result["burst"] = burst(world, args.burst, args.create_threads, args.poll_burst, args.timeout)
                deadline = time.perf_counter() + 3   # the last handlers may still be patching the status
                while True:
                    after = handler_metrics(world.operator)
                    if after.get("count", 0) - before.get("count", 0) >= args.burst or time.perf_counter() > deadline:
                        break
                    time.sleep(0.05)
                result["burst"]["warmup_s"] = warm
                if after.get("count"):
                    count = after["count"] - before.get("count", 0)
                    total = after["sum"] - before.get("sum", 0)
                    result["burst"]["handler_metrics"] = {"sum": total, "count": count,
                                                          "mean_ms": total / count * 1e3 if count else None}
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t_start

    s = result["sequential"]
    print(f"operator start-up (kopf live): {result['operator_startup_s']:.2f} s; "
          f"reconcile interval {args.reconcile_interval} s; load avg before {result['machine']['loadavg_before'][0]:.2f}")
    print(f"(a) PruneJob created -> controller Job exists, {s['n']} sequential "
          f"(after {args.warmup} warm-up: {', '.join(f'{w * 1e3:.0f}' for w in s['warmup_s'])} ms), poll {args.poll * 1e3:.0f} ms")
    print(f"    {'median':>8} {'p90':>8} {'max':>8} {'min':>8}  (ms)")
    print(f"    {s['median_ms']:8.1f} {s['p90_ms']:8.1f} {s['max_ms']:8.1f} {s['min_ms']:8.1f}")
    hm = s["handler_metrics"]
    if hm.get("count"):
        print(f"    operator's own handler time: {hm['mean_ms']:.1f} ms mean over {int(hm['count'])} calls")
    if args.burst:
        b = result["burst"]
        pj = b["per_job_latency"]
        print(f"(b) {b['n']} PruneJobs at once ({b['create_threads']} POST threads, all POSTed in {b['post_all_s']:.2f} s), "
              f"fresh cluster + operator after {len(b['warmup_s'])} warm-up PruneJobs "
              f"({', '.join(f'{w * 1e3:.0f}' for w in b['warmup_s'])} ms)")
        print(f"    all controller Jobs exist after {b['all_jobs_s']:.2f} s -> {b['throughput_per_s']:.1f} PruneJobs/s")
        print(f"    per PruneJob (its POST -> its Job): median {pj['median_ms']:.0f} ms, p90 {pj['p90_ms']:.0f} ms, "
              f"max {pj['max_ms']:.0f} ms")
        hm = b["handler_metrics"]
        if hm.get("count"):
            print(f"    operator's own handler time: {hm['mean_ms']:.1f} ms mean over {int(hm['count'])} calls")
    print(f"total {result['total_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

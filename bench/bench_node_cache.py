"""Bytes pulled from S3 per node per PruneJob, against the model's size (goal <= 1.0).

    .venv/bin/python bench/bench_node_cache.py --out bench/results/cpu_node_cache.json

Reuses the test infrastructure in `tests/` (imported through sys.path): `s3_server.start_moto`
(moto's S3 server in its own process, on 127.0.0.1) and `s3_server.FaultProxy`, here as a
pass-through proxy that logs every request the "nodes" make.

1. Writes a model-like folder: `--shards` safetensors files (valid headers, random bytes)
   of `--size-mb` MiB together, plus config/tokenizer/index JSON, and uploads it with
   `open_store("s3://models").put_file` (straight to moto). With the defaults each shard is
   80 MiB, above S3Store's 64 MiB multipart threshold, so the upload is multipart and the
   downloads are ranged (boto3's transfer manager).
2. Node A: `--workers` processes (spawn), started together behind a barrier, each calling
   `NodeCache(root_a).fetch(store, "llama-like")` - the worker pods of one node sharing a
   hostPath. Then the same number again, now that the cache is warm ("cached fetches").
3. Node B: a different cache root, `--workers` processes again: it downloads its own copy, once.

Bytes downloaded are counted two ways: NodeCache's own per-node counter
(`<root>/.stats.json`, data bytes of the files it wrote), and independently from the proxy's
request log (Range headers of the GETs of data objects, or the whole object when not ranged;
completion markers, HEADs and listings are counted apart as overhead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "pruner_image"))

from s3_server import DUMMY_ENV, UNSET_ENV, FaultProxy, make_bucket, start_moto  # noqa: E402

MiB = 1 << 20
BUCKET, PREFIX = "models", "llama-like"


# -- the model folder --------------------------------------------------------------------------

def write_model(folder: Path, size_mb: float, shards: int, seed: int = 0) -> dict[str, int]:
    """Safetensors shards with one uint8 tensor each (random bytes), plus small JSON files."""
    folder.mkdir(parents=True, exist_ok=True)
    total = int(size_mb * MiB)
    per = [total // shards + (1 if i < total % shards else 0) for i in range(shards)]
    weight_map = {}
    rng_state = hashlib.sha256(str(seed).encode()).digest()
    for i, n in enumerate(per):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensor = f"model.layers.{i}.weight"
        header = json.dumps({tensor: {"dtype": "U8", "shape": [n], "data_offsets": [0, n]},
                             "__metadata__": {"format": "pt"}}).encode()
        header += b" " * (-len(header) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            left = n
            while left:
                chunk = min(left, 8 * MiB)
                f.write(os.urandom(chunk))
                left -= chunk
        weight_map[tensor] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "note": "random bytes for bench_node_cache.py"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel",
                                                        "vocab": {f"t{i}": i for i in range(2000)}}}))
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


# -- the worker pods ---------------------------------------------------------------------------

def worker(store, root: str, barrier, queue) -> None:
    from selfpruner.storage.node_cache import NodeCache

    cache = NodeCache(root)
    barrier.wait()
    t0 = time.time()
    try:
        path = cache.fetch(store, PREFIX)
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        path, error = None, f"{type(e).__name__}: {e}"
    t1 = time.time()
    queue.put({"pid": os.getpid(), "start": t0, "end": t1, "wall_s": t1 - t0, "bytes": cache.bytes_downloaded,
               "files": cache.files_downloaded, "path": str(path) if path else None, "error": error})


def fetch_round(ctx, store, root: Path, k: int) -> dict:
    barrier = ctx.Barrier(k + 1)
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(store, str(root), barrier, queue)) for _ in range(k)]
    t_spawn = time.time()
    for p in procs:
        p.start()
    barrier.wait(timeout=120)   # every worker has imported boto3 & co. and opened its cache
    t_go = time.time()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise RuntimeError(f"fetch failed: {errors}")
    downloaders = [r for r in results if r["bytes"]]
    others = [r for r in results if not r["bytes"]]
    walls = [r["wall_s"] for r in results]
    return {"workers": k, "spawn_to_ready_s": t_go - t_spawn,
            "round_s": max(r["end"] for r in results) - t_go,
            "downloaders": len(downloaders),
            "downloader_wall_s": [r["wall_s"] for r in downloaders],
            "others_wall_s": {"median": statistics.median([r["wall_s"] for r in others]) if others else None,
                              "max": max((r["wall_s"] for r in others), default=None),
                              "min": min((r["wall_s"] for r in others), default=None)},
            "wall_s_all": walls, "bytes_by_worker": [r["bytes"] for r in results],
            "paths": sorted({r["path"] for r in results})}


# -- the proxy's view --------------------------------------------------------------------------

def proxy_bytes(requests: list, sizes: dict[str, int]) -> dict:
    """Bytes of data objects served, from the request log (path-style URLs)."""
    data_bytes = 0
    counts: Counter = Counter()
    per_key: Counter = Counter()
    for method, path, rng, status in requests:
        path = path.split("?", 1)[0]
        key = path.removeprefix(f"/{BUCKET}/{PREFIX}/")
        if key == path or status >= 300:
            counts[f"{method} other"] += 1
            continue
        if key.endswith(".complete"):
            counts[f"{method} marker"] += 1
            continue
        counts[f"{method} data"] += 1
        if method != "GET":
            continue
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else sizes[key] - 1
            n = min(end, sizes[key] - 1) - start + 1
        else:
            n = sizes[key]
        data_bytes += n
        per_key[key] += n
    return {"data_bytes": data_bytes, "requests": dict(counts), "per_key_bytes": dict(per_key),
            "log": [list(r) for r in requests] if len(requests) <= 200 else f"{len(requests)} requests"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=160, help="total size of the safetensors shards, MiB")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=8, help="worker pods (processes) per node")
    ap.add_argument("--no-proxy", action="store_true", help="fetch from moto directly (no request log)")
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    for name in UNSET_ENV:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_ENV)   # inherited by the spawned workers
    from selfpruner.storage import open_store
    from selfpruner.storage.s3 import S3Store

    t_start = time.perf_counter()
    result: dict = {"benchmark": "node_cache_bytes", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-node-cache-") as tmp:
        tmp = args.workdir or Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        moto, endpoint = start_moto(tmp / "moto.log")
        proxy = None
        try:
            t0 = time.perf_counter()
            sizes = write_model(tmp / "model", args.size_mb, args.shards)
            model_bytes = sum(sizes.values())
            result["model"] = {"files": sizes, "bytes": model_bytes, "write_s": time.perf_counter() - t0}

            make_bucket(endpoint, BUCKET)
            uploader = open_store(f"s3://{BUCKET}", endpoint_url=endpoint)
            assert isinstance(uploader, S3Store)
            t0 = time.perf_counter()
            for name in sizes:
                uploader.put_file(f"{PREFIX}/{name}", tmp / "model" / name)
            result["model"]["upload_s"] = time.perf_counter() - t0
            result["store"] = {"multipart_threshold": uploader.multipart_threshold,
                               "multipart_chunksize": uploader.multipart_chunksize,
                               "max_concurrency": uploader.max_concurrency}

            if not args.no_proxy:
                proxy = FaultProxy(endpoint).__enter__()
            store = open_store(f"s3://{BUCKET}", endpoint_url=proxy.url if proxy else endpoint)

            nodes = {}
            for node, rounds in (("A", ("cold", "warm")), ("B", ("cold",))):
                root = tmp / f"node-{node}"
                nodes[node] = {"root": str(root)}
                for label in rounds:
                    if proxy:
                        with proxy.lock:
                            proxy.requests.clear()
                    r = fetch_round(ctx, store, root, args.workers)
                    if proxy:
                        with proxy.lock:
                            log = list(proxy.requests)
                        r["proxy"] = proxy_bytes(log, sizes)
                    nodes[node][label] = r
                from selfpruner.storage.node_cache import NodeCache
                cache = NodeCache(root)
                node_bytes = cache.node_bytes_downloaded()
                folder = cache.path_for(store, PREFIX)
                got = {p.name: p.stat().st_size for p in folder.iterdir()}
                nodes[node].update({"node_bytes_downloaded": node_bytes, "ratio": node_bytes / model_bytes,
                                    "folder_matches_model": got == sizes})
                if proxy:
                    pulled = sum(nodes[node][label]["proxy"]["data_bytes"] for label in rounds)
                    nodes[node]["proxy_data_bytes"] = pulled
                    nodes[node]["proxy_ratio"] = pulled / model_bytes
            result["nodes"] = nodes
        finally:
            if proxy:
                proxy.__exit__(None, None, None)
            moto.terminate()
            moto.wait(10)
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t_start

    m = result["model"]
    print(f"model: {len(m['files'])} files, {m['bytes'] / MiB:.1f} MiB (written in {m['write_s']:.1f} s, "
          f"uploaded to moto in {m['upload_s']:.1f} s, multipart above {result['store']['multipart_threshold'] // MiB} MiB); "
          f"{args.workers} worker processes per node; {'direct to moto' if args.no_proxy else 'through a logging proxy'}")
    hdr = f"{'node':4} {'round':5} {'downloaders':>11} {'1st fetch s':>11} {'others s (med/max)':>19} {'node bytes/model':>16} {'proxy bytes/model':>17}"
    print(hdr)
    print("-" * len(hdr))
    for node, info in result["nodes"].items():
        for label in ("cold", "warm"):
            if label not in info:
                continue
            r = info[label]
            first = f"{r['downloader_wall_s'][0]:.2f}" if r["downloader_wall_s"] else "-"
            o = r["others_wall_s"]
            others = f"{o['median']:.4f}/{o['max']:.4f}" if o["median"] is not None else "-"
            data = sum(r["bytes_by_worker"]) / m["bytes"]
            prox = f"{r['proxy']['data_bytes'] / m['bytes']:.3f}" if "proxy" in r else "-"
            print(f"{node:4} {label:5} {r['downloaders']:>11} {first:>11} {others:>19} {data:>16.3f} {prox:>17}")
    for node, info in result["nodes"].items():
        extra = f", by the proxy's log {info['proxy_ratio']:.3f}" if "proxy_ratio" in info else ""
        print(f"node {node}: {info['node_bytes_downloaded'] / MiB:.1f} MiB downloaded = {info['ratio']:.3f} x the model "
              f"(NodeCache's counter){extra}; folder matches the model: {info['folder_matches_model']}")
    if not args.no_proxy:
        print("requests of node A's cold round:", result["nodes"]["A"]["cold"]["proxy"]["requests"])
        print("requests of node A's warm round:", result["nodes"]["A"]["warm"]["proxy"]["requests"])
    print(f"total {result['total_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

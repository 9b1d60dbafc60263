"""Shared pieces of the GPU benchmarks: LLaMA-2-7B- and 70B-shaped models with random weights,
the candidate plans, synchronized timing, export + standalone load (the throughput measurements
are in _throughput.py)."""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

PLAN_NAMES = ("uniform-0.2", "uniform-0.3", "uniform-0.5", "ramp-0.3")


SHAPES = {  # LLaMA-2 shapes; "tiny" keeps each shape's proportions (heads, KV groups, MLP / hidden)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000),
}
TINY = {
    "llama2-7b": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=8, vocab_size=512),
    # 1/32 of the width: 64 heads in 8 KV groups of head_dim 4, MLP 3.5 x hidden, so plans round alike
    "llama2-70b": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=3, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=4, vocab_size=512),
}


def llama_config(tiny: bool = False, shape: str = "llama2-7b"):
    from transformers import LlamaConfig

    kw = (TINY if tiny else SHAPES)[shape]  # tiny: a few-second smoke test of the same code path
    return LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attn_implementation="sdpa", **kw)


def build_model(cfg, device: str, dtype=torch.bfloat16):
    """Random weights initialised directly on `device` in `dtype` (no CPU init)."""
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def plans(geometry, head_mode: str, mlp_multiple: int = 1) -> dict:
    from selfpruner import structure

    n = geometry.num_layers
    ramp = tuple(0.1 + 0.4 * i / (n - 1) for i in range(n))  # 0.1 .. 0.5, mean 0.3
    rates = {"uniform-0.2": structure.Rates.uniform(0.2, n), "uniform-0.3": structure.Rates.uniform(0.3, n),
             "uniform-0.5": structure.Rates.uniform(0.5, n), "ramp-0.3": structure.Rates(block=ramp)}
    return {k: structure.plan_from_rates(geometry, r, head_mode=head_mode, mlp_multiple=mlp_multiple)
            for k, r in rates.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *, warmup: int = 1, repeats: int = 3):
    """(median seconds, all seconds, last result) of fn() with device synchronization."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def machine() -> dict:
    info = {"host_cpu": platform.machine(), "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_and_load(pm, out_dir: Path, device: str, dtype=torch.bfloat16, info: dict | None = None):
    """Export the applied candidate, load it standalone; (model, facts)."""
    from selfpruner import export
    from transformers import AutoModelForCausalLM

    sync()
    t = time.perf_counter()
    export.export(pm, None, out_dir, info=info or {}, force=True)
    t_export = time.perf_counter() - t
    meta = json.loads((Path(out_dir) / "pruning.json").read_text())
    remote = meta["loads_with"] != "plain"
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype, trust_remote_code=remote,
                                                 device_map=device)
    model.eval().requires_grad_(False)
    sync()
    facts = {"export_s": t_export, "load_s": time.perf_counter() - t, "loads_with": meta["loads_with"],
             "checkpoint_bytes": folder_bytes(out_dir), "class": type(model).__name__,
             "params": sum(p.numel() for p in model.parameters())}
    return model, facts


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def setup(cfg, device: str, *, metric: str = "wanda-sp", calibration_windows: int = 4, calibration_seq_len: int = 2048,
          seed: int = 0) -> dict:
    """Random model, random calibration tokens, statistics and scores (timed)."""
    from selfpruner import calibration, importance
    from selfpruner.architecture import geometry_of

    torch.manual_seed(seed)
    out = {"timings": {}}
    t = time.perf_counter()
    out["model"] = build_model(cfg, device)
    sync()
    out["timings"]["build_s"] = time.perf_counter() - t
    cal = torch.randint(cfg.vocab_size, (calibration_windows * calibration_seq_len,),
                        generator=torch.Generator().manual_seed(seed + 1))
    t = time.perf_counter()
    out["stats"] = calibration.collect(out["model"], cal, num_windows=calibration_windows,
                                       seq_len=calibration_seq_len, progress=False)
    sync()
    out["timings"]["calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["scores"] = importance.score_model(out["model"], out["stats"], metric)
    out["timings"]["score_s"] = time.perf_counter() - t
    out["geometry"] = geometry_of(cfg)
    return out


def batches(spec: str) -> list[int]:
    """Batch sizes from a comma-separated option (--decode-batches)."""
    return [int(b) for b in str(spec).split(",") if b]


def shrink_for_tiny(args) -> None:
    """--tiny: small shapes everywhere, so the smoke test takes seconds."""
    for name, small in (("seq_len", 64), ("batch_size", 2), ("eval_tokens", 512), ("calibration_seq_len", 64),
                        ("prefill_batch", 2), ("prefill_seq", 64), ("decode_prompt", 8), ("decode_new", 8)):
        if hasattr(args, name):
            setattr(args, name, min(getattr(args, name), small))
    for name in ("decode_batches", "eager_batches"):  # batch 16 becomes 4
        if getattr(args, name, None) is not None:
            setattr(args, name, ",".join(str(min(b, 4)) for b in batches(getattr(args, name))))

"""One pass over calibration text, collecting what the importance metrics need.

For every block we record, per input channel of ``o_proj`` (the attention heads'
outputs) and of ``down_proj`` (the MLP channels), the sum and the sum of squares of the
activations over all calibration tokens, accumulated in float64. Memory is two vectors
per projection, whatever the amount of text. The result is an artifact: saved under a
key of (model, text, windows, seq len) and reused when the key matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import text_fingerprint
from .errors import UserError
from .paths import cache_dir, partial_name


@dataclass
class ChannelStats:
    total: torch.Tensor  # [C] float64, sum of x
    total_sq: torch.Tensor  # [C] float64, sum of x^2
    count: int  # tokens seen

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance of each channel over the calibration tokens."""
        n = self.count
        return ((self.total_sq - self.total**2 / n) / max(n - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each channel's activations over all tokens (Wanda's ||x_j||)."""
        return self.total_sq.sqrt()


@dataclass
class CalibrationStats:
    attention: list[ChannelStats]  # input of o_proj, per block
    mlp: list[ChannelStats]  # input of down_proj, per block
    key: str

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, (a, m) in enumerate(zip(self.attention, self.mlp)):
            tensors[f"{i}.attention.sum"], tensors[f"{i}.attention.sum_sq"] = a.total, a.total_sq
            tensors[f"{i}.mlp.sum"], tensors[f"{i}.mlp.sum_sq"] = m.total, m.total_sq
        meta = {"key": self.key, "count": str(self.attention[0].count), "layers": str(len(self.attention))}
        tmp = partial_name(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> "CalibrationStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            count, n = int(meta["count"]), int(meta["layers"])

            def stats(i, part):
                return ChannelStats(f.get_tensor(f"{i}.{part}.sum"), f.get_tensor(f"{i}.{part}.sum_sq"), count)

            return CalibrationStats(
                attention=[stats(i, "attention") for i in range(n)],
                mlp=[stats(i, "mlp") for i in range(n)],
                key=meta["key"],
            )


def model_fingerprint(model) -> str:
    """Cheap but weight-sensitive: config plus a checksum of every tensor."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:{flat.double().sum().item():.10e}:{flat.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def calibration_key(model, ids: torch.Tensor, num_windows: int, seq_len: int) -> str:
    raw = f"{model_fingerprint(model)}:{text_fingerprint(ids)}:{num_windows}:{seq_len}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def windows(ids: torch.Tensor, num_windows: int, seq_len: int) -> torch.Tensor:
    """[num_windows, seq_len] non-overlapping windows from the start of the text."""
    if ids.numel() < seq_len:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    available = ids.numel() // seq_len
    if num_windows > available:
        raise UserError(
            f"the calibration text holds {available} windows of {seq_len} tokens; ask for at most that many"
        )
    return ids[: num_windows * seq_len].view(num_windows, seq_len)


@torch.no_grad()
def collect(model, ids: torch.Tensor, *, num_windows: int = 32, seq_len: int = 512,
            batch_size: int = 1, progress: bool = True) -> CalibrationStats:
    layers = model.get_decoder().layers
    device = next(model.parameters()).device
    acc = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, C]
            s = acc.get(name)
            xd = x.double()
            if s is None:
                acc[name] = [xd.sum(0), (xd * xd).sum(0), x.shape[0]]
            else:
                s[0] += xd.sum(0)
                s[1] += (xd * xd).sum(0)
                s[2] += x.shape[0]

        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(("attention", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(("mlp", i))))
    batches = windows(ids, num_windows, seq_len).split(batch_size)
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model.get_decoder()(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    def stats(part, i):
        total, total_sq, n = acc[(part, i)]
        return ChannelStats(total.cpu(), total_sq.cpu(), n)

    return CalibrationStats(
        attention=[stats("attention", i) for i in range(len(layers))],
        mlp=[stats("mlp", i) for i in range(len(layers))],
        key="",
    )


def calibrate(model, ids: torch.Tensor, *, num_windows: int = 32, seq_len: int = 512,
              batch_size: int = 1, progress: bool = True, cache: bool = True) -> CalibrationStats:
    """Collect statistics, or reuse the saved artifact for the same (model, text, N, seq len)."""
    key = calibration_key(model, ids, num_windows, seq_len)
    path = cache_dir("calibration") / f"{key}.safetensors"
    if cache and path.is_file():
        return CalibrationStats.load(path)
    stats = collect(model, ids, num_windows=num_windows, seq_len=seq_len, batch_size=batch_size, progress=progress)
    stats.key = key
    if cache:
        stats.save(path)
    return stats

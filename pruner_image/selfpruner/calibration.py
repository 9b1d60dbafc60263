"""One pass over calibration text, collecting what the importance metrics need.

For every block we record, per input channel of ``o_proj`` (the attention heads'
outputs) and of ``down_proj`` (the MLP channels), the sum and the sum of squares of the
activations over all calibration tokens, accumulated in float64. Memory is two vectors
per projection, whatever the amount of text. The result is an artifact: saved under a
key of (model, text, windows, seq len) and reused when the key matches.

With ``gram=True`` it also keeps the sum of outer products x xᵀ of each projection's
input (float32, C×C per projection): what the least-squares refit of ``o_proj`` and
``down_proj`` solves with. It is opt-in because it is the one part whose size grows with
the square of the width (0.3 GB for SmolLM2-135M, about 28 GB for an 8B Llama).
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
    gram: torch.Tensor | None = None  # [C, C] float32, sum of x xᵀ (only when asked for)

    @property
    def covariance(self) -> torch.Tensor:
        """Covariance of the channels over the calibration tokens, float32."""
        assert self.gram is not None, "collect with gram=True"
        mean = self.mean
        return (self.gram.double() / self.count - torch.outer(mean, mean)).float()

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

    @property
    def has_gram(self) -> bool:
        return all(s.gram is not None for s in self.attention + self.mlp)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, (a, m) in enumerate(zip(self.attention, self.mlp)):
            tensors[f"{i}.attention.sum"], tensors[f"{i}.attention.sum_sq"] = a.total, a.total_sq
            tensors[f"{i}.mlp.sum"], tensors[f"{i}.mlp.sum_sq"] = m.total, m.total_sq
            if self.has_gram:
                tensors[f"{i}.attention.gram"], tensors[f"{i}.mlp.gram"] = a.gram, m.gram
        meta = {"key": self.key, "count": str(self.attention[0].count), "layers": str(len(self.attention)),
                "gram": str(int(self.has_gram))}
        tmp = partial_name(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> "CalibrationStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            count, n, gram = int(meta["count"]), int(meta["layers"]), meta.get("gram") == "1"

            def stats(i, part):
                return ChannelStats(f.get_tensor(f"{i}.{part}.sum"), f.get_tensor(f"{i}.{part}.sum_sq"), count,
                                    f.get_tensor(f"{i}.{part}.gram") if gram else None)

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
            batch_size: int = 1, progress: bool = True, gram: bool = False) -> CalibrationStats:
    layers = model.get_decoder().layers
    device = next(model.parameters()).device
    acc = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, C]
            s = acc.get(name)
            xd = x.double()
            outer = None
            if gram:
                xf = x.float()
                outer = xf.T @ xf
            if s is None:
                acc[name] = [xd.sum(0), (xd * xd).sum(0), x.shape[0], outer]
            else:
                s[0] += xd.sum(0)
                s[1] += (xd * xd).sum(0)
                s[2] += x.shape[0]
                if gram:
                    s[3] += outer

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
        total, total_sq, n, outer = acc[(part, i)]
        return ChannelStats(total.cpu(), total_sq.cpu(), n, None if outer is None else outer.cpu())

    return CalibrationStats(
        attention=[stats("attention", i) for i in range(len(layers))],
        mlp=[stats("mlp", i) for i in range(len(layers))],
        key="",
    )


def calibrate(model, ids: torch.Tensor, *, num_windows: int = 32, seq_len: int = 512,
              batch_size: int = 1, progress: bool = True, cache: bool = True, gram: bool = False) -> CalibrationStats:
    """Collect statistics, or reuse the saved artifact for the same (model, text, N, seq len).
    A saved artifact without the Gram matrices is collected again (and replaced) when they
    are asked for; one with them serves both."""
    key = calibration_key(model, ids, num_windows, seq_len)
    path = cache_dir("calibration") / f"{key}.safetensors"
    if cache and path.is_file():
        stats = CalibrationStats.load(path)
        if stats.has_gram or not gram:
            return stats
    stats = collect(model, ids, num_windows=num_windows, seq_len=seq_len, batch_size=batch_size, progress=progress,
                    gram=gram)
    stats.key = key
    if cache:
        stats.save(path)
    return stats

"""The dense model's next-token distributions, kept compactly, for the KL fitness.

KL divergence from the dense model ranks candidates better than perplexity on a few windows
(EvoPress, DarwinLM), but it needs the dense distribution at every predicted position, and a
whole one is V floats (49k for SmolLM2): too much to keep for thousands of positions. The dense
model's k most likely tokens hold nearly all of its mass, so we keep their log-probabilities and
ids, plus the rest of the vocabulary as one tail bucket (its log mass); `evaluate.kl_of_windows`
compares over those k + 1 buckets.

Computed with the model dense (the caller's duty: the executor asks before it applies a
candidate), once per (model, text, window length, k) and window: a window drawn afresh for a
screen (`evaluate.select_windows` with a sample) is computed the first time it comes up and
reused after. Window i is tokens i·L .. (i+1)·L of the text, whichever evaluation drew it. Kept
in memory for the process (up to `MEMORY_BYTES`, least recently used out first) and on disk, one
safetensors file per window under `paths.cache_dir("dense_topk")`, written under a partial name
and renamed into place, so processes sharing the cache never see half a file.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import evaluate
from .corpus import text_fingerprint
from .paths import cache_dir, partial_name

MEMORY_BYTES = 1 << 30  # in-process copies; the disk keeps every window regardless


@dataclass
class DenseTopK:
    logp: torch.Tensor  # [n, L-1, k] float32: log p of the dense model's k most likely next tokens, descending
    index: torch.Tensor  # [n, L-1, k] int32 (int64 past 2^31 tokens): those tokens
    tail: torch.Tensor  # [n, L-1] float32: log of the rest of the mass; -inf when k is the whole vocabulary

    @property
    def k(self) -> int:
        return self.logp.shape[-1]


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def reference_key(model_fingerprint: str, ids: torch.Tensor, window_len: int, k: int) -> str:
    """What a window's reference depends on besides its index: the model (`calibration.model_fingerprint`),
    the text, the window length and k."""
    raw = f"{model_fingerprint}:{text_fingerprint(ids)}:{window_len}:{k}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


@torch.no_grad()
def compute(model, wins: torch.Tensor, k: int, *, batch_size: int = 1, logits_chunk: int = 1024,
            progress: bool = False) -> DenseTopK:
    """The top-k reference of every window of `wins` [n, L], uncached: float32 log-softmax of one
    chunk of positions at a time (the same decoder and head path as the fitness), the tail as the
    log-sum-exp of the tokens outside the top k (no cancellation when their mass is tiny)."""
    head = model.get_output_embeddings()
    k = min(k, vocab_size(model))
    n, length = wins.shape
    index_dtype = torch.int32 if vocab_size(model) <= torch.iinfo(torch.int32).max else torch.int64
    logp = torch.empty(n, length - 1, k, dtype=torch.float32)
    index = torch.empty(n, length - 1, k, dtype=index_dtype)
    tail = torch.empty(n, length - 1, dtype=torch.float32)
    for row, start, h, _ in evaluate.hidden_chunks(model, wins, batch_size=batch_size, logits_chunk=logits_chunk,
                                                   progress=progress, desc="dense top-k"):
        lp = head(h).float().log_softmax(-1)  # [B, chunk, V]
        top = lp.topk(k, dim=-1)
        rest = lp.scatter_(-1, top.indices, -math.inf).logsumexp(-1)
        rows, cols = slice(row, row + h.shape[0]), slice(start, start + h.shape[1])
        logp[rows, cols], index[rows, cols], tail[rows, cols] = top.values.cpu(), top.indices.cpu(), rest.cpu()
    return DenseTopK(logp, index, tail)


_Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one window's logp, index, tail


class _Memory:
    """Windows' references by (key, index), least recently used dropped past `MEMORY_BYTES`."""

    def __init__(self):
        self.rows: OrderedDict[tuple[str, int], _Row] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()  # replicas of one process evaluate in threads

    def get(self, key: str, i: int) -> _Row | None:
        with self.lock:
            row = self.rows.get((key, i))
            if row is not None:
                self.rows.move_to_end((key, i))
            return row

    def put(self, key: str, i: int, row: _Row) -> None:
        with self.lock:
            if (key, i) in self.rows:
                return
            self.rows[(key, i)] = row
            self.bytes += _nbytes(row)
            while self.bytes > MEMORY_BYTES and len(self.rows) > 1:
                self.bytes -= _nbytes(self.rows.popitem(last=False)[1])

    def clear(self) -> None:
        with self.lock:
            self.rows.clear()
            self.bytes = 0


def _nbytes(row: _Row) -> int:
    return sum(t.numel() * t.element_size() for t in row)


_MEMORY = _Memory()


def forget() -> None:
    """Drop the in-process copies; the files on disk stay."""
    _MEMORY.clear()


def _load(path: Path, shape: tuple[int, int]) -> _Row | None:
    """A window's file, or None when there is none or it is not one of ours (then it is rewritten)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        row = (t["logp"], t["index"], t["tail"])
    except (OSError, KeyError, SafetensorError):
        return None
    return row if tuple(row[0].shape) == shape and tuple(row[1].shape) == shape else None


def _save(path: Path, row: _Row, key: str) -> None:
    from safetensors.torch import save_file

    tmp = partial_name(path)
    save_file({"logp": row[0], "index": row[1], "tail": row[2]}, str(tmp), metadata={"key": key})
    tmp.replace(path)


def dense_topk(model, ids: torch.Tensor, indices: list[int], *, window_len: int, k: int, batch_size: int = 1,
               logits_chunk: int = 1024, fingerprint: str | None = None, progress: bool = False) -> DenseTopK:
    """The reference of windows `indices` (window i: ids[i·L:(i+1)·L], L = `window_len`), rows in the
    order given: from memory, else from disk, else computed (all missing windows in one pass) and
    stored. `model` must be dense. `fingerprint`: `calibration.model_fingerprint(model)`, which the
    caller should compute once (it reads every weight); None computes it here."""
    if fingerprint is None:
        from .calibration import model_fingerprint

        fingerprint = model_fingerprint(model)
    k = min(k, vocab_size(model))
    for i in indices:
        if i < 0 or (i + 1) * window_len > ids.numel():
            raise ValueError(f"window {i} of {window_len} tokens lies outside the text's {ids.numel()} tokens")
    key = reference_key(fingerprint, ids, window_len, k)
    folder = cache_dir("dense_topk", key)
    shape = (window_len - 1, k)
    rows: dict[int, _Row] = {}
    for i in dict.fromkeys(indices):
        row = _MEMORY.get(key, i) or _load(folder / f"{i}.safetensors", shape)
        if row is not None:
            rows[i] = row
            _MEMORY.put(key, i, row)
    missing = [i for i in dict.fromkeys(indices) if i not in rows]
    if missing:
        wins = torch.stack([ids[i * window_len:(i + 1) * window_len] for i in missing])
        fresh = compute(model, wins, k, batch_size=batch_size, logits_chunk=logits_chunk, progress=progress)
        for j, i in enumerate(missing):
            rows[i] = (fresh.logp[j].clone(), fresh.index[j].clone(), fresh.tail[j].clone())
            _save(folder / f"{i}.safetensors", rows[i], key)
            _MEMORY.put(key, i, rows[i])
    return DenseTopK(*(torch.stack([rows[i][part] for i in indices]) for part in range(3)))

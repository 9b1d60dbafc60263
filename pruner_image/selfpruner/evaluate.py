"""Perplexity, or KL divergence from the dense model, over non-overlapping windows of a
token budget (the fidelity).

Deterministic: the same windows, in the same order, every time. The LM head runs in
chunks of positions and the loss accumulates in float64, so a 49k-token vocabulary
never needs a [batch, seq, vocab] tensor at once. Both fitnesses read the decoder and
the head the same way (`hidden_chunks`), and so does the dense reference the KL compares
with (`dense_reference`), so the dense model scores exactly its own reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import UserError

if TYPE_CHECKING:
    from .dense_reference import DenseTopK


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens predicted
    nll: float  # summed negative log-likelihood, nats

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens}


def window_length(seq_len: int, max_tokens: int | None = None) -> int:
    """Tokens per window: seq_len, or the whole budget where that is smaller (a cheap screen)."""
    return seq_len if max_tokens is None else min(seq_len, max_tokens)


def eval_windows(ids: torch.Tensor, seq_len: int = 2048, max_tokens: int | None = None) -> torch.Tensor:
    """[n, L] windows: L = `window_length`, as many whole windows as the budget holds. A text
    shorter than one window is refused: scoring what there is would measure another context
    length than the one asked for (callers that know the text's name check it up front)."""
    if seq_len < 2:
        raise UserError(f"seq len must be at least 2, got {seq_len}")
    length = window_length(seq_len, max_tokens)
    if length < 2:
        raise UserError(f"an evaluation of {max_tokens} tokens is too short; at least 2 are needed")
    if ids.numel() < length:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {length}")
    budget = ids.numel() if max_tokens is None else min(max_tokens, ids.numel())
    n = budget // length
    return ids[: n * length].view(n, length)


def select_windows(ids: torch.Tensor, seq_len: int = 2048, max_tokens: int | None = None,
                   sample: int | None = None) -> tuple[list[int], torch.Tensor]:
    """(indices, [n, L] windows) of one evaluation. `sample` None: the fixed set, the first windows
    (`eval_windows`). A number: as many windows of the same length, drawn without replacement from
    every window of the text by a generator seeded with it, so a screen sees fresh text each time
    and any machine, or a resumed run, draws the same."""
    if sample is None:
        wins = eval_windows(ids, seq_len, max_tokens)
        return list(range(wins.shape[0])), wins
    import numpy as np

    pool = eval_windows(ids, min(seq_len, max_tokens or ids.numel()))  # every window of that length
    want = eval_windows(ids, seq_len, max_tokens).shape[0]
    picked = sorted(np.random.default_rng(sample).choice(pool.shape[0], size=want, replace=False).tolist())
    return picked, pool[picked]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seq_len: int = 2048, max_tokens: int | None = None,
               batch_size: int = 1, logits_chunk: int = 1024, progress: bool = False,
               sample: int | None = None) -> Perplexity:
    return perplexity_of_windows(model, select_windows(ids, seq_len, max_tokens, sample)[1], batch_size=batch_size,
                                 logits_chunk=logits_chunk, progress=progress)


def hidden_chunks(model, wins: torch.Tensor, *, batch_size: int = 1, logits_chunk: int = 1024,
                  progress: bool = False, desc: str = "perplexity"):
    """(row, start, h, targets) for every chunk of predicted positions of `wins`: h [B, c, H] the
    decoder's output at positions start..start+c of windows row..row+B, targets [B, c] the tokens
    they predict. The caller runs the head on h (`model.get_output_embeddings()`), one chunk's
    logits at a time; targets stay where the windows went (a split model's head may be elsewhere)."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    batches = wins.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    row = 0
    for batch in batches:
        batch = batch.to(device)
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state  # [B, L, H]
        hidden, targets = hidden[:, :-1], batch[:, 1:]
        for start in range(0, hidden.shape[1], logits_chunk):
            yield row, start, hidden[:, start:start + logits_chunk], targets[:, start:start + logits_chunk]
        row += batch.shape[0]


@torch.no_grad()
def perplexity_of_windows(model, wins: torch.Tensor, *, batch_size: int = 1, logits_chunk: int = 1024,
                          progress: bool = False) -> Perplexity:
    head = model.get_output_embeddings()
    parts, count = [], 0  # the losses stay on the device: one host round trip per evaluation, not per chunk
    for _, _, h, targets in hidden_chunks(model, wins, batch_size=batch_size, logits_chunk=logits_chunk,
                                          progress=progress):
        logits = head(h).float()  # [B, chunk, V], on the head's device (a split model's last)
        t = targets.to(logits.device)
        parts.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum").double())
        count += t.numel()
    nll = torch.stack(parts).sum().item()
    return Perplexity(perplexity=math.exp(nll / count), tokens=count, nll=nll)


@dataclass
class Divergence:
    kl: float  # mean KL(dense || pruned) per predicted token, nats
    tokens: int  # tokens predicted

    def to_dict(self) -> dict:
        return {"kl": self.kl, "tokens": self.tokens}


# the log of the smallest normal float32: a pruned model that gives a bucket no mass at all
# costs a large but finite divergence, not an infinite one
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def kl_of_windows(model, wins: torch.Tensor, reference: "DenseTopK", *, batch_size: int = 1,
                  logits_chunk: int = 1024, progress: bool = False) -> Divergence:
    """Mean KL(P || Q) per predicted position of `wins`, P the dense model's next-token distribution
    as `reference` keeps it (its top k tokens and one tail bucket for the rest of the vocabulary,
    `reference` row i for window i), Q the model's as it is now over the same k + 1 buckets:
    sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail). Q's tail is the log-sum-exp of
    its other tokens (1 - sum of its top-k mass, without the cancellation when that sum is near 1).
    Summed in float64 on the device and read once at the end, as perplexity is."""
    if tuple(reference.logp.shape[:2]) != (wins.shape[0], wins.shape[1] - 1):
        raise ValueError(f"the reference holds {tuple(reference.logp.shape[:2])} positions, "
                         f"the windows predict {(wins.shape[0], wins.shape[1] - 1)}")
    head = model.get_output_embeddings()
    parts, count = [], 0
    for row, start, h, _ in hidden_chunks(model, wins, batch_size=batch_size, logits_chunk=logits_chunk,
                                          progress=progress, desc="kl"):
        lq = head(h).float().log_softmax(-1)  # [B, chunk, V], on the head's device
        rows, cols = slice(row, row + h.shape[0]), slice(start, start + h.shape[1])
        index = reference.index[rows, cols].to(lq.device).long()
        lp = reference.logp[rows, cols].to(lq.device).double()
        tail_p = reference.tail[rows, cols].to(lq.device).double()
        lq_top = lq.gather(-1, index)
        tail_q = lq.scatter_(-1, index, -math.inf).logsumexp(-1)  # lq is not needed whole any more
        lq_top, tail_q = lq_top.double().clamp_min(LOG_FLOOR), tail_q.double().clamp_min(LOG_FLOOR)
        top = (lp.exp() * (lp - lq_top)).sum(-1)
        tail = torch.where(torch.isneginf(tail_p), 0.0, tail_p.exp() * (tail_p - tail_q))  # k = V: no tail
        parts.append((top + tail).sum())
        count += top.numel()
    total = torch.stack(parts).sum().item()
    return Divergence(kl=total / count, tokens=count)

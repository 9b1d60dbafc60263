"""Perplexity over non-overlapping windows of a token budget (the fidelity).

Deterministic: the same windows, in the same order, every time. The LM head runs in
chunks of positions and the loss accumulates in float64, so a 49k-token vocabulary
never needs a [batch, seq, vocab] tensor at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens predicted
    nll: float  # summed negative log-likelihood, nats

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens}


def eval_windows(ids: torch.Tensor, seq_len: int = 2048, max_tokens: int | None = None) -> torch.Tensor:
    """[n, L] windows: L = min(seq_len, budget), as many whole windows as the budget holds."""
    if seq_len < 2:
        raise UserError(f"seq len must be at least 2, got {seq_len}")
    budget = ids.numel() if max_tokens is None else min(max_tokens, ids.numel())
    length = min(seq_len, budget)
    if length < 2:
        raise UserError(f"the evaluation text has {ids.numel()} tokens; at least 2 are needed")
    n = budget // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seq_len: int = 2048, max_tokens: int | None = None,
               batch_size: int = 1, logits_chunk: int = 1024, progress: bool = False) -> Perplexity:
    wins = eval_windows(ids, seq_len, max_tokens)
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    parts, count = [], 0  # the losses stay on the device: one host round trip per evaluation, not per chunk
    batches = wins.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for batch in batches:
        batch = batch.to(device)
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state  # [B, L, H]
        hidden, targets = hidden[:, :-1], batch[:, 1:]
        for start in range(0, hidden.shape[1], logits_chunk):
            h = hidden[:, start:start + logits_chunk]
            logits = head(h).float()  # [B, chunk, V], on the head's device (a split model's last)
            t = targets[:, start:start + logits_chunk].to(logits.device)
            parts.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum").double())
            count += t.numel()
    nll = torch.stack(parts).sum().item()
    return Perplexity(perplexity=math.exp(nll / count), tokens=count, nll=nll)

"""Constrained decoding for local chat models: every reply matches its JSON schema.

Built on llguidance (the Rust engine behind Guidance, also a vLLM structured-outputs
backend). Compared for this job: xgrammar needs triton and apache-tvm-ffi (hundreds of MB
on a CPU install); outlines pulls in a whole framework; lm-format-enforcer is pure Python
and slow per token on a 49k-150k vocabulary. llguidance is one 3 MB wheel with no
dependencies, computes a token mask in well under a millisecond, and handles the JSON
Schema features we need (exact array lengths, integer bounds, enums).

`GrammarProcessor` is a transformers `LogitsProcessor` for a batch: one matcher per row,
each with its own schema (or none). It masks, then applies temperature and top-p itself,
after the mask, so nucleus sampling can never remove every allowed token; `generate` is
called with its own warpers switched off.
"""

from __future__ import annotations

import json
import re

import torch


class Grammars:
    """The tokenizer's llguidance view (built once, about a second) and compiled schemas."""

    def __init__(self, tokenizer):
        import llguidance.hf

        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self._compiled: dict[str, str] = {}

    def grammar(self, schema: dict) -> str:
        import llguidance

        key = json.dumps(schema, sort_keys=True)
        if key not in self._compiled:
            # no free whitespace: compact JSON, and a reply whose length the schema bounds
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
            if error:
                raise ValueError(f"llguidance refused the reply schema: {error}")
            self._compiled[key] = grammar
        return self._compiled[key]

    def matcher(self, schema: dict):
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, self.grammar(schema), log_level=1)


def max_reply_chars(schema: dict) -> int:
    """An upper bound on the characters of a compact reply to `schema` (our schemas only),
    so the token budget always lets a constrained reply finish (a token is ≥ 1 character)."""
    kind = schema.get("type")
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    if kind == "integer":
        return max(len(str(schema.get("minimum", -10**9))), len(str(schema.get("maximum", 10**9))))
    if kind == "number":
        return 24
    if kind == "array" and "prefixItems" in schema:
        return 2 + sum(max_reply_chars(item) + 1 for item in schema["prefixItems"])
    if kind == "array":
        n = schema.get("maxItems", 64)
        return 2 + n * (max_reply_chars(schema["items"]) + 1)
    if kind == "string":
        counts = [int(c) for c in re.findall(r"\{(\d+)\}", schema.get("pattern", ""))]
        return 2 + (sum(counts) if counts else schema.get("maxLength", 254))
    if kind == "object":
        props = schema.get("properties", {})
        return 2 + sum(len(json.dumps(k)) + 2 + max_reply_chars(v) for k, v in props.items())
    return 256


class GrammarProcessor:
    """Masks each row of a batch to the tokens its schema allows; rows without a schema pass.
    Temperature and top-p are applied here, after the mask (see the module's docstring)."""

    def __init__(self, grammars: Grammars, schemas: list[dict | None], eos_token_id: int,
                 temperature: float = 0.0, top_p: float = 1.0):
        import llguidance.torch as lt

        self.lt = lt
        self.matchers = [grammars.matcher(s) if s is not None else None for s in schemas]
        self.mask = lt.allocate_token_bitmask(len(schemas), grammars.ll_tokenizer.vocab_size)
        self.eos = eos_token_id
        self.temperature, self.top_p = temperature, top_p
        self.started = False
        self.errors: list[str | None] = [None] * len(schemas)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (batch, prompt + generated so far); scores: (batch, vocab)
        if self.started:
            for i, m in enumerate(self.matchers):
                if m is not None and not m.is_stopped() and self.errors[i] is None:
                    if not m.consume_token(int(input_ids[i, -1])):
                        self.errors[i] = m.get_error() or "token refused"
        self.started = True
        scores = scores.float()
        constrained = [i for i, m in enumerate(self.matchers) if m is not None]
        if constrained:
            self.mask.fill_(-1)  # rows without a grammar keep every token
            for i in constrained:
                m = self.matchers[i]
                if m.is_stopped() or self.errors[i] is not None:
                    self.mask[i].zero_()
                    bit = 1 << (self.eos % 32)  # a finished row may only end
                    self.mask[i, self.eos // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit
                else:
                    self.lt.fill_next_token_bitmask(m, self.mask, i)
            self.lt.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        if self.temperature > 0:
            scores = scores / self.temperature
            if self.top_p < 1:
                scores = _top_p(scores, self.top_p)
        return scores


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_scores.softmax(dim=-1) > top_p  # keep the token that crosses top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, order, sorted_scores)

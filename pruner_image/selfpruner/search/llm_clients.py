"""Chat clients for the LLM that runs the evolution, and the transcript they write.

Every request carries the JSON schema its reply must match (`encoding.py`), and a
generation's requests go out together:

- `OpenAIChat`: any OpenAI-compatible endpoint through the `openai` SDK (hosted APIs,
  vLLM, SGLang, llama.cpp's server ...). It asks for `response_format: json_schema`
  (strict); a server that refuses that format (a 400 about the format: `refuses_format`)
  is asked with `json_object`, then plain, and the refusal is remembered for the rest of
  the run and counted; any other 400 is a failed call. A batch is sent as concurrent
  requests, at most `concurrency` at a time. Timeouts and retries with backoff on 429/5xx
  are the SDK's (it honours Retry-After). A refused key or an unknown model (401, 403,
  404) ends the run at once (`LLMUnavailable`).
- `LocalChat`: a transformers chat model in-process (`demo`, a GGUF file or a Hugging Face
  folder, with its own chat template), decoding constrained to the schema with llguidance
  (`constrained.py`), a whole batch in one `generate`.
- `Transcript`: every call's prompt, schema, reply, token usage, error and time, one JSON
  line each; on resume, calls already in the transcript are replayed instead of asked
  again, so a resumed search sees exactly the replies the interrupted one saw. It also
  tells a dead endpoint from occasional failures (`Transcript.chat_many`): a round whose
  calls all fail ends the run, unless calls were answered before and the round before it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LLMUnavailable
from .llm_errors import FATAL_STATUSES, describe, public_url, refuses_format

RESPONSE_FORMATS = ("json_schema", "json_object", "text")  # tried in this order, from the configured one


class LLMError(Exception):
    """The call produced no reply (timeout, refused, out of retries)."""


@dataclass
class Prompt:
    messages: list[dict]
    schema: dict | None = None  # the reply's JSON schema
    kind: str = ""  # initial, crossover, mutation, selection


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_format: str = ""  # what the server was asked for (OpenAIChat)


@dataclass
class _Outcome:
    reply: Reply | None
    error: str | None = None


class OpenAIChat:
    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.8, seed: int = 0, max_tokens: int = 1024, timeout: float = 60,
                 max_retries: int = 5, response_format: str = "json_schema", concurrency: int = 8):
        from openai import OpenAI

        self._key = os.environ.get(api_key_env) or ""
        self.client = OpenAI(base_url=base_url, api_key=self._key or "not-needed", timeout=timeout,
                             max_retries=max_retries)
        self.endpoint = f"{public_url(str(self.client.base_url))} (model {model})"  # named in errors; no key
        self.model, self.temperature, self.seed, self.timeout = model, temperature, seed, timeout
        self.max_tokens, self.concurrency = max_tokens, max(1, concurrency)
        self.format = response_format
        self.refused: list[str] = []  # response formats this server refused (`refuses_format`), in order
        self._lock = threading.Lock()

    def _response_format(self, fmt: str, schema: dict | None):
        if fmt == "json_schema" and schema is not None:
            return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        if fmt in ("json_schema", "json_object"):
            return {"type": "json_object"}
        return None

    def chat(self, prompt: Prompt, call_index: int = 0) -> Reply:
        import openai

        while True:
            fmt = self.format
            kwargs = dict(model=self.model, messages=prompt.messages, temperature=self.temperature,
                          seed=self.seed + call_index, max_tokens=self.max_tokens)
            rf = self._response_format(fmt, prompt.schema)
            if rf is not None:
                kwargs["response_format"] = rf
            try:
                resp = self.client.chat.completions.create(**kwargs)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if fmt == "text" or not refuses_format(e):
                    raise LLMError(self._describe(e)) from None
                with self._lock:
                    if self.format == fmt:  # this server does not take `fmt`: one step down, for good
                        self.refused.append(fmt)
                        self.format = RESPONSE_FORMATS[RESPONSE_FORMATS.index(fmt) + 1]
                continue
            except openai.APIStatusError as e:
                if e.status_code in FATAL_STATUSES:
                    raise LLMUnavailable(f"LLM endpoint {self.endpoint} refused the request: {self._describe(e)}; "
                                         f"{FATAL_STATUSES[e.status_code]}") from None
                raise LLMError(self._describe(e)) from None
            except openai.APIError as e:
                raise LLMError(self._describe(e)) from None
            if not resp.choices:
                raise LLMError("reply had no choices")
            usage = resp.usage
            return Reply(text=resp.choices[0].message.content or "",
                         prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                         completion_tokens=getattr(usage, "completion_tokens", 0) or 0, response_format=fmt)

    def _describe(self, error) -> str:
        """`describe`, with the API key taken out (some servers quote the key they refused)."""
        text = describe(error, self.timeout)
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def chat_many(self, prompts: list[Prompt], first_index: int = 0) -> list[_Outcome]:
        """One outcome per prompt; raises `LLMUnavailable` on a refused key or an unknown model,
        after asking nothing more once one call has met it."""
        fatal: list[LLMUnavailable] = []

        def one(i: int) -> _Outcome:
            if fatal:
                return _Outcome(None, "not asked")
            try:
                return _Outcome(self.chat(prompts[i], first_index + i))
            except LLMError as e:
                return _Outcome(None, str(e))
            except LLMUnavailable as e:
                fatal.append(e)
                return _Outcome(None, str(e))

        if self.concurrency == 1 or len(prompts) == 1:
            outcomes = [one(i) for i in range(len(prompts))]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
                outcomes = list(pool.map(one, range(len(prompts))))
        if fatal:
            raise fatal[0]
        return outcomes


class LocalChat:
    """A local chat model; `batch_size` prompts go through one `generate`."""

    def __init__(self, source: str = "demo", temperature: float = 0.8, seed: int = 0, max_tokens: int = 1024,
                 device: str = "cpu", top_p: float = 0.95, batch_size: int = 32, loaded=None):
        from ..errors import UserError
        from .constrained import Grammars

        if loaded is None:
            from ..model_source import load

            loaded = load(source, device=device, dtype="bfloat16" if device.startswith("cuda") else "float32")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"llm.model {source!r} has no chat template; use an instruction-tuned chat model")
        if self.tokenizer.pad_token is None:  # batches are left-padded; GGUF tokenizers often name no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.temperature, self.seed, self.max_tokens, self.top_p = temperature, seed, max_tokens, top_p
        self.batch_size = max(1, batch_size)
        self.grammars = Grammars(self.tokenizer)
        self.eos = self.grammars.ll_tokenizer.eos_token

    def chat_many(self, prompts: list[Prompt], first_index: int = 0) -> list[_Outcome]:
        out: list[_Outcome] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._generate(prompts[start:start + self.batch_size], first_index + start)
        return out

    def _generate(self, prompts: list[Prompt], first_index: int) -> list[_Outcome]:
        import torch

        from .constrained import GrammarProcessor, max_reply_chars

        tok = self.tokenizer
        texts = [tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
        side, tok.padding_side = tok.padding_side, "left"  # generation continues every row at the right
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        finally:
            tok.padding_side = side
        schemas = [p.schema for p in prompts]
        budget = max(max_reply_chars(s) + 1 if s is not None else self.max_tokens for s in schemas)
        processor = GrammarProcessor(self.grammars, schemas, self.eos, temperature=self.temperature,
                                     top_p=self.top_p)
        torch.manual_seed(self.seed * 1_000_003 + first_index)
        sample = self.temperature > 0
        with torch.inference_mode():
            # the processor does temperature and top-p after its mask, so generate's own are off
            warpers = dict(temperature=1.0, top_p=1.0, top_k=0) if sample else {}
            ids = self.model.generate(**enc, max_new_tokens=budget, do_sample=sample, logits_processor=[processor],
                                      eos_token_id=self.eos, pad_token_id=tok.pad_token_id, **warpers)
        prompt_len = enc.input_ids.shape[1]
        outcomes = []
        for row in range(len(prompts)):
            new = ids[row, prompt_len:].tolist()
            if self.eos in new:
                new = new[: new.index(self.eos) + 1]
            text = tok.decode(new, skip_special_tokens=True)
            outcomes.append(_Outcome(Reply(text=text, prompt_tokens=int(enc.attention_mask[row].sum()),
                                           completion_tokens=len(new))))
        return outcomes


def prompt_hash(prompt: Prompt) -> str:
    return hashlib.sha256(json.dumps([prompt.messages, prompt.schema], sort_keys=True).encode()).hexdigest()[:16]


def read_calls(text: str) -> list[dict]:
    """A transcript's calls, in order, up to a torn last line (a crash mid-write: asked again from there)."""
    calls = []
    for line in text.splitlines():
        try:
            calls.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return calls


def continues(calls: list[dict], earlier: list[dict]) -> bool:
    """Whether `calls` is `earlier` and more: the same search went on asking after `earlier` was
    saved (and so its further calls are the ones a resumed search would ask next)."""
    return len(calls) > len(earlier) and calls[: len(earlier)] == earlier


@dataclass
class Transcript:
    """Wraps a client: numbers calls, records them, replays recorded ones on resume."""

    client: object
    path: Path
    recorded: list[dict] = field(default_factory=list)
    calls: int = 0
    answered: int = 0  # calls of this search that got a reply so far (replayed ones included)
    round_failed: bool = False  # whether every call of the last round failed

    def __post_init__(self):
        self.path = Path(self.path)
        if self.path.is_file():
            self.recorded = read_calls(self.path.read_text())

    def rewind(self, calls: int) -> None:
        """Continue from a checkpoint that had made `calls` calls (and had seen their answers)."""
        self.calls = calls
        made = self.recorded[:calls]
        self.answered = sum(1 for e in made if not e.get("error"))
        last = [e for e in made if e.get("batch") == made[-1].get("batch")] if made else []
        self.round_failed = bool(last) and all(e.get("error") for e in last)

    def _give_up_if_unavailable(self, entries: list[dict]) -> None:
        """Raise `LLMUnavailable` when a round's calls all failed (each after its retries) and
        either none of the search's calls was ever answered (nothing listens there, or it refuses
        every request) or the round before failed whole as well (the endpoint went away mid-run).
        Otherwise the failures are occasional: the search replaces them with classical operators.
        A round of one call (the selection) failing after answers is such an occasional failure."""
        if not entries or any(not e["error"] for e in entries):
            return
        if self.answered and not self.round_failed:
            return
        why = "no call had been answered before" if not self.answered else "so had the round before"
        endpoint = getattr(self.client, "endpoint", type(self.client).__name__)
        raise LLMUnavailable(f"LLM endpoint {endpoint} is unavailable: all {len(entries)} calls of a round failed "
                             f"and {why}; last error: {entries[-1]['error']}")

    def _note(self, entries: list[dict]) -> None:
        if entries:
            self.answered += sum(1 for e in entries if not e.get("error"))
            self.round_failed = all(e.get("error") for e in entries)

    @property
    def refused_formats(self) -> list[str]:
        return list(getattr(self.client, "refused", []))

    def chat_many(self, prompts: list[Prompt]) -> tuple[list[Reply | None], float]:
        """Replies (None for a failed call) to `prompts`, asked as one batch, and the batch's
        seconds (as recorded, so a resumed run reports the time the first run spent). A recorded
        failure is replayed as a failure. Raises `LLMUnavailable` for a dead endpoint (see
        `_give_up_if_unavailable`; the client raises it for a refused key or an unknown model);
        that round is not recorded, so a resumed run asks it again."""
        first = self.calls
        self.calls += len(prompts)
        keys = [prompt_hash(p) for p in prompts]
        replay = all(first + i < len(self.recorded) and self.recorded[first + i].get("prompt_hash") == k
                     for i, k in enumerate(keys))
        if replay:
            entries = self.recorded[first:first + len(prompts)]
        else:
            del self.recorded[first:]
            start = time.perf_counter()
            outcomes = self.client.chat_many(prompts, first)
            seconds = round(time.perf_counter() - start, 3)
            entries = []
            for i, (p, o) in enumerate(zip(prompts, outcomes)):
                r = o.reply
                entries.append({"call": first + i, "batch": first, "batch_size": len(prompts),
                                "batch_seconds": seconds, "kind": p.kind, "prompt_hash": keys[i],
                                "messages": p.messages, "schema": p.schema,
                                "reply": r.text if r else None, "error": o.error,
                                "response_format": r.response_format if r else None,
                                "prompt_tokens": r.prompt_tokens if r else 0,
                                "completion_tokens": r.completion_tokens if r else 0})
            self._give_up_if_unavailable(entries)  # before recording: a resumed run asks that round again
            self.recorded += entries
            self._rewrite()
        self._note(entries)
        replies = [None if e.get("error") else Reply(e["reply"], e["prompt_tokens"], e["completion_tokens"],
                                                     e.get("response_format") or "") for e in entries]
        return replies, float(entries[0].get("batch_seconds", 0.0)) if entries else 0.0

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for e in self.recorded:
                f.write(json.dumps(e) + "\n")
        os.replace(tmp, self.path)


def batch_seconds(entries: list[dict]) -> dict:
    """Each batch's wall seconds, once per batch (its calls all carry the batch's time)."""
    return {e.get("batch", e.get("call")): float(e.get("batch_seconds") or 0.0) for e in entries}


def totals(transcript: Transcript) -> dict:
    """Usage over every call the search has made so far (replayed ones included)."""
    made = transcript.recorded[: transcript.calls]
    batches = batch_seconds(made)
    return {
        "calls": len(made),
        "batches": len(batches),
        "failed_calls": sum(1 for e in made if e.get("error")),
        "prompt_tokens": sum(e.get("prompt_tokens", 0) for e in made),
        "completion_tokens": sum(e.get("completion_tokens", 0) for e in made),
        "seconds": round(sum(batches.values()), 3),
        "refused_response_formats": transcript.refused_formats,
    }

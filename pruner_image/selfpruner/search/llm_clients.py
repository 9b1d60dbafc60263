"""Chat clients for the LLM that runs the evolution, and the transcript they write.

- `OpenAIChat`: any OpenAI-compatible endpoint through the `openai` SDK (hosted APIs,
  vLLM, llama.cpp's server ...): timeouts, retries with backoff on 429/5xx (the SDK's,
  which honours Retry-After), JSON mode where the server accepts it.
- `LocalChat`: a transformers chat model in-process, by default the demo's own
  SmolLM2-135M-Instruct, so the model proposes its own pruning.
- `Transcript`: every call's prompt, reply, token usage and error, one JSON line each;
  on resume, calls already in the transcript are replayed instead of asked again, so a
  resumed search sees exactly the replies the interrupted one saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


class LLMError(Exception):
    """The call produced no reply (timeout, refused, out of retries)."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIChat:
    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.8, seed: int = 0, max_tokens: int = 1024, timeout: float = 60,
                 max_retries: int = 5, json_mode: bool = True):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "not-needed",
                             timeout=timeout, max_retries=max_retries)
        self.model, self.temperature, self.seed = model, temperature, seed
        self.max_tokens, self.json_mode = max_tokens, json_mode

    def chat(self, messages: list[dict], call_index: int = 0) -> Reply:
        import openai

        kwargs = dict(model=self.model, messages=messages, temperature=self.temperature,
                      seed=self.seed + call_index, max_tokens=self.max_tokens)
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except openai.BadRequestError as e:
            if not self.json_mode:
                raise LLMError(f"request refused: {e}") from None
            self.json_mode = False  # this server has no JSON mode; ask again without it
            return self.chat(messages, call_index)
        except (openai.APIError, openai.APITimeoutError) as e:
            raise LLMError(f"{type(e).__name__}: {e}") from None
        if not resp.choices:
            raise LLMError("reply had no choices")
        usage = resp.usage
        return Reply(text=resp.choices[0].message.content or "",
                     prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                     completion_tokens=getattr(usage, "completion_tokens", 0) or 0)


class LocalChat:
    """A local chat model. `prefill` starts the assistant's reply (e.g. with `{"candidates": [`),
    which steers a small model into the JSON the prompt asks for; it is part of the reply."""

    def __init__(self, source: str = "demo", temperature: float = 0.8, seed: int = 0, max_tokens: int = 1024,
                 device: str = "cpu", prefill: str = '{"candidates": [['):
        from ..model_source import load

        loaded = load(source, device=device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.temperature, self.seed, self.max_tokens, self.prefill = temperature, seed, max_tokens, prefill

    def chat(self, messages: list[dict], call_index: int = 0) -> Reply:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt += self.prefill
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
        torch.manual_seed(self.seed * 1_000_003 + call_index)
        sample = self.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                ids, max_new_tokens=self.max_tokens, do_sample=sample,
                temperature=self.temperature if sample else None, top_p=0.95 if sample else None,
                pad_token_id=self.tokenizer.eos_token_id,
                stop_strings=["]]"], tokenizer=self.tokenizer,  # the candidate list is closed: done
            )
        new = out[0, ids.shape[1]:]
        text = self.prefill + self.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(text=text, prompt_tokens=int(ids.shape[1]), completion_tokens=int(new.numel()))


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


class Transcript:
    """Wraps a client: numbers calls, records them, replays recorded ones on resume."""

    def __init__(self, client, path: str | Path):
        self.client, self.path = client, Path(path)
        self.recorded: list[dict] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.recorded.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: ask again from here
        self.calls = 0
        self.stats = {"calls": 0, "failed_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "replayed": 0}

    def rewind(self, calls: int) -> None:
        """Continue from a checkpoint that had made `calls` calls."""
        self.calls = calls

    def chat(self, messages: list[dict], kind: str = "") -> Reply:
        index = self.calls
        self.calls += 1
        key = prompt_hash(messages)
        entry = self.recorded[index] if index < len(self.recorded) else None
        if entry is not None and entry.get("prompt_hash") == key:
            self.stats["replayed"] += 1
            reply = None if entry.get("error") else Reply(entry["reply"], entry["prompt_tokens"], entry["completion_tokens"])
        else:
            del self.recorded[index:]
            start = time.perf_counter()
            try:
                reply, error = self.client.chat(messages, call_index=index), None
            except LLMError as e:
                reply, error = None, str(e)
            entry = {"call": index, "kind": kind, "prompt_hash": key, "messages": messages,
                     "reply": reply.text if reply else None, "error": error,
                     "prompt_tokens": reply.prompt_tokens if reply else 0,
                     "completion_tokens": reply.completion_tokens if reply else 0,
                     "seconds": round(time.perf_counter() - start, 3)}
            self.recorded.append(entry)
            self._rewrite()
        self.stats["calls"] += 1
        self.stats["prompt_tokens"] += entry["prompt_tokens"]
        self.stats["completion_tokens"] += entry["completion_tokens"]
        if reply is None:
            self.stats["failed_calls"] += 1
            raise LLMError(entry["error"])
        return reply

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for e in self.recorded:
                f.write(json.dumps(e) + "\n")
        os.replace(tmp, self.path)


def totals(transcript: "Transcript") -> dict:
    """Usage over every call the search has made so far (replayed ones included)."""
    made = transcript.recorded[: transcript.calls]
    return {
        "calls": len(made),
        "failed_calls": sum(1 for e in made if e.get("error")),
        "prompt_tokens": sum(e.get("prompt_tokens", 0) for e in made),
        "completion_tokens": sum(e.get("completion_tokens", 0) for e in made),
    }

"""A real HTTP server speaking the chat-completions protocol, with scripted replies.

It stands in for a structured-outputs server (vLLM, SGLang, llama.cpp), which is too heavy
to start in every test here: when a request carries `response_format: json_schema`, the
default reply matches that schema; `refuse` makes it answer 400 to the response formats a
server without them refuses. Run in-process (a thread) by tests, or as its own process
(`python chat_server.py PORT DIM`) for tests that kill the search. Scripted responses are
consumed one HTTP request at a time (retries included); when the script is empty a default
reply is generated.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, model: str = "scripted") -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}


def good_candidates(prompt: str, count: int, dim: int, ratio: float = 0.3, percent: bool = True,
                    hi: int = 60) -> str:
    """Feasible candidates (mean exactly `ratio`, in [0, hi] percent, on the 1 % grid), deterministic
    in the prompt: pairs of blocks trade pruning from the uniform allocation. As integer percents
    (the project's encoding) or, with `percent=False`, as fractions."""
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    cands = []
    for _ in range(count):
        units = [round(ratio * 100)] * dim
        for _ in range(4):
            i, j = rng.sample(range(dim), 2)
            step = min(rng.randint(1, 10), hi - units[i], units[j])
            units[i] += step
            units[j] -= step
        cands.append(units if percent else [u / 100 for u in units])
    return json.dumps({"candidates": cands})


def good_selection(prompt: str, pairs: int, singles: int, size: int) -> str:
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    top = max(2, size // 2)  # a sensible LLM prefers the better half
    return json.dumps({"crossover": [rng.sample(range(1, top + 1), 2) for _ in range(pairs)],
                       "mutation": [rng.randint(1, top) for _ in range(singles)]})


def default_reply(body: dict, dim: int) -> str:
    """What a well-behaved structured-outputs server answers: a reply matching the request's
    JSON schema when it sent one, else one read off the prompt. Told that its reply repeated a
    candidate ("Reply again"), it writes new ones, as a sampling model does: the candidates are
    drawn from the whole conversation, not from the notice alone, which is the same every time."""
    prompt = body["messages"][-1]["content"]
    conversation = "\n".join(m["content"] for m in body["messages"])
    ratio = re.search(r"must be exactly (\d+(?:\.\d+)?)", conversation)
    ratio = float(ratio.group(1)) / 100 if ratio else 0.3
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if "Choose the parents" in prompt:
        size = int(re.search(r"numbered 1 to (\d+)", prompt).group(1))
        pairs = int(re.search(r"(\d+) pairs", prompt).group(1))
        singles = int(re.search(r"and (\d+) candidates to mutate", prompt).group(1))
        return good_selection(prompt, pairs, singles, size)
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    if '{"take":' in prompt:
        dim = int(re.search(r"for each of the (\d+) positions", prompt).group(1))
        return json.dumps({"take": "".join(rng.choice("AB") for _ in range(dim))})
    if '{"moves":' in prompt:
        last = int(re.search(r"numbered from 0 to (\d+)", prompt).group(1))
        return json.dumps({"moves": [[rng.randint(0, last), rng.randint(0, last), rng.randint(1, 10)]
                                     for _ in range(rng.randint(1, 4))]})
    if schema is not None:
        cands = schema["properties"]["candidates"]
        count = cands["minItems"]
        seed = prompt if len(body["messages"]) <= 2 else conversation  # a first turn: system + user
        return good_candidates(seed, count, cands["items"]["minItems"], ratio, hi=cands["items"]["items"]["maximum"])
    wanted = re.search(r"Write (\d+) ", prompt)
    count = int(wanted.group(1)) if wanted else len(re.findall(r"^\d+\. ", prompt.split("below")[-1], flags=re.MULTILINE))
    return good_candidates(prompt, max(count, 1), dim, ratio)


def refusal(fmt: str) -> dict:
    """OpenAI's answer to a response format the model does not take."""
    return {"error": {"message": f"Invalid parameter: 'response_format' of type '{fmt}' is not supported with "
                                 "this model.", "type": "invalid_request_error", "param": "response_format",
                      "code": None}}


def error_body(code: int, message) -> dict:
    """The body of a scripted error: OpenAI's shape around a message, or a whole body as given."""
    if isinstance(message, dict):
        return message
    return {"error": {"message": message if message is not None else f"scripted {code}", "type": "test"}}


class ScriptedChat:
    def __init__(self, script=None, dim: int = 6, delay: float = 0.0, refuse: tuple = (),
                 fail: tuple | None = None):
        self.script = list(script or [])
        self.dim, self.delay = dim, delay
        self.refuse = set(refuse)  # response_format types answered with 400, as a server without them does
        self.fail = fail  # (status, message): the answer to every request once the script is done
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _next(self, body: dict):
        with self.lock:
            self.requests.append(body)
            fmt = (body.get("response_format") or {}).get("type")
            if fmt in self.refuse:
                return ("status", 400, refusal(fmt))
            if self.script:
                action = self.script.pop(0)
                if action[0] != "default":
                    return action
            elif self.fail is not None:
                return ("status", *self.fail)
        return ("reply", default_reply(body, self.dim))

    def _handler(self):
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with chat.lock:
                    chat.authorizations.append(self.headers.get("Authorization"))
                    chat.in_flight += 1
                    chat.max_in_flight = max(chat.max_in_flight, chat.in_flight)
                try:
                    self._answer(chat._next(body))
                finally:
                    with chat.lock:
                        chat.in_flight -= 1

            def _answer(self, action):
                if chat.delay:
                    time.sleep(chat.delay)
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("reply", action[2])
                    kind = "reply"
                if kind == "status":
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    body = error_body(action[1], action[2] if len(action) > 2 else None)
                    payload = json.dumps(body).replace("{key}", key).encode()
                    self.send_response(action[1])
                    self.send_header("retry-after-ms", "10")
                else:
                    payload = json.dumps(completion(action[1])).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        return Handler


if __name__ == "__main__":
    port, dim = int(sys.argv[1]), int(sys.argv[2])
    chat = ScriptedChat(dim=dim, delay=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    chat.server.server_close()
    chat.server = ThreadingHTTPServer(("127.0.0.1", port), chat._handler())
    print("ready", flush=True)
    chat.server.serve_forever()

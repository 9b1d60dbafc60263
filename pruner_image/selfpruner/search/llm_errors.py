"""What an LLM endpoint's errors mean: which 400s refuse the response format (and only those may
step it down), which statuses no retry changes, and how an error reads on one line, without the
key or a URL's password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

# words in a 400's message that place it on the response format (see `refuses_format`)
FORMAT_MARKERS = ("response_format", "json_schema", "json schema", "json_object", "structured output", "guided",
                  "grammar")
# statuses no retry or other call will change: the key is refused, or the model or path does not exist
FATAL_STATUSES = {401: "check the API key (spec.llm.apiKeySecret or apiKeyEnv)",
                  403: "check the API key (spec.llm.apiKeySecret or apiKeyEnv)",
                  404: "check spec.llm.model and spec.llm.baseURL"}


def server_message(error) -> str:
    """The server's own words for an HTTP error, on one line: the `message` of its JSON body
    (OpenAI's, vLLM's, SGLang's and llama.cpp's shapes alike; the SDK has already unwrapped
    `{"error": ...}`), FastAPI's `detail`, or the raw body."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        text = body.get("message") or body.get("detail") or body
    else:
        text = body or getattr(error, "message", "") or str(error)
    return " ".join(str(text).split())


def refuses_format(error) -> bool:
    """Whether a 400 (or 422) refuses the response format, rather than the request as a whole.

    Only then may the client step down to a simpler format, and it does so for the rest of the
    run: a 400 for a prompt past the context length or an unknown parameter would come back
    whatever the format, and stepping down for it would lose the schema (and with it replies
    valid as written) for good. Servers say it in their own words:

    - OpenAI names the field: `param: "response_format"` with "Invalid parameter:
      'response_format' of type 'json_schema' is not supported with this model"; other hosted
      APIs `param: "response_format.type"` ("invalid value: `json_schema`, supported values are:
      `json_object` and `text`"). A `param` naming another field (`messages`, for the context
      length) is not about the format, whatever the message says.
    - vLLM, SGLang and llama.cpp's server send no `param`, only a message: "The provided JSON
      schema contains features not supported by xgrammar", "Failed to transform json schema
      into a grammar" (vLLM); "Grammar-based generation (json_schema, ...) is not supported
      when the server is launched with --grammar-backend none", "Invalid grammar request"
      (SGLang); "JSON schema conversion failed" (llama.cpp). Their context-length messages
      ("This model's maximum context length is 2048 tokens. However, you requested ...", "The
      input (3000 tokens) is longer than the model's context length") and unknown-parameter
      ones carry none of `FORMAT_MARKERS`; our prompts do not either (they say "JSON only").
    """
    param = str(getattr(error, "param", None) or "").strip().lower()
    if param:
        return param.split(".")[0].split("[")[0] == "response_format"
    message = server_message(error).lower()
    return any(marker in message for marker in FORMAT_MARKERS)


def describe(error, timeout: float | None = None) -> str:
    """A failed request on one line: the HTTP status and the server's message, or what kept the
    request from being answered (nothing listening, no reply in time)."""
    import openai

    if isinstance(error, openai.APIStatusError):
        text = f"HTTP {error.status_code}: {server_message(error)}"
    elif isinstance(error, openai.APITimeoutError):
        text = f"no reply within {timeout:g} s" if timeout else "no reply within the timeout"
    elif isinstance(error, openai.APIConnectionError):
        text = f"cannot connect: {error.__cause__ or error}"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def public_url(url: str) -> str:
    """`url` without any user:password part, to be named in messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")

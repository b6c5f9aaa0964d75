"""OpenAI's wire format for ``conflayers-run serve``: requests read and checked, responses written.

Pure functions over JSON values (no web framework here): a request that OpenAI's API would
refuse, or that this server cannot honour (n > 1, logprobs, tools...), is a :class:`BadRequest`
naming the parameter, which the server sends as OpenAI's error object.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingConfig
from .speculative import GenerationStats

MAX_STOP_STRINGS = 4  # as OpenAI's API
# Parameters OpenAI's API has and this server does not honour: refused unless left at their default.
_UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error object."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Request:
    """One completion request, checked: the prompt as text, token ids or chat messages."""

    chat: bool
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seeded: bool = False  # the request named its seed: it wants the same text for the same seed
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: object, chat: bool) -> Request:
    """The checked request of a /v1/chat/completions (``chat``) or /v1/completions body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, defaults in _UNSUPPORTED.items():
        if body.get(name) not in defaults:
            raise BadRequest(f"{name} is not supported by this server: leave it out", name)
    n = _optional(body, "n", int)
    if n not in (None, 1):
        raise BadRequest(f"n must be 1 (this server generates one choice per request), got {n}", "n")
    request = Request(
        chat=chat,
        max_tokens=_max_tokens(body),
        sampling=_sampling(body),
        stop=_stop(body),
        stream=bool(_optional(body, "stream", bool)),
        seeded=body.get("seed") is not None,
    )
    options = _optional(body, "stream_options", dict) or {}
    request.include_usage = bool(_optional(options, "include_usage", bool, "stream_options.include_usage"))
    if chat:
        request.messages = _messages(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return request


def _optional(
    body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], param: str | None = None
) -> Any:
    """``body[name]`` if present and not null, checked to be of ``kind`` (a bool is no number)."""
    value = body.get(name)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                             dict: "an object", list: "an array"}[k] for k in kinds)
        raise BadRequest(f"{param or name} must be {names}, got {type(value).__name__}", param or name)
    return value


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _optional(body, name, int)
    if value is not None and value < 1:
        raise BadRequest(f"{name} must be at least 1, got {value}", name)
    return value


def _sampling(body: Mapping[str, Any]) -> SamplingConfig:
    temperature = _optional(body, "temperature", (int, float))
    top_p = _optional(body, "top_p", (int, float))
    seed = _optional(body, "seed", int)
    if temperature is not None and not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if seed is not None and not 0 <= seed < 2**63:
        raise BadRequest(f"seed must be in [0, 2**63), got {seed}", "seed")
    # OpenAI's default temperature is 1; without a seed each request draws its own.
    return SamplingConfig(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=secrets.randbits(63) if seed is None else seed,
    )


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = _optional(body, "stop", (str, list))
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stops):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return [s for s in stops if s]


def _messages(messages: object) -> list[dict[str, Any]]:
    """Chat turns with string content (OpenAI's content parts of type "text" joined)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array of {role, content} objects", "messages")
    turns = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{param} must be an object", param)
        role = _optional(message, "role", str, f"{param}.role")
        if role is None:
            raise BadRequest(f"{param}.role is required", f"{param}.role")
        content = _content(message.get("content"), f"{param}.content")
        turns.append({**message, "role": role, "content": content})
    return turns


def _content(content: object, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise BadRequest(f"{param} must be a string or an array of text parts", param)


def _prompt(prompt: object) -> str | list[int]:
    """Text, a one-element array of text, or token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return list(prompt)
    raise BadRequest("prompt must be a non-empty string, or an array of token ids", "prompt")


@dataclass
class Outcome:
    """What one generation produced, for the response."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop token or string) or "length"
    mode: str
    draft: str | None
    stats: GenerationStats


def usage(outcome: Outcome) -> dict[str, Any]:
    """OpenAI's usage, with ours: how the tokens were decoded."""
    speculative = outcome.mode == "speculative"
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "conflayers": {
            "mode": outcome.mode,
            "draft": outcome.draft if speculative else None,
            "acceptance_rate": outcome.stats.acceptance_rate if speculative else None,
            "tokens_per_full_pass": outcome.stats.mean_tokens_per_cycle,
            # accepted proposals read from the text (lookup drafting, alone or beside the draft)
            "looked_up_accepted": outcome.stats.looked_up_accepted,
        },
    }


class Writer:
    """Response objects of one request: its id, creation time and model name are shared by all."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text or ""
        elif chunk:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**choice, "logprobs": None, "finish_reason": finish_reason}

    def completion(self, outcome: Outcome) -> dict[str, Any]:
        choice = self._choice(outcome.text, outcome.finish_reason, False)
        return {**self._envelope(False), "choices": [choice], "usage": usage(outcome)}

    def first_chunk(self) -> dict[str, Any]:
        """Chat streams open with the assistant's role (OpenAI's first chunk); completions with ""."""
        chunk = self.chunk("")
        if self.chat:
            chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return chunk

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [self._choice(text, finish_reason, True)]}

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": usage(outcome)}


def stop_hit(full_text: str, stops: Sequence[str]) -> bool:
    return any(stop in full_text for stop in stops)

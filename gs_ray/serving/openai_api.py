"""The OpenAI-compatible HTTP surface: request schemas, validation, model ids, response bodies.

Everything here is plain pydantic and dicts, testable without Ray. A client mistake of
any kind becomes an `APIError` with a 4xx status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`; the ingress turns it into the response.

Model ids: `gs-ray` (the router picks one expert), `gs-ray:expert-<k>` (that expert),
`gs-ray:ensemble` (every expert, mixed by router probabilities), `base` (no adapter).
Expert ids are checked against a strict pattern and the experts of the run, so nothing
from a request ever becomes part of a file path.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gs_ray.core import layout
from gs_ray.data.schemas import json_problem

ROUTED_MODEL = "gs-ray"
ENSEMBLE_MODEL = "gs-ray:ensemble"
BASE_MODEL = layout.BASE_ID
EXPERT_MODEL = re.compile(f"{ROUTED_MODEL}:{layout.EXPERT_ID.pattern}")
"""`gs-ray:expert-<k>`: k decimal without leading zeros (matched in full)."""
MODEL_OWNER = "gs-ray"
MAX_TEMPERATURE = 2.0
"""OpenAI's range for temperature is [0, 2]."""
MAX_STOP_STRINGS = 4
"""OpenAI accepts up to 4 stop sequences."""
CHAT_ROLES = ("system", "user", "assistant")
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds a request may give (OpenAI's is a 64-bit integer); sampling uses the seed modulo 2**64."""


def _absent(value: Any) -> bool:
    return value is None


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _false(value: Any) -> bool:
    return value is None or value is False


def _one(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1)


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_one, "one choice per request (n = 1)"),
    "best_of": (_one, "one candidate per request (best_of = 1)"),
    "logprobs": (_false, "log-probabilities are not returned"),
    "top_logprobs": (_zero, "log-probabilities are not returned"),
    "echo": (_false, "the prompt is not echoed"),
    "suffix": (_empty, "no text is inserted before a suffix"),
    "tools": (_empty, "the model does not call tools"),
    "tool_choice": (lambda value: value is None or value == "none", "the model does not call tools"),
    "functions": (_empty, "the model does not call functions"),
    "function_call": (lambda value: value is None or value == "none", "the model does not call functions"),
    "response_format": (lambda value: value is None or value == {"type": "text"},
                        "output is plain text: no JSON mode or schema"),
    "presence_penalty": (_zero, "repetition penalties are not applied"),
    "frequency_penalty": (_zero, "repetition penalties are not applied"),
    "logit_bias": (_empty, "token biases are not applied"),
    "audio": (_absent, "output is text only"),
    "prediction": (_absent, "predicted outputs are not used"),
}
"""Request fields the server cannot honour -> (whether a value asks nothing of it, why not). A value that does
ask something (`logprobs: true`, a non-zero penalty, `n: 2`) is a 400 naming the field, never silently ignored;
the default values clients often send anyway are accepted."""


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests


class _Request(BaseModel):
    """Fields shared by both endpoints; fields the server does not implement are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    """Extension (as in vLLM): decode past the end-of-turn token, for fixed-length benchmarks."""
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    """Sampling with temperature > 0 is reproducible per request: the same seed and prompt give the same text."""

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"one prompt per request, got a list of {len(self.prompt)}", param="prompt")
        return self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body; anything that is not valid UTF-8 JSON text is a 400."""
    try:
        body = json.loads(raw)
        # A JSON escape such as \ud800 decodes to a lone surrogate, which no tokenizer or UTF-8 response can hold.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body is not valid Unicode: it holds an unpaired surrogate escape "
                            "such as \\ud800") from None
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is {json_problem(exc)}") from None
    return body


def refuse_unsupported(body: dict[str, Any]) -> None:
    """A 400 naming the first field of UNSUPPORTED_FIELDS whose value asks for something the server cannot do."""
    for field, (harmless, why) in UNSUPPORTED_FIELDS.items():
        if field in body and not _safe(harmless, body[field]):
            raise APIError(400, f"{field} is not supported by this server ({why}); leave it out",
                           param=field, code="unsupported_parameter")


def _safe(harmless: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(harmless(value))
    except (TypeError, ValueError, OverflowError):  # a value too odd to compare is no default
        return False


def parse_request(schema: type[_Request], body: Any) -> _Request:
    """Validate a decoded JSON body; any schema problem, or a field the server cannot honour, is a 400 naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_unsupported(body)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise APIError(400, f"invalid request: {problems}", param=param) from exc


def check_max_tokens(requested: int | None, default: int, limit: int) -> int:
    """The request's max_tokens, or the default; above the server's limit is a 400."""
    value = default if requested is None else requested
    if value > limit:
        raise APIError(400, f"max_tokens must be at most {limit}, got {value}", param="max_tokens")
    return value


def check_prompt_length(prompt_tokens: int, max_tokens: int, max_prompt_tokens: int, context_length: int,
                        param: str) -> None:
    """Over-long or empty prompts, and prompts that leave no room for the reply, are 400s (param: the prompt field)."""
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param=param, code="empty_prompt")
    if prompt_tokens > max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, more than the limit of {max_prompt_tokens}",
                       param=param, code="context_length_exceeded")
    if prompt_tokens + max_tokens > context_length:
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the model's "
                       f"context of {context_length} tokens", param="max_tokens", code="context_length_exceeded")


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Target:
    """What a model id asks for. mode: routed | expert | ensemble | base; expert set only for `expert`."""

    mode: str
    expert: int | None = None


def model_ids(num_experts: int, *, ensemble: bool = True) -> list[str]:
    """The served model ids; ensemble: whether the engine offers the mixture (only serve.engine=hf does)."""
    return [ROUTED_MODEL, *([ENSEMBLE_MODEL] if ensemble else []),
            *(f"{ROUTED_MODEL}:{layout.expert_id(k)}" for k in range(num_experts)), BASE_MODEL]


def resolve_model(name: str, num_experts: int, *, ensemble: bool = True) -> Target:
    """The target of a model id; anything else (including a malformed expert id) is a 404.

    Without the ensemble (the vllm engine), asking for it is a 400 that says which engine has it.
    """
    if name == ROUTED_MODEL:
        return Target("routed")
    if name == ENSEMBLE_MODEL:
        if not ensemble:
            raise APIError(400, f"{ENSEMBLE_MODEL} mixes every expert's next-token distribution, which the vllm engine "
                           "does not offer; this server runs serve.engine=vllm (serve.engine=hf serves the ensemble)",
                           param="model", code="model_not_supported")
        return Target("ensemble")
    if name == BASE_MODEL:
        return Target("base")
    match = EXPERT_MODEL.fullmatch(name)
    if match and int(match.group(1)) < num_experts:
        return Target("expert", int(match.group(1)))
    raise APIError(404, f"model {name!r} does not exist; available: {', '.join(model_ids(num_experts, ensemble=ensemble))}",
                   param="model", code="model_not_found")


def models_body(num_experts: int, created: int, *, ensemble: bool = True) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": MODEL_OWNER}
                                       for name in model_ids(num_experts, ensemble=ensemble)]}


# ---------------------------------------------------------------- responses


def gs_ray_info(target: Target, expert: int | None, probabilities: list[float] | None, adapter: str) -> dict[str, Any]:
    """The `gs_ray` object of every response: how the request was served."""
    return {
        "mode": target.mode,
        "expert": expert,
        "adapter": adapter,
        "router_probabilities": probabilities,
        "confidence": max(probabilities) if probabilities else None,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Envelope:
    """Id, timestamp and model of one response (shared by all its stream chunks)."""

    model: str
    chat: bool
    info: dict[str, Any]
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """A whole (non-streamed) response body."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            kind = "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": _usage(prompt_tokens, completion_tokens),
                "gs_ray": self.info}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False,
              usage: tuple[int, int] | None = None) -> dict[str, Any]:
        """One streamed chunk; the first and the last carry the `gs_ray` object."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
        if first or finish_reason is not None:
            body["gs_ray"] = self.info
        if usage is not None:
            body["usage"] = _usage(*usage)
        return body

"""A minimal standard-library client for the gs-ray endpoint (used by `gs-ray serve --once` and benchmarks).

Any OpenAI client works against the server too; this one exists so that the CLI needs no
extra dependency and so that the `gs_ray` field of the answer can be printed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_TIMEOUT_S = 300.0
"""A first request loads the adapter and may wait for a replica on a busy machine."""


class ServeRequestError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


def post_json(url: str, body: dict[str, Any], api_key: str | None = None,
              timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """POST a JSON body; the decoded JSON answer, or ServeRequestError for a non-2xx status."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServeRequestError(exc.code, exc.read().decode(errors="replace")) from exc


def chat(base_url: str, text: str, *, model: str = "gs-ray", max_tokens: int | None = None,
         temperature: float = 0.0, api_key: str | None = None, **extra: Any) -> dict[str, Any]:
    """One single-turn chat completion; the whole response body."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                            "temperature": temperature, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return post_json(f"{base_url.rstrip('/')}/v1/chat/completions", body, api_key)


def describe_answer(response: dict[str, Any]) -> str:
    """The reply, the expert that wrote it and the router's probabilities, for a terminal."""
    info = response.get("gs_ray") or {}
    probabilities = info.get("router_probabilities") or []
    spread = ", ".join(f"expert-{k} {p:.2f}" for k, p in enumerate(probabilities))
    who = f"expert {info.get('expert')}" if info.get("expert") is not None else info.get("adapter", "?")
    lines = [f"answer ({who}, {response['usage']['completion_tokens']} tokens, "
             f"finish: {response['choices'][0]['finish_reason']}):",
             response["choices"][0]["message"]["content"].strip() or "(empty)"]
    if spread:
        lines.append(f"router probabilities: {spread}")
    return "\n".join(lines)

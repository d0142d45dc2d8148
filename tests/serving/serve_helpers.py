"""What the serving tests share: the served app's limits and key, HTTP helpers, prompts each expert serves."""

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.dataset
import pyarrow.parquet as pq

API_KEY = "test-key-123"
MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT = 384, 32
"""The served app's limits, small so that the 4xx cases are cheap to provoke."""
ROUTER_CANDIDATES = 16
"""Prompts per expert tried when looking for one the router sends to that expert."""
SERVE_OVERRIDES = [f"serve.max_prompt_tokens={MAX_PROMPT_TOKENS}", f"serve.max_tokens_limit={MAX_TOKENS_LIMIT}",
                   "serve.default_max_tokens=8", "serve.router_num_cpus=0.5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
    """(status, decoded JSON body) of one HTTP request."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(url: str, text: str, model: str = "gs-ray", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8, **extra}
    status, out = request(url, "/v1/chat/completions", body)
    assert status == 200, out
    return out


def cluster_prompts(run_dir: Path) -> dict[int, str]:
    """For each expert k, the shortest training prompt of expert k's clusters that the router also sends to k."""
    from gs_ray.train.router import Router, request_text

    expert_of_cluster = json.loads((run_dir / "experts" / "experts.json").read_text())["expert_of_cluster"]
    samples = pyarrow.dataset.dataset(str(run_dir / "data" / "train"), format="parquet").to_table(
        columns=["sample_id", "messages"])
    table = samples.join(pq.read_table(run_dir / "cluster" / "assignments.parquet"), "sample_id").sort_by("sample_id")
    texts = [request_text(json.loads(m)) for m in table["messages"].to_pylist()]
    experts = np.asarray(expert_of_cluster)[table["cluster"].to_numpy()]
    router = Router.load(run_dir / "router" / "router")
    chosen = {}
    for k in sorted(set(experts.tolist())):
        # The shortest few keep the encoder pass and the prompts small; the router agrees on most of them.
        candidates = sorted((texts[i] for i in np.flatnonzero(experts == k)), key=len)[:ROUTER_CANDIDATES]
        predicted, _ = router.predict(candidates)
        chosen[k] = next(text for text, p in zip(candidates, predicted) if p == k)
    return chosen


ADAPTER_PROMPTS = ("What is 3 plus 4?", "Write a python function that adds two numbers.", "Rewrite: the cat sat.")


def chat_body(**changes):
    body = {"model": "gs-ray", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return {key: value for key, value in {**body, **changes}.items() if value is not None}


CLIENT_ERRORS = {
    "malformed JSON": (400, b'{"model": "gs-ray", "messages": [', None),
    "body is not an object": (400, None, ["gs-ray"]),
    "missing model": (400, None, chat_body(model=None)),
    "missing messages": (400, None, chat_body(messages=None)),
    "empty messages": (400, None, chat_body(messages=[])),
    "bad role": (400, None, chat_body(messages=[{"role": "wizard", "content": "hi"}])),
    "no user text": (400, None, chat_body(messages=[{"role": "assistant", "content": "hi"}])),
    "unknown model": (404, None, chat_body(model="gpt-4")),
    "path in model": (404, None, chat_body(model="gs-ray:expert-../../etc")),
    "expert out of range": (404, None, chat_body(model="gs-ray:expert-7")),
    "max_tokens zero": (400, None, chat_body(max_tokens=0)),
    "max_tokens over limit": (400, None, chat_body(max_tokens=MAX_TOKENS_LIMIT + 1)),
    "max_tokens not a number": (400, None, chat_body(max_tokens="many")),
    "temperature negative": (400, None, chat_body(temperature=-0.5)),
    "temperature over 2": (400, None, chat_body(temperature=2.5)),
    "several choices": (400, None, chat_body(n=2)),
    "over-long prompt": (400, None, chat_body(messages=[{"role": "user", "content": "apples " * 1000}])),
}


def check_client_mistake(url: str, case: str) -> None:
    """The CLIENT_ERRORS case gets its 4xx, with an OpenAI error body that says what is wrong."""
    status, raw, body = CLIENT_ERRORS[case]
    got, answer = request(url, "/v1/chat/completions", body, raw=raw)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["type"]


@contextlib.contextmanager
def served_run(run_dir: Path, *overrides: str, quiet: bool = False):
    """The base URL of a finished run served over HTTP with SERVE_OVERRIDES, the overrides and API_KEY required."""
    from ray import serve

    from gs_ray.serving.app import load_run_config, start
    from gs_ray.serving.auth import API_KEY_ENV

    cfg = load_run_config(run_dir, None, [*SERVE_OVERRIDES, *overrides, f"serve.port={free_port()}"])
    os.environ[API_KEY_ENV] = API_KEY  # read once, when the app is built
    try:
        url = start(cfg, quiet=quiet)
    finally:
        del os.environ[API_KEY_ENV]
    try:
        yield url
    finally:
        serve.shutdown()

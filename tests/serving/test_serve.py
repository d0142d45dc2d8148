"""Serving: the OpenAI-compatible Ray Serve app over real HTTP, on a finished tiny run.

One finished run and one Serve app per module (with an API key, so every request but the
401 checks carries it). Decoding helpers are tested on the tiny model directly. Hypothesis
fuzzes the HTTP surface (no client mistake may get a 5xx), and a slow soak sends 2,000
requests from 32 clients while watching the Expert replicas' memory.
"""

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gs_ray.serving.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    decode_body,
    parse_request,
    resolve_model,
)

from conftest import REPO
from serve_helpers import (
    ADAPTER_PROMPTS,
    API_KEY,
    CLIENT_ERRORS,
    MAX_PROMPT_TOKENS,
    MAX_TOKENS_LIMIT,
    chat,
    check_client_mistake,
    chat_body,
    cluster_prompts,
    free_port,
    request,
    served_run,
)

# ---------------------------------------------------------------- without Ray


def test_model_ids_are_checked_against_the_run_and_never_become_paths():
    from gs_ray.serving.experts import expert_adapter_dir

    assert resolve_model("gs-ray", 2).mode == "routed"
    assert resolve_model("gs-ray:expert-1", 2).expert == 1
    assert resolve_model("gs-ray:ensemble", 2).mode == "ensemble" and resolve_model("base", 2).mode == "base"
    for bad in ("gs-ray:expert-2", "gs-ray:expert-01", "gs-ray:expert-../../etc", "gs-ray:expert-1/..", "gpt-4", ""):
        with pytest.raises(APIError) as caught:
            resolve_model(bad, 2)
        assert caught.value.status == 404
    assert expert_adapter_dir("/r", "expert-3") == Path("/r/experts/expert-3/adapter")
    with pytest.raises(ValueError):
        expert_adapter_dir("/r", "../../etc")



@pytest.mark.parametrize("body, message", [
    (b'{"model": "gs-ray", "messages": [', "invalid JSON: Expecting value (column 34)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: values nested too deeply to read"),
    (b'{"n": ' + b"9" * 5000 + b"}", "invalid JSON: a number with more than 4300 digits"),
    (b'{"model": "\xff"}', "invalid JSON: not valid UTF-8 at byte 11"),
    (b'{"model": "\\ud800"}', "not valid Unicode: it holds an unpaired surrogate escape"),
])
def test_a_body_that_is_not_json_is_a_400_saying_why(body, message):
    with pytest.raises(APIError) as caught:
        decode_body(body)
    assert caught.value.status == 400 and message in str(caught.value)

@pytest.fixture(scope="module")
def tiny_lm():
    from gs_ray.config import load_config
    from gs_ray.modeling.models import load_base_model, load_tokenizer

    cfg = load_config("tiny")
    return load_base_model(cfg.model), load_tokenizer(cfg.model)


def test_text_stream_stops_at_a_stop_string_and_never_emits_it(tiny_lm):
    from gs_ray.modeling.generation import TextStream

    _, tokenizer = tiny_lm
    ids = tokenizer("the answer is 42 END and more", add_special_tokens=False)["input_ids"]
    stream, emitted, stopped = TextStream(tokenizer, stop=("END",)), "", False
    for token in ids:
        delta, stopped = stream.push(token)
        emitted += delta
        if stopped:
            break
    assert stopped and emitted == "the answer is 42 "


def test_batched_left_padded_decoding_matches_one_at_a_time(tiny_lm):
    from gs_ray.modeling.generation import Decoder, GenerationRequest

    model, tokenizer = tiny_lm
    decoder = Decoder(model, tokenizer, frozenset({tokenizer.eos_token_id}))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("how many apples", "def add(a, b): return")]
    requests = [GenerationRequest(p, max_tokens=6, ignore_eos=True) for p in prompts]

    def texts(batch, components, weights=()):
        batch = [GenerationRequest(r.prompt_ids, r.max_tokens, ignore_eos=True, mixture=weights) for r in batch]
        out = ["" for _ in batch]
        for step in decoder.steps(batch, components):
            for i, delta in enumerate(step):
                out[i] += delta.text if delta else ""
        return out

    plain = [contextlib.nullcontext]
    alone = [texts([r], plain)[0] for r in requests]
    assert texts(requests, plain) == alone
    # A mixture of one distribution with itself is that distribution: the ensemble path decodes the same.
    assert texts(requests, plain * 2, (0.5, 0.5)) == alone


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch(tiny_lm):
    from gs_ray.modeling.generation import Decoder, GenerationRequest

    model, tokenizer = tiny_lm
    decoder = Decoder(model, tokenizer, frozenset({tokenizer.eos_token_id}))
    prompt = tokenizer("how many apples", add_special_tokens=False)["input_ids"]
    other = tokenizer("def add(a, b): return", add_special_tokens=False)["input_ids"]

    def texts(*requests):
        out = ["" for _ in requests]
        for step in decoder.steps(requests, [contextlib.nullcontext]):
            for i, delta in enumerate(step):
                out[i] += delta.text if delta else ""
        return out

    def seeded(seed, ids=prompt):
        return GenerationRequest(ids, max_tokens=12, temperature=1.0, ignore_eos=True, seed=seed)

    alone = texts(seeded(3))[0]
    assert texts(seeded(3))[0] == alone
    assert texts(seeded(None, other), seeded(3), seeded(4, other))[1] == alone
    assert len({alone, texts(seeded(4))[0], texts(seeded(5))[0]}) > 1


@pytest.mark.parametrize("top_p", [1e-6, 5e-324])  # the second is 0 in float32
def test_sampling_with_a_tiny_top_p_is_greedy(top_p):
    import torch

    from gs_ray.modeling.generation import sample

    logprobs = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = sample(logprobs, torch.full((4,), 1.5), torch.full((4,), top_p))
    assert torch.equal(tokens, logprobs.argmax(dim=-1))


def test_serve_config_yaml_points_at_a_real_builder():
    from ray.serve.schema import ServeDeploySchema

    from gs_ray.serving import app as gs_serve

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "cluster_configs" / "serve.yaml").read_text()))
    app = config.applications[0]
    module, _, name = app.import_path.partition(":")
    assert module == "gs_ray.serving.app" and getattr(gs_serve, name) is gs_serve.app_builder
    assert app.args["run_dir"] and all("=" in o for o in app.args["overrides"])


REFUSED_FIELDS = {  # a value asking for something the server cannot do -> the field the 400 names
    "logprobs": True, "top_logprobs": 2, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto", "response_format": {"type": "json_object"}, "presence_penalty": 0.5,
    "frequency_penalty": -1, "n": 2, "logit_bias": {"42": 100}, "functions": [{"name": "f"}], "audio": {},
}
HARMLESS_FIELDS = {  # what clients often send anyway: accepted
    "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
    "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "logit_bias": {}, "user": "u-1", "store": False,
}


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(field):
    body = {"model": "gs-ray", "messages": [{"role": "user", "content": "hi"}], field: REFUSED_FIELDS[field]}
    with pytest.raises(APIError) as caught:
        parse_request(ChatRequest, body)
    assert caught.value.status == 400 and caught.value.param == field and caught.value.code == "unsupported_parameter"
    assert str(caught.value).startswith(f"{field} is not supported by this server")


@pytest.mark.parametrize("field, value", [("best_of", 2), ("echo", True), ("suffix", "}"), ("logprobs", 0)])
def test_completion_fields_the_server_cannot_honour_are_400s(field, value):
    with pytest.raises(APIError) as caught:
        parse_request(CompletionRequest, {"model": "gs-ray", "prompt": "hi", field: value})
    assert caught.value.status == 400 and caught.value.param == field


def test_default_values_of_unsupported_fields_and_a_seed_are_accepted():
    body = {"model": "gs-ray", "messages": [{"role": "user", "content": "hi"}], "seed": -5, **HARMLESS_FIELDS}
    assert parse_request(ChatRequest, body).seed == -5
    with pytest.raises(APIError) as caught:
        parse_request(ChatRequest, {**body, "seed": 2**64})
    assert caught.value.status == 400 and caught.value.param == "seed"


@pytest.mark.parametrize("host, key, allow, refused", [
    ("0.0.0.0", None, False, True), ("0.0.0.0", "", False, True), ("10.1.2.3", None, False, True),
    ("example.com", None, False, True), (None, None, False, True), ("::", None, False, True),
    ("0.0.0.0", "k", False, False), ("0.0.0.0", None, True, False), ("127.0.0.1", None, False, False),
    ("127.0.0.2", None, False, False), ("::1", None, False, False), ("localhost", None, False, False),
])
def test_an_address_other_machines_reach_needs_an_api_key(monkeypatch, host, key, allow, refused):
    from gs_ray.core.errors import ConfigError
    from gs_ray.serving.auth import API_KEY_ENV, require_authentication

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    if key is not None:
        monkeypatch.setenv(API_KEY_ENV, key)
    if refused:
        with pytest.raises(ConfigError, match=f"refusing to serve without authentication: .* {API_KEY_ENV} is unset "
                                              "or empty.*serve.allow_unauthenticated=true"):
            require_authentication(host, allow)
    else:
        assert require_authentication(host, allow) == (key or None)


def test_serve_command_on_a_public_address_without_a_key_stops_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from gs_ray.cli import EXIT_USER_ERROR, main
    from gs_ray.serving.auth import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    (tmp_path / "config.yaml").write_text("model:\n  name: tiny-random\n")
    was_running = ray.is_initialized()
    assert main(["serve", "--run-dir", str(tmp_path), "serve.host=0.0.0.0", "--once", "hi"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("gs-ray: error: refusing to serve without authentication: the HTTP proxy binds 0.0.0.0, "
                          "which is not a loopback address and GS_RAY_API_KEY is unset or empty")
    assert ray.is_initialized() == was_running


def test_app_builder_refuses_a_serve_instance_on_every_interface_without_a_key(tmp_path, monkeypatch):
    """`serve deploy` and KubeRay bind 0.0.0.0 (their http_options), whatever serve.host says."""
    import gs_ray.serving.app as gs_serve
    from gs_ray.core.errors import ConfigError

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    monkeypatch.setattr(gs_serve, "serve_http_host", lambda: "0.0.0.0")
    (tmp_path / "config.yaml").write_text("model:\n  name: tiny-random\n")
    with pytest.raises(ConfigError, match="the HTTP proxy binds 0.0.0.0"):
        gs_serve.app_builder({"run_dir": str(tmp_path)})


def test_serve_command_refuses_an_unfinished_run(tmp_path, capsys):
    from gs_ray.cli import EXIT_USER_ERROR, main

    (tmp_path / "config.yaml").write_text("model:\n  name: tiny-random\n")
    assert main(["serve", "--run-dir", str(tmp_path), "--once", "hi"]) == EXIT_USER_ERROR
    assert "not a finished run" in capsys.readouterr().err


# ---------------------------------------------------------------- the live app


@pytest.fixture(scope="module")
def served(tiny_finished_run):
    """(base url, run dir): the session's finished tiny run served over HTTP with GS_RAY_API_KEY set."""
    run_dir = Path(tiny_finished_run[0].run.run_dir)
    with served_run(run_dir) as url:
        yield url, run_dir


def test_openai_client_gets_completions_and_a_streamed_chat(served):
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    completion = client.completions.create(model="gs-ray", prompt="Write a python function", max_tokens=6,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 6
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model_extra["gs_ray"]["mode"] == "routed"
    pieces = client.completions.create(model="gs-ray", prompt="Write a python function", max_tokens=6, temperature=0,
                                       stream=True)
    assert "".join(piece.choices[0].text for piece in pieces) == completion.choices[0].text

    question = [{"role": "user", "content": "How many apples does Tom have?"}]
    whole = client.chat.completions.create(model="gs-ray", messages=question, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="gs-ray", messages=question, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].model_extra["gs_ray"] == whole.model_extra["gs_ray"]
    assert [m.id for m in client.models.list().data] == ["gs-ray", "gs-ray:ensemble", "gs-ray:expert-0",
                                                         "gs-ray:expert-1", "base"]


def test_a_prompt_from_cluster_k_is_served_by_expert_k(served):
    from gs_ray.train.router import Router

    url, run_dir = served
    prompts = cluster_prompts(run_dir)
    router = Router.load(run_dir / "router" / "router")
    assert sorted(prompts) == [0, 1]
    for k, text in prompts.items():
        routed = chat(url, text)
        info = routed["gs_ray"]
        assert info["mode"] == "routed" and info["expert"] == k and info["adapter"] == f"expert-{k}"
        np.testing.assert_allclose(info["router_probabilities"], router.predict([text])[1][0], atol=1e-4)
        # The reply is the one expert k gives when asked by name: its adapter did the work.
        assert routed["choices"][0]["message"]["content"] == \
            chat(url, text, model=f"gs-ray:expert-{k}")["choices"][0]["message"]["content"]


def test_ensemble_and_base_models(served):
    url, _ = served
    ensemble = chat(url, "What is 3 plus 4?", model="gs-ray:ensemble")
    assert ensemble["gs_ray"]["adapter"] == "ensemble" and ensemble["gs_ray"]["expert"] is None
    assert sum(ensemble["gs_ray"]["router_probabilities"]) == pytest.approx(1.0, abs=1e-4)
    base = chat(url, "What is 3 plus 4?", model="base")
    assert base["gs_ray"] == {"mode": "base", "expert": None, "adapter": "base", "router_probabilities": None,
                              "confidence": None}


def test_each_expert_and_the_base_model_answer_differently(served):
    """An adapter that was loaded but not applied would answer like base (or like the other expert)."""
    url, _ = served
    answers = {model: tuple(chat(url, text, model=model, max_tokens=16)["choices"][0]["message"]["content"]
                            for text in ADAPTER_PROMPTS)
               for model in ("base", "gs-ray:expert-0", "gs-ray:expert-1")}
    assert len(set(answers.values())) == 3, answers


def test_concurrent_requests_share_batches_and_get_the_answers_they_get_alone(served):
    from ray import serve

    from gs_ray.serving.app import APP_NAME

    url, _ = served
    expert = serve.get_deployment_handle("Expert", app_name=APP_NAME)
    texts = [f"What is {n} plus {n + 1}?" for n in range(6)] + ["Write a python function to sort a list."] * 2
    alone = [chat(url, t)["choices"][0]["message"]["content"] for t in texts]
    before = expert.batch_stats.remote().result()
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: chat(url, t)["choices"][0]["message"]["content"], texts))
    assert together == alone  # left padding and batching change nothing
    grown = {size for size, count in expert.batch_stats.remote().result().items() if count > before.get(size, 0)}
    assert max(grown) > 1  # some requests shared forward passes


@pytest.mark.parametrize("case", sorted(CLIENT_ERRORS))
def test_client_mistakes_get_4xx_with_a_message(served, case):
    check_client_mistake(served[0], case)


def test_completion_mistakes_get_4xx(served):
    url, _ = served
    assert request(url, "/v1/completions", {"model": "gs-ray"})[0] == 400  # no prompt
    assert request(url, "/v1/completions", {"model": "gs-ray", "prompt": ["a", "b"]})[0] == 400
    assert request(url, "/v1/completions", {"model": "gs-ray", "prompt": ""})[0] == 400
    assert request(url, "/v1/completions", {"model": "nope", "prompt": "hi"})[0] == 404


def test_app_builder_builds_the_app_of_a_run(served):
    from ray.serve import Application

    from gs_ray.serving.app import app_builder, serve_http_host

    _, run_dir = served
    assert serve_http_host() == "127.0.0.1"  # the running instance's proxy: loopback, so no key is needed
    assert isinstance(app_builder({"run_dir": str(run_dir), "overrides": ["serve.num_replicas=2"]}), Application)


def test_an_evicted_adapter_is_deleted_unless_a_request_still_decodes_with_it(served):
    import asyncio

    from gs_ray.serving.app import load_run_config
    from gs_ray.serving.experts import ExpertModel

    _, run_dir = served
    replica = ExpertModel.func_or_class(load_run_config(run_dir).to_dict(), str(run_dir))
    loaded = lambda: set(replica.decoder.model.peft_config) - {"default"}  # noqa: E731

    async def scenario():
        lease = replica._lease("ensemble")
        assert loaded() == {"expert-0", "expert-1"}
        replica._acquire(("expert-1",))  # a request decoding with expert-1
        lease.__del__()  # what Serve's LRU does on eviction, from a worker thread
        await asyncio.sleep(0)  # the release runs on the replica's loop
        assert loaded() == {"expert-1"}
        replica._release(("expert-1",))
        lease.__del__()  # garbage collection later: nothing is released twice
        await asyncio.sleep(0)
        assert loaded() == set() and not replica.refs
        with pytest.raises(ValueError):
            replica._lease("expert-../../etc")

    asyncio.run(scenario())


def test_the_api_key_is_required_except_for_health(served):
    import openai

    url, _ = served
    for key in (None, "wrong-key"):
        status, answer = request(url, "/v1/chat/completions", chat_body(), key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request(url, "/v1/models", key=key)[0] == 401
    assert request(url, "/healthz", key=None) == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key").models.list()


def test_unsupported_fields_are_400s_and_their_defaults_are_served(served):
    url, _ = served
    for field in ("logprobs", "presence_penalty", "tools"):
        status, answer = request(url, "/v1/chat/completions", chat_body(**{field: REFUSED_FIELDS[field]}))
        assert status == 400 and answer["error"]["param"] == field, answer
    assert request(url, "/v1/completions", {"model": "gs-ray", "prompt": "hi", "echo": True})[0] == 400
    status, answer = request(url, "/v1/chat/completions", chat_body(**HARMLESS_FIELDS))
    assert status == 200, answer


SEED_TOKENS = 16


def _sampled(url: str, seed: int | None, path: str = "/v1/chat/completions") -> str:
    body = {"model": "gs-ray:expert-0", "max_tokens": SEED_TOKENS, "temperature": 1.0, "ignore_eos": True,
            **({"seed": seed} if seed is not None else {})}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Write a python function that adds two numbers."}]
    else:
        body["prompt"] = "Write a python function that adds two numbers."
    status, out = request(url, path, body)
    assert status == 200, out
    choice = out["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_a_seed_makes_sampling_reproducible_and_different_seeds_differ(served):
    url, _ = served
    first = _sampled(url, 7)
    assert first and _sampled(url, 7) == first
    with ThreadPoolExecutor(4) as pool:  # batched with other requests, the seeded one still samples the same
        together = list(pool.map(lambda seed: _sampled(url, seed), [7, None, 8, None]))
    assert together[0] == first
    assert len({first, together[2], _sampled(url, 9)}) > 1
    assert _sampled(url, 7, "/v1/completions") == _sampled(url, 7, "/v1/completions")


# ---------------------------------------------------------------- fuzzing the HTTP surface

FUZZ_REQUESTS, FUZZ_PATH_REQUESTS = 300, 200
"""Examples (one request each) of the two fuzz tests: together well under a minute on 2 CPU cores. Hypothesis
runs derandomized (the same requests every run) so that CI is repeatable; raise these locally to search further."""
HTTP_TIMEOUT_S = 120
EXCERPT_BYTES = 500
"""Bytes of a response quoted in a failure."""
NESTING_DEPTH = 10_000
"""Deeper than any JSON parser's recursion limit."""
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
MODEL_IDS = ("gs-ray", "gs-ray:ensemble", "gs-ray:expert-0", "gs-ray:expert-1", "base")
PAYLOAD_KINDS = ("body", "body", "body", "junk")
"""Three request bodies out of four are JSON objects of the endpoint's shape; the rest are any bytes."""
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
CONTENT_TYPES = ("application/json", "application/json; charset=latin-1", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "")
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_KEYS = (API_KEY, API_KEY, API_KEY, None, "wrong-key")
"""Mostly the right key, so that most requests get past authentication to validation."""

_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
"""Text a client may send: any Unicode scalar value."""
_any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=40)
"""Lone surrogates too, which json.dumps writes as \\ud800 escapes."""
_numbers = st.integers() | st.floats() | st.sampled_from([0, -1, 2**63, -2**63, 10**400, 1e308, -0.0])
_junk = st.recursive(st.none() | st.booleans() | _numbers | _any_text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_any_text, inner, max_size=3),
                     max_leaves=8)
"""Any JSON value: what a field gets when its type is wrong."""
_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), min_size=1, max_size=2)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _text | _parts})
_options = {  # valid values; max_tokens stays small so that accepted requests decode quickly
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
    "n": st.just(1), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stop": _text | st.lists(_text, max_size=4), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
_chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODEL_IDS), "messages": st.lists(_message, min_size=1, max_size=3)},
    optional={**_options, "max_completion_tokens": _options["max_tokens"]})
_completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODEL_IDS), "prompt": _text | st.lists(_text, max_size=2)}, optional=_options)
_wrong_values = st.sampled_from([None, "", "\ud800", [], {}, True, -1, 0, MAX_TOKENS_LIMIT + 1, 2**63, 10**400, 1e308,
                                 "gs-ray:expert-2", "gs-ray:expert-01", "gs-ray:expert-../../etc", "gpt-4",
                                 [{"role": "developer", "content": "hi"}], [{"role": "user"}], ["a", "b"],
                                 [{"type": "image_url", "text": "x"}], "x" * MAX_PROMPT_TOKENS * 4]) | _junk
FIELDS = ("model", "messages", "prompt", "content", *_options, "max_completion_tokens")
"""Fields a mutation may hit; `content` is the first message's."""
MAX_MUTATIONS = 3
"""Mutations per body; hypothesis favours small draws, so many bodies go out valid (and are answered)."""


@st.composite
def _mutated_bodies(draw) -> dict:
    """A valid chat or completion body with up to MAX_MUTATIONS fields dropped, given a wrong value, or given a
    lone surrogate."""
    body = draw(_chat_bodies | _completion_bodies)
    for _ in range(draw(st.integers(0, MAX_MUTATIONS))):
        field = draw(st.sampled_from(FIELDS))
        messages = body.get("messages")
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else None
        target = first if field == "content" and first is not None else body
        mutation = draw(st.sampled_from(("drop", "wrong", "surrogate")))
        if mutation == "drop":
            target.pop(field, None)
        elif mutation == "wrong":
            target[field] = draw(_wrong_values)
        else:
            target[field] = f"{target.get(field, '')}\ud800"
    return body


@st.composite
def _payloads(draw) -> bytes:
    """Request bytes: mostly a JSON body (escaped, or UTF-8 where a surrogate becomes invalid bytes), else junk."""
    body = draw(_mutated_bodies())
    if draw(st.booleans()):
        encoded = json.dumps(body).encode()
    else:
        encoded = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    junk = st.sampled_from([
        b"", b"null", b"[" * NESTING_DEPTH, b'{"model": "gs-ray", "messages": ' + b"[" * NESTING_DEPTH,
        b'{"model": "gs-ray", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "gs-ray", "prompt": "hi", "temperature": NaN}', encoded[: len(encoded) // 2],
    ]) | st.binary(max_size=64) | _junk.map(lambda value: json.dumps(value).encode())
    return draw(junk) if draw(st.sampled_from(PAYLOAD_KINDS)) == "junk" else encoded


def _send(url: str, method: str, path: str, payload: bytes | None, content_type: str, key: str | None):
    """(status, content type, body bytes) of one raw HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    headers = {"Content-Type": content_type} if content_type else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def _check_no_server_error(method: str, status: int, content_type: str, body: bytes) -> None:
    """Below 500; a refusal carries an OpenAI error body; a stream reports no in-band failure."""
    assert status < HTTPStatus.INTERNAL_SERVER_ERROR, (status, body[:EXCERPT_BYTES])
    if status >= HTTPStatus.BAD_REQUEST and method != "HEAD":
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    if status == HTTPStatus.OK and content_type.startswith("text/event-stream"):
        events = [json.loads(line.removeprefix(b"data: ")) for line in body.split(b"\n\n")
                  if line.startswith(b"data: {")]
        assert events and not any("error" in event for event in events), body[:EXCERPT_BYTES]


@settings(max_examples=FUZZ_REQUESTS, **FUZZ_SETTINGS)
@given(path=st.sampled_from(ENDPOINTS), payload=_payloads(), content_type=st.sampled_from(CONTENT_TYPES),
       key=st.sampled_from(FUZZ_KEYS))
def test_fuzzed_requests_never_get_a_5xx(served, path, payload, content_type, key):
    url, _ = served
    status, kind, body = _send(url, "POST", path, payload, content_type, key)
    _check_no_server_error("POST", status, kind, body)


@pytest.fixture(scope="module")
def openapi_paths(served) -> list[str]:
    """The paths the app's OpenAPI schema lists."""
    url, _ = served
    status, _, body = _send(url, "GET", "/openapi.json", None, "", API_KEY)
    assert status == 200, body
    return sorted(json.loads(body)["paths"])


def test_the_openapi_schema_lists_the_endpoints_behind_the_key(served, openapi_paths):
    url, _ = served
    assert {*ENDPOINTS, "/v1/models", "/healthz"} <= set(openapi_paths)
    assert _send(url, "GET", "/openapi.json", None, "", None)[0] == 401


_path_segment = st.text(st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from("-._~%/:@!$&'()*+,;=?"),
                        max_size=12)
"""Path text, broken percent-escapes and query strings included."""


@settings(max_examples=FUZZ_PATH_REQUESTS, **FUZZ_SETTINGS)
@given(data=st.data(), method=st.sampled_from(METHODS), payload=st.none() | _payloads(),
       content_type=st.sampled_from(CONTENT_TYPES), key=st.sampled_from(FUZZ_KEYS))
def test_fuzzed_paths_and_methods_never_get_a_5xx(served, openapi_paths, data, method, payload, content_type, key):
    url, _ = served
    known = st.sampled_from([*openapi_paths, "/v1/chat/completions/", "//v1/completions", "/v1/../v1/models"])
    path = data.draw(known | known.flatmap(lambda p: _path_segment.map(lambda tail: p + tail))
                     | _path_segment.map(lambda tail: "/" + tail))
    status, kind, body = _send(url, method, path, payload, content_type, key)
    _check_no_server_error(method, status, kind, body)


# ---------------------------------------------------------------- soak

SOAK_REQUESTS, SOAK_WARMUP_REQUESTS, SOAK_CLIENTS = 2000, 200, 32
SOAK_MAX_TOKENS, SOAK_TEMPERATURE = 4, 0.7
SOAK_MODELS = ("gs-ray", "gs-ray:expert-0", "gs-ray:expert-1", "base", "gs-ray", "gs-ray:expert-0", "gs-ray:expert-1",
               "gs-ray:ensemble")
"""The rotation of soak requests: every model, the routed one most; the ensemble (K passes a token) least."""
SOAK_COMPLETIONS, SOAK_STREAMED = (2, 5), (3, 6)
"""Turns of the rotation sent to /v1/completions, and turns streamed."""
SHOWN_FAILURES = 3
MAX_RSS_GROWTH = 0.10
"""Largest growth of an Expert replica's resident memory from after warm-up to the end of the soak."""
EXPERT_REPLICA_TITLE = "ServeReplica:gs-ray:Expert"
"""What Ray puts in an Expert replica's process title."""


def _soak_request(url: str, index: int) -> tuple[int, str, bytes]:
    """One of a fixed rotation of request kinds: routed, per expert, base, ensemble; chat and completion; streamed."""
    turn = index % len(SOAK_MODELS)
    body: dict = {"model": SOAK_MODELS[turn], "max_tokens": SOAK_MAX_TOKENS, "ignore_eos": True,
                  "temperature": 0 if turn % 2 else SOAK_TEMPERATURE, "stream": turn in SOAK_STREAMED}
    text = f"Request {index}: what is {index} plus {index + 1}?"
    if turn in SOAK_COMPLETIONS:
        path, body["prompt"] = "/v1/completions", text
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    return _send(url, "POST", path, json.dumps(body).encode(), "application/json", API_KEY)


def _soak_failures(url: str, count: int) -> list[str]:
    """Send `count` requests from SOAK_CLIENTS threads; describe every one that did not fully succeed."""

    def one(index: int) -> str | None:
        try:
            status, kind, body = _soak_request(url, index)
        except OSError as exc:
            return f"request {index}: {exc!r}"
        complete = not kind.startswith("text/event-stream") or body.rstrip().endswith(b"data: [DONE]")
        if status != HTTPStatus.OK or b'"error"' in body or not complete:
            return f"request {index}: {status} {body[:EXCERPT_BYTES]!r}"
        return None

    with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        return [failure for failure in pool.map(one, range(count)) if failure]


def _expert_replica_rss() -> dict[int, int]:
    """Resident bytes of each Expert replica process, by pid: the test's own Ray processes are its descendants."""
    import psutil

    replicas = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if EXPERT_REPLICA_TITLE in " ".join(process.cmdline()):
                replicas[process.pid] = process.memory_info().rss
    return replicas


@pytest.mark.slow
def test_soak_has_no_errors_and_expert_memory_stays_flat(served, record_property):
    url, _ = served
    assert _soak_failures(url, SOAK_WARMUP_REQUESTS) == []
    before = _expert_replica_rss()
    assert before, "no Expert replica process found"
    failures = _soak_failures(url, SOAK_REQUESTS)
    after = _expert_replica_rss()
    growth = {pid: after[pid] / before[pid] - 1 for pid in before if pid in after}
    # The figures benchmarks/RESULTS.md reports (pytest --junitxml writes them out).
    record_property("soak_failures", len(failures))
    record_property("expert_rss_growth", growth)
    assert failures == [], f"{len(failures)} of {SOAK_REQUESTS} failed, first: {failures[:SHOWN_FAILURES]}"
    assert after.keys() == before.keys()  # no replica died and came back
    assert max(growth.values()) <= MAX_RSS_GROWTH, growth



# ---------------------------------------------------------------- stopping `gs-ray serve`

SERVE_READY_S, SERVE_STOP_S, PROCESSES_GONE_S = 600, 120, 10
"""Longest waits for `gs-ray serve` to be ready (a fresh Ray and Serve on a busy 2-core machine), to exit after
SIGTERM, and then for the last of its processes to be gone."""
READY_LINE = "[serve] Ctrl-C to stop"
RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
"""A Ray session's name, as its processes' command lines carry it (the session directory)."""


def _running(process) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def _processes_of(server_pid: int, started: list, sessions: set[str]) -> list:
    """Live processes of a command: those it had started (by pid and start time), those in its OS session, and
    those whose command line names its Ray session."""
    import psutil

    found = {process.pid: process for process in started if _running(process)}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid not in found and _running(process) and (
                    os.getsid(process.pid) == server_pid or any(name in " ".join(process.cmdline()) for name in sessions)):
                found[process.pid] = process
    return list(found.values())


def _describe(processes: list) -> list[str]:
    import psutil

    described = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            described.append(f"{process.pid} {process.name()}: {' '.join(process.cmdline())[:120]}")
    return described


@pytest.mark.slow
def test_sigterm_stops_every_process_gs_ray_serve_started(tiny_finished_run, tmp_path):
    """Ray's DashboardAgent and RuntimeEnvAgent (children of the raylet) used to outlive a SIGTERMed `gs-ray serve`."""
    import psutil

    from gs_ray.serving.auth import API_KEY_ENV

    run_dir = tiny_finished_run[0].run.run_dir
    # Its own local Ray (not the test session's), on loopback, so no API key is needed.
    env = {**{k: v for k, v in os.environ.items() if k != API_KEY_ENV}, "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "gs_ray.cli", "serve", "--run-dir", str(run_dir), f"serve.port={free_port()}",
               "serve.router_num_cpus=0.5"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  start_new_session=True)
    started: list = []
    try:
        deadline = time.monotonic() + SERVE_READY_S
        while READY_LINE not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert READY_LINE in log.read_text(), log.read_text()[-3000:]
        started = psutil.Process(server.pid).children(recursive=True)
        sessions = {name for process in started if _running(process)
                    for name in RAY_SESSION.findall(" ".join(process.cmdline()))}
        assert sessions, _describe(started)
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in started if _running(p)}

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=SERVE_STOP_S) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + PROCESSES_GONE_S
        while (left := _processes_of(server.pid, started, sessions)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, _describe(left)
    finally:
        if server.poll() is None:
            server.kill()
        for process in _processes_of(server.pid, started, set()):
            with contextlib.suppress(psutil.Error):
                process.kill()

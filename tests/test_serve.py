"""Serving: the OpenAI-compatible Ray Serve app over real HTTP, on a finished tiny run.

One finished run and one Serve app per module (with an API key, so every request but the
401 checks carries it). Decoding helpers are tested on the tiny model directly.
"""

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import WARM_RUN_OVERRIDES
from gs_ray.openai_api import APIError, resolve_model

API_KEY = "test-key-123"
MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT = 384, 32
"""The served app's limits, small so that the 4xx cases are cheap to provoke."""
ROUTER_CANDIDATES = 16
"""Prompts per expert tried when looking for one the router sends to that expert."""
REPO = Path(__file__).resolve().parent.parent
FINISHED_RUN_OVERRIDES = (
    *WARM_RUN_OVERRIDES, "cluster.k=2", "cluster.cache_size=8", "experts.budget=fixed", "experts.max_steps=8",
    "experts.min_cluster_size=1", "experts.cpus_per_worker=1", "router.epochs=10",
)
SERVE_OVERRIDES = [f"serve.max_prompt_tokens={MAX_PROMPT_TOKENS}", f"serve.max_tokens_limit={MAX_TOKENS_LIMIT}",
                   "serve.default_max_tokens=8", "serve.router_num_cpus=0.5"]


# ---------------------------------------------------------------- without Ray


def test_model_ids_are_checked_against_the_run_and_never_become_paths():
    from gs_ray.serve_experts import expert_adapter_dir

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


@pytest.fixture(scope="module")
def tiny_lm():
    from gs_ray.config import load_config
    from gs_ray.models import load_base_model, load_tokenizer

    cfg = load_config("tiny")
    return load_base_model(cfg.model), load_tokenizer(cfg.model)


def test_text_stream_stops_at_a_stop_string_and_never_emits_it(tiny_lm):
    from gs_ray.generation import TextStream

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
    from gs_ray.generation import Decoder, GenerationRequest

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


def test_sampling_with_a_tiny_top_p_is_greedy():
    import torch

    from gs_ray.generation import sample

    logprobs = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = sample(logprobs, torch.full((4,), 1.5), torch.full((4,), 1e-6))
    assert torch.equal(tokens, logprobs.argmax(dim=-1))


def test_serve_config_yaml_points_at_a_real_builder():
    from ray.serve.schema import ServeDeploySchema

    from gs_ray import serve as gs_serve

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "cluster_configs" / "serve.yaml").read_text()))
    app = config.applications[0]
    module, _, name = app.import_path.partition(":")
    assert module == "gs_ray.serve" and getattr(gs_serve, name) is gs_serve.app_builder
    assert app.args["run_dir"] and all("=" in o for o in app.args["overrides"])


def test_serve_command_refuses_an_unfinished_run(tmp_path, capsys):
    from gs_ray.cli import EXIT_USER_ERROR, main

    (tmp_path / "config.yaml").write_text("model:\n  name: tiny-random\n")
    assert main(["serve", "--run-dir", str(tmp_path), "--once", "hi"]) == EXIT_USER_ERROR
    assert "not a finished run" in capsys.readouterr().err


# ---------------------------------------------------------------- the live app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_warm_run):
    """(base url, run dir): a finished tiny run served over HTTP with GS_RAY_API_KEY set."""
    from ray import serve

    from gs_ray.config import load_config
    from gs_ray.pipeline import run_stages
    from gs_ray.serve import API_KEY_ENV, load_run_config, start

    run_dir = tiny_warm_run("serve")
    run_stages(load_config("tiny", [f"run.run_dir={run_dir}", *FINISHED_RUN_OVERRIDES]), "router")
    cfg = load_run_config(run_dir, None, [*SERVE_OVERRIDES, f"serve.port={_free_port()}"])
    os.environ[API_KEY_ENV] = API_KEY  # read once, when the app is built
    try:
        url = start(cfg)
    finally:
        del os.environ[API_KEY_ENV]
    yield url, run_dir
    serve.shutdown()


def _request(url: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
    """(status, decoded JSON body) of one HTTP request."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _chat(url: str, text: str, model: str = "gs-ray", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8, **extra}
    status, out = _request(url, "/v1/chat/completions", body)
    assert status == 200, out
    return out


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


def _cluster_prompts(run_dir: Path) -> dict[int, str]:
    """For each expert k, the shortest training prompt of expert k's clusters that the router also sends to k."""
    from gs_ray.router import Router, request_text

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


def test_a_prompt_from_cluster_k_is_served_by_expert_k(served):
    from gs_ray.router import Router

    url, run_dir = served
    prompts = _cluster_prompts(run_dir)
    router = Router.load(run_dir / "router" / "router")
    assert sorted(prompts) == [0, 1]
    for k, text in prompts.items():
        routed = _chat(url, text)
        info = routed["gs_ray"]
        assert info["mode"] == "routed" and info["expert"] == k and info["adapter"] == f"expert-{k}"
        np.testing.assert_allclose(info["router_probabilities"], router.predict([text])[1][0], atol=1e-4)
        # The reply is the one expert k gives when asked by name: its adapter did the work.
        assert routed["choices"][0]["message"]["content"] == \
            _chat(url, text, model=f"gs-ray:expert-{k}")["choices"][0]["message"]["content"]


def test_ensemble_and_base_models(served):
    url, _ = served
    ensemble = _chat(url, "What is 3 plus 4?", model="gs-ray:ensemble")
    assert ensemble["gs_ray"]["adapter"] == "ensemble" and ensemble["gs_ray"]["expert"] is None
    assert sum(ensemble["gs_ray"]["router_probabilities"]) == pytest.approx(1.0, abs=1e-4)
    base = _chat(url, "What is 3 plus 4?", model="base")
    assert base["gs_ray"] == {"mode": "base", "expert": None, "adapter": "base", "router_probabilities": None,
                              "confidence": None}


def test_concurrent_requests_share_batches_and_get_the_answers_they_get_alone(served):
    from ray import serve

    from gs_ray.serve import APP_NAME

    url, _ = served
    expert = serve.get_deployment_handle("Expert", app_name=APP_NAME)
    texts = [f"What is {n} plus {n + 1}?" for n in range(6)] + ["Write a python function to sort a list."] * 2
    alone = [_chat(url, t)["choices"][0]["message"]["content"] for t in texts]
    before = expert.batch_stats.remote().result()
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: _chat(url, t)["choices"][0]["message"]["content"], texts))
    assert together == alone  # left padding and batching change nothing
    grown = {size for size, count in expert.batch_stats.remote().result().items() if count > before.get(size, 0)}
    assert max(grown) > 1  # some requests shared forward passes


def _chat_body(**changes):
    body = {"model": "gs-ray", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return {key: value for key, value in {**body, **changes}.items() if value is not None}


CLIENT_ERRORS = {
    "malformed JSON": (400, b'{"model": "gs-ray", "messages": [', None),
    "body is not an object": (400, None, ["gs-ray"]),
    "missing model": (400, None, _chat_body(model=None)),
    "missing messages": (400, None, _chat_body(messages=None)),
    "empty messages": (400, None, _chat_body(messages=[])),
    "bad role": (400, None, _chat_body(messages=[{"role": "wizard", "content": "hi"}])),
    "no user text": (400, None, _chat_body(messages=[{"role": "assistant", "content": "hi"}])),
    "unknown model": (404, None, _chat_body(model="gpt-4")),
    "path in model": (404, None, _chat_body(model="gs-ray:expert-../../etc")),
    "expert out of range": (404, None, _chat_body(model="gs-ray:expert-7")),
    "max_tokens zero": (400, None, _chat_body(max_tokens=0)),
    "max_tokens over limit": (400, None, _chat_body(max_tokens=MAX_TOKENS_LIMIT + 1)),
    "max_tokens not a number": (400, None, _chat_body(max_tokens="many")),
    "temperature negative": (400, None, _chat_body(temperature=-0.5)),
    "temperature over 2": (400, None, _chat_body(temperature=2.5)),
    "several choices": (400, None, _chat_body(n=2)),
    "over-long prompt": (400, None, _chat_body(messages=[{"role": "user", "content": "apples " * 1000}])),
}


@pytest.mark.parametrize("case", sorted(CLIENT_ERRORS))
def test_client_mistakes_get_4xx_with_a_message(served, case):
    url, _ = served
    status, raw, body = CLIENT_ERRORS[case]
    got, answer = _request(url, "/v1/chat/completions", body, raw=raw)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["type"]


def test_completion_mistakes_get_4xx(served):
    url, _ = served
    assert _request(url, "/v1/completions", {"model": "gs-ray"})[0] == 400  # no prompt
    assert _request(url, "/v1/completions", {"model": "gs-ray", "prompt": ["a", "b"]})[0] == 400
    assert _request(url, "/v1/completions", {"model": "gs-ray", "prompt": ""})[0] == 400
    assert _request(url, "/v1/completions", {"model": "nope", "prompt": "hi"})[0] == 404


def test_app_builder_builds_the_app_of_a_run(served):
    from ray.serve import Application

    from gs_ray.serve import app_builder

    _, run_dir = served
    assert isinstance(app_builder({"run_dir": str(run_dir), "overrides": ["serve.num_replicas=2"]}), Application)


def test_an_evicted_adapter_is_deleted_unless_a_request_still_decodes_with_it(served):
    import asyncio

    from gs_ray.serve import load_run_config
    from gs_ray.serve_experts import ExpertModel

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
        status, answer = _request(url, "/v1/chat/completions", _chat_body(), key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert _request(url, "/v1/models", key=key)[0] == 401
    assert _request(url, "/healthz", key=None) == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key").models.list()

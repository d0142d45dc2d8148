"""Ray Serve application: an OpenAI-compatible ingress, the router, and multiplexed LoRA experts.

Three deployments, built from a finished run directory by `build_app(cfg, run_dir)`:

- `Ingress` (FastAPI through `@serve.ingress`): authenticates, validates, renders the chat
  template exactly as training did, checks limits, asks the router, and forwards to the
  expert deployment with the chosen adapter as the multiplexed model id. Client mistakes
  are 4xx with an OpenAI error body (gs_ray/serving/openai_api.py).
- `RouterModel`: the encoder + head of `router/router`, requests batched by `@serve.batch`.
- `Expert`, on the engine `serve.engine` names. hf (gs_ray/serving/experts.py): ONE base
  model per replica wrapped as a PeftModel, adapters loaded by name with Ray Serve model
  multiplexing (an LRU of `serve.max_adapters_per_replica` model ids per replica, requests
  routed to replicas that already hold their adapter): `expert-<k>` holds that expert's
  LoRA, `ensemble` all K, `base` none; `@serve.batch` groups concurrent requests for one
  model id into one forward pass per decoding step. vllm (gs_ray/serving/vllm_experts.py):
  vLLM's async engine, continuous batching, the expert's adapter as a per-request LoRA.
  Either way an adapter is read only from `<run_dir>/experts/expert-<k>/adapter`, for an id
  that matched a strict pattern and the run's expert count.

The ensemble (`gs-ray:ensemble`, the prior-work baseline) is a token-level mixture: at every
step each expert's next-token distribution is computed (K forward passes, one KV cache per
expert) and mixed with the router's probabilities for the request; sampling then treats
the mixture like any other distribution (gs_ray/modeling/generation.py). It exists on the hf
engine only: vLLM exposes no per-step distributions to mix.
"""

# No `from __future__ import annotations`: FastAPI must see real classes (Request) on the
# route methods that @serve.ingress rewrites, and cannot resolve string annotations there.
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from gs_ray.config import Config, ServeConfig, config_from_dict, load_config
from gs_ray.core import layout
from gs_ray.core.errors import DataError, ModelError
from gs_ray.core.rundir import CONFIG_FILE, RunDir
from gs_ray.data.prepare import render_prompt
from gs_ray.modeling.generation import GenerationRequest
from gs_ray.modeling.models import context_length, load_tokenizer
from gs_ray.serving import auth
from gs_ray.serving.auth import API_KEY_ENV, require_authentication, serve_http_host
from gs_ray.serving.experts import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_WAIT_S,
    ENSEMBLE_ID,
    SERVED_STAGES,
    ExpertModel,
    finished_run_experts,
)
from gs_ray.serving.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Envelope,
    Target,
    check_max_tokens,
    check_prompt_length,
    decode_body,
    gs_ray_info,
    models_body,
    parse_request,
    resolve_model,
)
from gs_ray.serving.vllm_experts import VLLMExpertModel, check_vllm
from gs_ray.train.router import Router, request_text

logger = logging.getLogger(__name__)

APP_NAME = "gs-ray"
SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------- router


@serve.deployment(name="Router")
class RouterModel:
    """The trained router; returns each request's probabilities over the experts."""

    def __init__(self, run_dir: str, batch_size: int, batch_wait_s: float):
        self.router = Router.load(RunDir(run_dir).pull_finished((layout.ROUTER_STAGE,)) / layout.ROUTER_STAGE / layout.ROUTER_DIRNAME)
        self.route.set_max_batch_size(batch_size)
        self.route.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def route(self, texts: list[str]) -> list[list[float]]:
        return [row.tolist() for row in self.router.predict(texts)[1]]


# ---------------------------------------------------------------- ingress

# The schema is served by Ingress at /openapi.json, behind the API key like every endpoint but /healthz.
api = FastAPI(title="gs-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


REPLICA_LOST = (RayActorError, ActorUnavailableError)  # a handle call's replica died (its process or node lost)
REPLICA_LOST_RETRY_AFTER_S = 2
"""Seconds a lost replica's 503 asks the client to wait; Serve replaces it (gap: tests/deploy/test_multinode.py)."""


def _replica_lost(what: str, exc: BaseException) -> APIError:
    """A 503, never a 500: the request was fine, and the same request succeeds once Serve has replaced the replica."""
    logger.warning("the %s replica serving a request was lost: %s", what, type(exc).__name__)
    return APIError(503, f"the {what} replica serving this request was lost and is being replaced; retry",
                    kind="server_error", code="replica_lost", retry_after_s=REPLICA_LOST_RETRY_AFTER_S)


@contextlib.asynccontextmanager
async def _replica_lost_is_503(what: str) -> AsyncIterator[None]:
    try:
        yield
    except REPLICA_LOST as exc:
        raise _replica_lost(what, exc) from exc


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP: validation, auth, prompt rendering, routing; generation happens in ExpertModel."""

    def __init__(self, config: dict[str, Any], num_experts: int, key_digest: str | None,
                 router: DeploymentHandle, expert: DeploymentHandle):
        cfg = config_from_dict(config)
        self.limits, self.num_experts, self.key_digest = cfg.serve, num_experts, key_digest
        self.ensemble = cfg.serve.engine == "hf"  # the token-level mixture exists on gs_ray's own decoding loop only
        self.router, self.expert = router, expert
        self.tokenizer = load_tokenizer(cfg.model)
        self.context_length = context_length(cfg.model, self.tokenizer)
        self.created = int(os.path.getmtime(RunDir(cfg.run.run_dir).pull_finished(()) / CONFIG_FILE))

    def _authorize(self, request: Request) -> None:
        if self.key_digest is None:
            return
        if not auth.bearer_matches(request.headers.get("authorization", ""), self.key_digest):
            raise APIError(401, f"missing or wrong API key: send 'Authorization: Bearer <{API_KEY_ENV}>'",
                           kind="authentication_error", code="invalid_api_key")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_body(self.num_experts, self.created, ensemble=self.ensemble)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return api.openapi()

    async def _accept(self, request: Request, schema: type) -> tuple[Any, Target]:
        """Authorized, schema-valid request and the model it names; otherwise an APIError."""
        self._authorize(request)
        req = parse_request(schema, decode_body(await request.body()))
        return req, resolve_model(req.model, self.num_experts, ensemble=self.ensemble)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req, target = await self._accept(request, CompletionRequest)
        text = req.prompt_text()
        return await self._answer(req, target, text, text, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req, target = await self._accept(request, ChatRequest)
        messages = req.plain_messages()
        try:
            router_text = request_text(messages)
        except DataError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        try:
            prompt = render_prompt(self.tokenizer, messages)
        except TemplateError as exc:  # some models' templates refuse conversations, e.g. roles out of order
            raise APIError(400, f"the model's chat template refuses these messages: {exc}", param="messages") from exc
        return await self._answer(req, target, prompt, router_text, chat=True)

    async def _plan(self, target: Target, router_text: str) -> tuple[str, int | None, list[float] | None]:
        """(multiplexed model id, expert chosen, router probabilities) for a request."""
        if target.mode == "expert":
            return layout.expert_id(target.expert), target.expert, None
        if target.mode == "base":
            return layout.BASE_ID, None, None
        async with _replica_lost_is_503("router"):
            probabilities = await self.router.route.remote(router_text)
        if target.mode == "ensemble":
            return ENSEMBLE_ID, None, probabilities
        expert = max(range(len(probabilities)), key=probabilities.__getitem__)
        return layout.expert_id(expert), expert, probabilities

    async def _answer(self, req, target: Target, prompt: str, router_text: str, *, chat: bool):
        limits = self.limits
        max_tokens = check_max_tokens(req.requested_max_tokens(), limits.default_max_tokens, limits.max_tokens_limit)
        stop = req.stop_strings()
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        check_prompt_length(len(prompt_ids), max_tokens, limits.max_prompt_tokens, self.context_length,
                            "messages" if chat else "prompt")
        model_id, expert, probabilities = await self._plan(target, router_text)
        generation = GenerationRequest(prompt_ids, max_tokens, req.temperature, req.top_p, stop, req.ignore_eos,
                                       tuple(probabilities) if model_id == ENSEMBLE_ID else (), req.seed)
        envelope = Envelope(req.model, chat, gs_ray_info(target, expert, probabilities, model_id))
        handle = self.expert.options(multiplexed_model_id=model_id)
        if req.stream:
            events = self._events(handle, generation, envelope, req.include_usage())
            return StreamingResponse(events, media_type="text/event-stream")
        async with _replica_lost_is_503("expert"):
            out = await handle.generate.remote(generation)
        return envelope.full(out["text"], out["finish_reason"], out["prompt_tokens"], out["completion_tokens"])

    async def _events(self, handle: DeploymentHandle, generation: GenerationRequest, envelope: Envelope,
                      include_usage: bool) -> AsyncIterator[str]:
        yield _sse(envelope.chunk("", first=True))
        try:
            async for delta in handle.options(stream=True).generate_stream.remote(generation):
                finished = delta["finish_reason"] is not None
                if delta["text"] or finished:
                    usage = (delta["prompt_tokens"], delta["completion_tokens"]) if finished and include_usage else None
                    yield _sse(envelope.chunk(delta["text"], delta["finish_reason"], usage=usage))
        except REPLICA_LOST as exc:  # headers are sent: in-band, as OpenAI does
            yield _sse(_replica_lost("expert", exc).body())
        except Exception as exc:
            logger.exception("streamed generation failed")
            yield _sse(APIError(500, f"generation failed: {exc}", kind="server_error").body())
        yield SSE_DONE


# ---------------------------------------------------------------- building and running


def _expert_options(cfg: Config) -> dict[str, Any]:
    serve_cfg = cfg.serve
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": serve_cfg.num_cpus_per_replica, "num_gpus": serve_cfg.num_gpus_per_replica},
        "max_ongoing_requests": serve_cfg.max_ongoing_requests,
    }
    if serve_cfg.autoscale_max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": serve_cfg.autoscale_min_replicas, "max_replicas": serve_cfg.autoscale_max_replicas,
            "initial_replicas": max(1, serve_cfg.autoscale_min_replicas),
            "target_ongoing_requests": serve_cfg.autoscale_target_ongoing_requests,
        }
    else:
        options["num_replicas"] = serve_cfg.num_replicas
    return options


def _expert_deployment(cfg: Config) -> serve.Deployment:
    if cfg.serve.engine == "hf":
        return ExpertModel
    check_vllm(cfg)  # here, before any replica fails to start on it
    return VLLMExpertModel


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives it to the head alone: a sliver of it places an actor there


def _ingress_actor_options(serve_cfg: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": serve_cfg.ingress_num_cpus}
    if serve_cfg.ingress_on_head:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return options


def build_app(cfg: Config, run_dir: str | Path | None = None, *, http_host: str | None) -> serve.Application:
    """The Serve application of a finished run (a path or URI); GS_RAY_API_KEY, if set now, becomes required.

    http_host is where the HTTP proxy binds (None: unknown); without a key, only a loopback address is served
    (or any, with serve.allow_unauthenticated). Replicas get the run's location and mirror what they read
    themselves, so a run on object storage serves from any node.
    """
    key = require_authentication(http_host, cfg.serve.allow_unauthenticated)
    run = RunDir(run_dir or cfg.run.run_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=run.location))
    num_experts = finished_run_experts(run.pull_finished(SERVED_STAGES))
    serve_cfg = cfg.serve
    router = RouterModel.options(
        num_replicas=serve_cfg.router_replicas, max_ongoing_requests=serve_cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": serve_cfg.router_num_cpus},
    ).bind(run.location, serve_cfg.router_batch_max_size, serve_cfg.router_batch_wait_timeout_s)
    expert = _expert_deployment(cfg).options(**_expert_options(cfg)).bind(cfg.to_dict(), run.location)
    return Ingress.options(
        num_replicas=serve_cfg.ingress_replicas, max_ongoing_requests=serve_cfg.max_ongoing_requests,
        ray_actor_options=_ingress_actor_options(serve_cfg),
    ).bind(cfg.to_dict(), num_experts, auth.key_digest(key) if key else None, router, expert)


def load_run_config(run_dir: str | Path, serve_source: str | None = None, overrides: list[str] | None = None) -> Config:
    """A run's saved config; its `serve` section from `serve_source` (preset or YAML) if given, plus overrides.

    The model, LoRA and data settings always come from the run itself: they are what its
    adapters were trained with.
    """
    run = RunDir(run_dir)
    saved = run.pull_finished(()) / CONFIG_FILE
    if not saved.is_file():
        raise ModelError(f"{run_dir} has no config.yaml: not a gs-ray run directory (run `gs-ray run` first)")
    cfg = load_config(str(saved), overrides)
    if serve_source:
        cfg = dataclasses.replace(cfg, serve=load_config(serve_source, overrides).serve)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=run.location))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry for `serve run` / `serve deploy` / KubeRay: args run_dir, optional config and overrides.

    The HTTP address is the Serve instance's (its http_options), not serve.host: `serve deploy` and KubeRay bind
    0.0.0.0, so they need GS_RAY_API_KEY in the environment of the Ray nodes or serve.allow_unauthenticated.
    """
    run_dir = args.get("run_dir")
    if not run_dir:
        raise ValueError("app_builder needs args.run_dir: the finished run directory to serve")
    overrides = args.get("overrides") or []
    return build_app(load_run_config(run_dir, args.get("config"), list(overrides)), run_dir,
                     http_host=serve_http_host())


def start(cfg: Config, run_dir: str | Path | None = None, *, quiet: bool = False) -> str:
    """Deploy the app on the connected Ray cluster with HTTP on serve.host:serve.port; return the base URL.

    quiet: Serve logs warnings only (no per-request access lines), for one-shot and benchmark runs.
    """
    logging_config = {"log_level": "WARNING"} if quiet else None
    app = build_app(cfg, run_dir, http_host=cfg.serve.host)  # refused before Serve starts
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=logging_config)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"

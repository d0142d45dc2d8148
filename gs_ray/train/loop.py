"""One training loop for the warm-up LoRA and every expert: Ray Train + DeepSpeed.

`run_training(cfg, job)` launches a TorchTrainer whose workers each run `train_loop`:
load the base model, attach (or load) the LoRA adapter, wrap it in a DeepSpeed engine,
then step through a deterministic sample order until `job.max_steps` optimizer steps.
Checkpoints go through `ray.train.report`, so a restarted worker group (FailureConfig)
or a re-run with the same run name resumes from the last one. The final checkpoint
also carries the adapter in PEFT format, which `run_training` copies to `job.output_dir`.

Data is read from the split's Parquet folder on every worker and ordered by a seeded
permutation rather than streamed through Ray Data: the order of step s is then a pure
function of (seed, s), so a resumed run sees exactly the batches an uninterrupted one
would, and every worker takes the same number of micro-batches (DeepSpeed's collectives
need that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gs_ray.config import Config, TrainConfig, config_from_dict
from gs_ray.core.errors import DataError
from gs_ray.core.layout import ADAPTER_DIRNAME, TRAIN_METRICS_FILE
from gs_ray.data.batches import load_split, pad_batch
from gs_ray.modeling import models
from gs_ray.modeling.losses import token_loss_sum

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
"""DeepSpeed checkpoint tag: one state per Ray Train checkpoint directory."""
CLIENT_STATE_KEY = "gs_ray"
"""Key of the loop's own state (step, loss curve, held-out losses) inside a DeepSpeed checkpoint."""
CHECKPOINTS_KEPT = 2
"""Ray Train checkpoints kept on storage per run: the newest plus one fallback."""
SHM_COMM_BUILDER = "ShareMemCommBuilder"
"""DeepSpeed's op builder for its CPU shared-memory all-reduce (see `skip_shm_comm_build`)."""
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's setting for how long a job's worker group waits for its resources before it times out and retries."""
QUEUED_JOB_START_TIMEOUT_S = 3600
"""Jobs launched side by side (the experts, the evaluation's baselines) queue for CPUs and GPUs that other jobs
hold, often for minutes. Ray Train's default (60 s) made every queued job log a timeout traceback and retry each
minute; a request the cluster can never satisfy still fails at once (Ray Train checks it before waiting)."""
SUMMARY_KEYS = ("step", "eval_loss_start", "eval_loss_end", "train_samples", "eval_samples", "resumed_from_step")
"""The metrics of a run that a stage training one adapter (warm-up, the one-LoRA baseline) keeps in its manifest."""


@dataclass
class TrainJob:
    """What one training run trains: its data, starting point, budget and outputs."""

    name: str
    """Ray Train run name; a re-run with the same name and storage_path resumes."""
    train_split: str
    """Parquet folder of tokenized training samples."""
    output_dir: str
    """Where the final adapter (`adapter/`) and `train_metrics.json` are written."""
    storage_path: str
    """Ray Train storage for checkpoints (absolute path or URI; shared storage on a cluster)."""
    max_steps: int
    """Optimizer steps to train."""
    learning_rate: float
    """Peak AdamW learning rate."""
    eval_split: str = ""
    """Parquet folder of held-out samples: loss measured before and after training."""
    init_adapter: str = ""
    """Start from this PEFT adapter instead of a fresh LoRA (experts from the warm-up)."""
    seed: int = 0
    """Seed for LoRA init and sample order."""


@dataclass
class TrainOutcome:
    """What a finished training run produced."""

    adapter_dir: Path
    metrics: dict[str, Any]


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for one job; batch sizes are per worker."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        # The optimizer is torch's AdamW: DeepSpeed's fused/CPU Adam need compiled ops.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op in this process.

    On a CPU accelerator, DeepSpeed's torch backend compiles that C++ op (about a minute on
    2 cores, once per node and Python environment) when it starts, but only its tensor-parallel
    inference all-reduce uses it; training's collectives go through the process group (gloo)
    either way. deepspeed.ops keeps op compatibility in one module-level dict whose edits
    persist; marking the op incompatible makes the backend skip the build.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_COMM_BUILDER)
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def samples_digest(sample_ids: Iterable[str]) -> str:
    """A short hash of a set of sample ids: shows which samples a job trained on."""
    return hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:16]


def require_one_batch(num_rows: int, world: int, batch_size: int) -> None:
    if num_rows // world // batch_size == 0:
        raise DataError(
            f"{num_rows} training samples are fewer than one batch of {batch_size} on each of {world} workers; "
            "add data or lower train.micro_batch_size / train.num_workers"
        )


def micro_batches(num_rows: int, job_seed: int, rank: int, world: int, batch_size: int, start: int) -> Iterator[list[int]]:
    """Row indices of this rank's micro-batches, from global micro-batch `start` on.

    Epoch e is a permutation seeded by (seed, e); each rank takes an equal slice, so all
    ranks yield the same number of batches and batch b is the same whoever asks.
    """
    require_one_batch(num_rows, world, batch_size)
    per_rank = num_rows // world
    per_epoch = per_rank // batch_size
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = np.random.default_rng([job_seed, epoch]).permutation(num_rows)
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        yield mine[offset * batch_size : (offset + 1) * batch_size].tolist()
        index += 1


def _build_model(cfg: Config, job: TrainJob) -> torch.nn.Module:
    torch.manual_seed(job.seed)
    base = models.load_base_model(cfg.model)
    if job.init_adapter:
        return models.load_adapter(base, job.init_adapter, trainable=True)
    return models.attach_lora(base, cfg.lora)


@torch.no_grad()
def heldout_loss(engine: Any, rows: list[dict], pad_id: int, batch_size: int, rank: int, world: int) -> float:
    """Mean per-token loss over rows, sharded across ranks and summed with all-reduce; in eval mode, then back
    to the mode the model was in."""
    import torch.distributed as dist

    was_training = engine.module.training
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    mine = rows[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(engine.device) for k, v in pad_batch(mine[start : start + batch_size], pad_id).items()}
        loss_sum, count = token_loss_sum(engine, batch)
        totals += torch.stack([loss_sum.double(), count.double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    engine.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))


def _save_checkpoint(engine: Any, state: dict[str, Any], metrics: dict[str, Any], adapter: bool) -> None:
    """Write this rank's DeepSpeed state (LoRA weights and optimizer shard) and report it."""
    import ray.train


    with tempfile.TemporaryDirectory() as tmp:
        # A fresh dict under our own key: DeepSpeed adds its metadata keys to the dict it is given.
        engine.save_checkpoint(
            tmp, tag=CHECKPOINT_TAG, client_state={CLIENT_STATE_KEY: dict(state)}, exclude_frozen_parameters=True
        )
        if adapter and ray.train.get_context().get_world_rank() == 0:
            models.save_adapter(engine.module, Path(tmp) / ADAPTER_DIRNAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine: Any) -> dict[str, Any]:
    """Load the latest reported checkpoint, if any; return its client state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "loss_curve": []}
    with checkpoint.as_directory() as directory:
        _, state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=False)
    if not state or CLIENT_STATE_KEY not in state:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no gs_ray state under tag {CHECKPOINT_TAG!r}")
    return state[CLIENT_STATE_KEY]


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry: train the LoRA of one job. Returns rank 0's loss curve."""
    import deepspeed
    import ray.train


    cfg = config_from_dict(loop_config["config"])
    job = TrainJob(**loop_config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not cfg.train.use_gpu:
        torch.set_num_threads(cfg.train.cpus_per_worker)
        skip_shm_comm_build()

    pad_id = models.load_tokenizer(cfg.model).pad_token_id
    rows = load_split(job.train_split)
    eval_rows = load_split(job.eval_split) if job.eval_split else []
    model = _build_model(cfg, job)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, cfg.train.lr_warmup_steps, job.max_steps)
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg.train)
    )

    state = _restore(engine)
    start_step = state["step"]
    micro = cfg.train.micro_batch_size
    if "eval_loss_start" not in state and eval_rows:
        state["eval_loss_start"] = heldout_loss(engine, eval_rows, pad_id, micro, rank, world)
    batches = micro_batches(len(rows), job.seed, rank, world, micro, start_step * cfg.train.grad_accum_steps)
    # The base model loads in eval mode; train mode (LoRA dropout on) is set here, whether or not a held-out
    # loss ran first: a job without eval samples used to train in eval mode.
    engine.train()
    window: list[float] = []
    started = time.monotonic()

    for step in range(start_step + 1, job.max_steps + 1):
        for _ in range(cfg.train.grad_accum_steps):
            batch = {k: v.to(engine.device) for k, v in pad_batch([rows[i] for i in next(batches)], pad_id).items()}
            loss_sum, count = token_loss_sum(engine, batch)
            loss = loss_sum / count.clamp(min=1)
            engine.backward(loss)
            engine.step()
            window.append(loss.item())
        state["step"] = step
        if step % cfg.train.log_every == 0 or step == job.max_steps:
            state["loss_curve"].append([step, float(np.mean(window))])
            window.clear()
            if rank == 0:
                seconds_per_step = (time.monotonic() - started) / (step - start_step)
                mean_loss = state["loss_curve"][-1][1]
                # Through logging, not print: Ray Train patches print in its workers and a print reached the driver twice.
                logger.info("[%s] step %d/%d  loss %.4f  %.2f s/step", job.name, step, job.max_steps, mean_loss,
                            seconds_per_step)
        if step % cfg.train.checkpoint_every == 0 and step < job.max_steps:
            _save_checkpoint(engine, state, {"step": step, "loss": loss.item()}, adapter=False)

    if eval_rows:
        state["eval_loss_end"] = heldout_loss(engine, eval_rows, pad_id, micro, rank, world)
    final = {
        "step": state["step"],
        "loss": state["loss_curve"][-1][1] if state["loss_curve"] else float("nan"),
        "eval_loss_start": state.get("eval_loss_start"),
        "eval_loss_end": state.get("eval_loss_end"),
        "resumed_from_step": start_step,
        "seconds_this_attempt": time.monotonic() - started,
        "train_samples": len(rows),
        "train_samples_digest": samples_digest(row["sample_id"] for row in rows),
        "eval_samples": len(eval_rows),
        "num_workers": world,
    }
    _save_checkpoint(engine, state, final, adapter=True)
    return {**final, "loss_curve": state["loss_curve"]}


def run_training(cfg: Config, job: TrainJob) -> TrainOutcome:
    """Train one LoRA on a Ray cluster (ray.init must already have run).

    Writes `adapter/` and `train_metrics.json` into job.output_dir, which callers keep
    in a staging folder until the whole stage is done.
    """
    import pyarrow.dataset
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    num_rows = pyarrow.dataset.dataset(job.train_split, format="parquet").count_rows()
    require_one_batch(num_rows, cfg.train.num_workers, cfg.train.micro_batch_size)
    env_vars = {} if cfg.train.use_gpu else {"DS_ACCELERATOR": "cpu"}
    # Ray Train reads this in the process that calls fit() and passes it to its controller; a user's value wins.
    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, str(QUEUED_JOB_START_TIMEOUT_S))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "job": dataclasses.asdict(job)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    result = trainer.fit()
    metrics = dict(result.return_value or result.metrics)
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = output_dir / ADAPTER_DIRNAME
    with result.checkpoint.as_directory() as checkpoint_dir:
        shutil.copytree(Path(checkpoint_dir) / ADAPTER_DIRNAME, adapter_dir, dirs_exist_ok=True)
    (output_dir / TRAIN_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return TrainOutcome(adapter_dir=adapter_dir, metrics=metrics)

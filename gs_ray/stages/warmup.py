"""Stage I, the warm-up stage: one LoRA on the warm-up split, whose gradients are Stage II's representation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gs_ray.config import Config, TrainConfig
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir, Stage
from gs_ray.modeling.models import check_lora_targets
from gs_ray.train.loop import SUMMARY_KEYS, TrainJob, run_training

logger = logging.getLogger(__name__)

SECTIONS = ("model", "lora", "train", "warmup")
WARMUP_EPOCHS_WARNING = 4.0
"""Passes over the warm-up split above which the warm-up stage warns: an adapter fitted closely to a small split
gives gradients that separate sources worse (benchmarks/RESULTS.md, warm-up length)."""


def warmup_epochs(train: TrainConfig, steps: int, samples: int) -> float:
    """Passes over `samples` warm-up samples that `steps` optimizer steps make."""
    return steps * train.micro_batch_size * train.grad_accum_steps * train.num_workers / max(samples, 1)


def warn_if_warmup_overfits(cfg: Config, epochs: float, samples: int) -> None:
    if epochs > WARMUP_EPOCHS_WARNING:
        logger.warning(
            "[warmup] %d steps make %.1f passes over %d warm-up samples (more than %.0f): gradients of an adapter "
            "fitted this closely to a small split separate sources worse; lower warmup.max_steps or raise "
            "data.warmup_fraction", cfg.warmup.max_steps, epochs, samples, WARMUP_EPOCHS_WARNING)


def _build(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    data_dir = run.stage_dir(layout.DATA_STAGE)
    check_lora_targets(cfg.model, cfg.lora)  # a refused lora.target_modules fails here, not in a Train worker
    job = TrainJob(
        # The digest in the name keeps a changed config from resuming an old run's checkpoints.
        name=f"warmup-{cfg.digest(list(SECTIONS))}-{run.manifest(layout.DATA_STAGE)['digest']}",
        train_split=run.shared(data_dir / "warmup"),
        eval_split=run.shared(data_dir / "eval"),
        output_dir=str(staging),
        storage_path=run.ray_train_storage,
        max_steps=cfg.warmup.max_steps,
        learning_rate=cfg.warmup.learning_rate,
        seed=cfg.run.seed,
    )
    metrics = run_training(cfg, job).metrics
    summary = {key: metrics.get(key) for key in SUMMARY_KEYS}
    summary["epochs"] = round(warmup_epochs(cfg.train, summary["step"], summary["train_samples"]), 2)
    warn_if_warmup_overfits(cfg, summary["epochs"], summary["train_samples"])
    return summary


def describe(summary: dict[str, Any]) -> str:
    return (
        f"{summary['step']} steps on {summary['train_samples']} samples ({summary.get('epochs', 0):.1f} passes); "
        f"held-out loss {summary['eval_loss_start']:.4f} (base) -> {summary['eval_loss_end']:.4f}"
    )


WARMUP = Stage(layout.WARMUP_STAGE, SECTIONS, (layout.DATA_STAGE,), _build, describe)

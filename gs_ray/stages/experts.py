"""Stage III experts: one LoRA per cluster, all K Ray Train jobs launched at once.

Each expert is an ordinary `run_training` job (the loop warm-up uses) on the training
samples of its cluster, evaluated on the held-out samples assigned to the same cluster.
Every job is started from its own Ray task (which holds no CPU), so the jobs run side by
side as far as the cluster's free resources allow, and queue otherwise. Clusters smaller
than experts.min_cluster_size, or than one batch of an expert's job (its workers x
train.micro_batch_size), are first merged into their nearest cluster by centroid cosine; the
merge is printed and recorded in `experts.json`, never silent. All of that is settled before
any job starts: if fewer than two experts would remain (the router needs two), the stage stops
with the cluster sizes. If one job fails, the others are cancelled, and their Ray Train runs
with them, before the failure is raised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.numpy import load_file

from gs_ray.config import Config, ExpertsConfig, TrainConfig, config_from_dict
from gs_ray.core import layout
from gs_ray.core.errors import DataError
from gs_ray.core.rundir import RunDir, Stage, say
from gs_ray.stages.warmup import WARMUP_EPOCHS_WARNING, warmup_epochs
from gs_ray.train.loop import TrainJob, run_training

logger = logging.getLogger(__name__)

MIN_EXPERTS = 2
"""Experts the router needs to have something to choose."""
EXPERT_EPOCHS_WARNING = WARMUP_EPOCHS_WARNING
"""Passes over its own samples above which an expert's plan is warned about, as the warm-up's is."""
CANCELLED_JOBS_WAIT_S = 60.0
"""How long a failed stage waits for the expert jobs it cancelled to end before it raises the failure."""


def merge_small_clusters(sizes: list[int], centroids: np.ndarray, min_size: int) -> tuple[list[int], list[int]]:
    """(expert id of every cluster, the cluster kept as each expert): small clusters join the most similar kept one.

    Expert ids are contiguous (0..E-1) in the order of the kept clusters. If no cluster
    reaches min_size, the largest one is kept so that there is at least one expert.
    """
    kept = [k for k, size in enumerate(sizes) if size >= min_size] or [int(np.argmax(sizes))]
    similarity = centroids @ centroids[kept].T
    return [kept.index(k) if k in kept else int(np.argmax(similarity[k])) for k in range(len(sizes))], kept


def expert_steps(sizes: list[int], cfg: ExpertsConfig, samples_per_step: int) -> list[int]:
    """Optimizer steps per expert: fixed, a share of E * max_steps proportional to size, or `epochs` passes."""
    if cfg.budget == "fixed":
        return [cfg.max_steps] * len(sizes)
    if cfg.budget == "epochs":
        return [max(cfg.min_steps, math.ceil(cfg.epochs * size / samples_per_step)) for size in sizes]
    total = cfg.max_steps * len(sizes)
    floor = min(cfg.min_steps, cfg.max_steps)
    return [max(floor, round(total * size / sum(sizes))) for size in sizes]


def _write_subset(split_dir: Path, sample_ids: list[str], out_dir: Path) -> int:
    """The rows of a split whose sample_id is in sample_ids, as one Parquet file under out_dir."""
    table = pyarrow.dataset.dataset(str(split_dir), format="parquet").to_table(
        filter=pc.field("sample_id").isin(sample_ids)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "part-0.parquet")
    return table.num_rows


def _expert_config(cfg: Config) -> Config:
    """The run config with train.* resources replaced by the experts' own, where set."""
    experts = cfg.experts
    train = dataclasses.replace(
        cfg.train,
        num_workers=experts.num_workers or cfg.train.num_workers,
        cpus_per_worker=experts.cpus_per_worker or cfg.train.cpus_per_worker,
    )
    return dataclasses.replace(cfg, train=train)


def expert_init_adapter(cfg: Config, run: RunDir) -> str:
    """Where every expert (and the one-LoRA baseline that matches them) starts: the warm-up adapter, or "" for fresh."""
    if cfg.experts.init != "warmup":
        return ""
    return run.shared(run.stage_dir(layout.WARMUP_STAGE) / layout.ADAPTER_DIRNAME)


@ray.remote(num_cpus=0)
def _train_expert(config: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """One expert's training job; the task only waits on Ray Train, so it reserves no CPU."""
    started = time.time()
    outcome = run_training(config_from_dict(config), TrainJob(**job))
    return {**outcome.metrics, "started_at": started, "ended_at": time.time()}


def _one_batch(train: TrainConfig) -> tuple[int, str]:
    """Fewest samples a job can train on (one micro-batch on each worker), and how to say it."""
    workers = f"{train.num_workers} worker{'s' if train.num_workers > 1 else ''}"
    return (train.num_workers * train.micro_batch_size,
            f"one batch of {workers} x train.micro_batch_size={train.micro_batch_size}")


def _require_experts(sizes: list[int], kept: list[int], min_size: int, why: str) -> None:
    """A DataError naming the clusters and their sizes when fewer than MIN_EXPERTS clusters can be experts."""
    if len(kept) >= MIN_EXPERTS and all(sizes[k] >= min_size for k in kept):
        return
    listed = ", ".join(f"cluster {k}: {size}" for k, size in enumerate(sizes))
    raise DataError(
        f"experts: only {sum(size >= min_size for size in sizes)} of {len(sizes)} clusters have the {min_size} "
        f"training samples an expert needs ({why}); the others would be merged, leaving fewer than {MIN_EXPERTS} "
        f"experts for the router to choose from. Cluster sizes: {listed}. Lower experts.min_cluster_size, "
        "train.micro_batch_size or experts.num_workers, fix cluster.k, or add data")


def _warn_if_experts_overfit(cfg: Config, plan: list[dict[str, Any]], samples_per_step: int) -> None:
    for entry in plan:
        asked = cfg.experts.budget == "epochs" and entry["steps"] == math.ceil(
            cfg.experts.epochs * entry["train_samples"] / samples_per_step)
        if entry["epochs"] > EXPERT_EPOCHS_WARNING and not asked:
            logger.warning(
                "[experts] expert %d (clusters %s) trains %d steps, %.1f passes over its %d samples (more than %.0f): "
                "an expert fitted this closely to a small cluster learns it by heart; lower experts.max_steps or "
                "experts.min_steps, use experts.budget=proportional or epochs, or raise experts.min_cluster_size",
                entry["expert"], entry["clusters"], entry["steps"], entry["epochs"], entry["train_samples"],
                EXPERT_EPOCHS_WARNING)


def _plan(cfg: Config, clusters: np.ndarray, centroids: np.ndarray) -> tuple[list[int], list[dict[str, Any]]]:
    """Which clusters each expert trains on and for how many steps; refused here, before any job, if it cannot run."""
    sizes = np.bincount(clusters, minlength=len(centroids)).tolist()
    train = _expert_config(cfg).train
    batch, batch_text = _one_batch(train)
    min_size = max(cfg.experts.min_cluster_size, batch)
    expert_of_cluster, kept = merge_small_clusters(sizes, centroids, min_size)
    _require_experts(sizes, kept, min_size, f"experts.min_cluster_size={cfg.experts.min_cluster_size}, {batch_text}")
    members = [[k for k, e in enumerate(expert_of_cluster) if e == expert] for expert in range(len(kept))]
    expert_sizes = [sum(sizes[k] for k in group) for group in members]
    samples_per_step = train.micro_batch_size * train.grad_accum_steps * train.num_workers
    steps = expert_steps(expert_sizes, cfg.experts, samples_per_step)
    plan = [{"expert": e, "clusters": group, "train_samples": expert_sizes[e], "steps": steps[e],
             "epochs": round(warmup_epochs(train, steps[e], expert_sizes[e]), 2)} for e, group in enumerate(members)]
    for k, expert in enumerate(expert_of_cluster):
        if k not in kept:
            reason = (f"experts.min_cluster_size={cfg.experts.min_cluster_size}"
                      if sizes[k] < cfg.experts.min_cluster_size else batch_text)
            say(f"[experts] cluster {k} ({sizes[k]} samples < {reason}) merged into expert {expert}")
    _warn_if_experts_overfit(cfg, plan, samples_per_step)
    return expert_of_cluster, plan


def gather_or_cancel(refs: list[ray.ObjectRef]) -> list[Any]:
    """The results of side-by-side jobs, in order. When one fails (or the wait is interrupted), every job still
    running is cancelled before the failure is raised.

    Cancelling is forced: it ends the process of each job's task, and with it the Ray Train controller that task
    started and the controller's workers (Ray ends the actors a process owns when it dies), so no sibling keeps
    training, or holding its CPUs and GPUs, after the stage has failed.
    """
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # raises the job's failure
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=CANCELLED_JOBS_WAIT_S)
        raise
    return ray.get(refs)


def _ids_by_expert(assignments: dict[str, list], expert_of_cluster: list[int], experts: int) -> list[list[str]]:
    """Sample ids of each expert, from assignment columns (sample_id, cluster)."""
    grouped: list[list[str]] = [[] for _ in range(experts)]
    for sample_id, cluster in zip(assignments["sample_id"], assignments["cluster"]):
        grouped[expert_of_cluster[cluster]].append(sample_id)
    return grouped


def _read_assignments(path: Path) -> dict[str, list]:
    return pq.read_table(path, columns=["sample_id", "cluster"]).to_pydict()


def train_experts(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    """Write expert-<e>/{adapter, train, eval, train_metrics.json} per expert and experts.json."""
    cluster_dir, data_dir = run.stage_dir(layout.CLUSTER_STAGE), run.stage_dir(layout.DATA_STAGE)
    assignments = _read_assignments(cluster_dir / layout.ASSIGNMENTS_FILE)
    centroids = load_file(str(cluster_dir / layout.CENTROIDS_FILE))["centroids"]
    expert_of_cluster, plan = _plan(cfg, np.asarray(assignments["cluster"]), centroids)
    train_ids = _ids_by_expert(assignments, expert_of_cluster, len(plan))
    eval_ids = _ids_by_expert(_read_assignments(cluster_dir / layout.EVAL_ASSIGNMENTS_FILE), expert_of_cluster, len(plan))
    expert_cfg = _expert_config(cfg)
    # Each job's task, and the Ray Train controller that attaches to its node, stay on the driver's node: a lost
    # worker node then costs its Train workers, which restart elsewhere from a checkpoint, never the controller.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    jobs = []
    for entry in plan:
        folder = layout.expert_dir(staging, entry["expert"])
        _write_subset(data_dir / "train", train_ids[entry["expert"]], folder / "train")
        has_eval = _write_subset(data_dir / "eval", eval_ids[entry["expert"]], folder / "eval") > 0
        job = TrainJob(
            # The cluster digest in the name: a re-clustered run never resumes another run's checkpoints.
            name=(f"{layout.expert_id(entry['expert'])}-{cfg.digest(['experts', 'train'])}-"
                  f"{run.manifest(layout.CLUSTER_STAGE)['digest']}"),
            train_split=run.shared(folder / "train"),
            eval_split=run.shared(folder / "eval") if has_eval else "",
            output_dir=str(folder),
            storage_path=run.ray_train_storage,
            max_steps=entry["steps"],
            learning_rate=cfg.experts.learning_rate,
            init_adapter=expert_init_adapter(cfg, run),
            seed=cfg.run.seed + 1 + entry["expert"],
        )
        task = _train_expert.options(scheduling_strategy=here)
        jobs.append(task.remote(expert_cfg.to_dict(), dataclasses.asdict(job)))
    results = gather_or_cancel(jobs)
    keys = ("step", "eval_loss_start", "eval_loss_end", "train_samples", "eval_samples", "train_samples_digest",
            "started_at", "ended_at")
    experts = [entry | {key: result.get(key) for key in keys} for entry, result in zip(plan, results)]
    record = {"expert_of_cluster": expert_of_cluster, "experts": experts}
    (staging / layout.EXPERTS_FILE).write_text(json.dumps(record, indent=2))
    return record | {"parallel_seconds": _overlap(experts)}


def _overlap(experts: list[dict[str, Any]]) -> float:
    """Seconds during which at least two expert jobs were running at once."""
    events = sorted([(e["started_at"], 1) for e in experts] + [(e["ended_at"], -1) for e in experts])
    running, overlap, previous = 0, 0.0, None
    for moment, change in events:
        if running >= 2 and previous is not None:
            overlap += moment - previous
        running, previous = running + change, moment
    return round(overlap, 1)


def describe(summary: dict[str, Any]) -> str:
    losses = ", ".join(
        f"{e['expert']}: {e['eval_loss_end']:.3f}" if e.get("eval_loss_end") is not None else f"{e['expert']}: -"
        for e in summary["experts"]
    )
    return (f"{len(summary['experts'])} experts, steps {[e['steps'] for e in summary['experts']]}; "
            f"held-out loss per expert {{{losses}}}; {summary['parallel_seconds']:.0f} s with jobs overlapping")


EXPERTS = Stage(layout.EXPERTS_STAGE, ("model", "lora", "train", "experts"),
                (layout.DATA_STAGE, layout.WARMUP_STAGE, layout.CLUSTER_STAGE), train_experts, describe)

"""Stage II, the cluster stage: K and initial centroids from validation gradients, then the training split's
gradients streamed past the clustering actor (gs_ray.gradientspace.stream has the pass itself)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.numpy import save_file

from gs_ray.config import Config
from gs_ray.core import layout, storage
from gs_ray.core.rundir import RunDir, Stage
from gs_ray.gradientspace import checks
from gs_ray.gradientspace.actor import ClusterActor
from gs_ray.gradientspace.metrics import label_agreement
from gs_ray.gradientspace.plots import plot_cluster_sizes, plot_spectrum
from gs_ray.gradientspace.stream import (
    ACTOR_CHECKPOINT,
    ACTOR_MAX_RESTARTS,
    assign_split,
    fit_on_validation,
    ordered_execution,
)

TRAIN_SPLIT, EVAL_SPLIT = "train", "eval"


def cluster_training_split(cfg: Config, data: str, adapter_dir: str, out_dir: Path) -> dict[str, Any]:
    """Stage II: write assignments.parquet (train), eval_assignments.parquet, centroids.safetensors, spectrum.json, plots.

    `data` is the data stage's folder and `adapter_dir` the warm-up adapter, each a path or URI every node can read.
    """
    with ordered_execution(cfg.grads.object_store_mib):
        clusterer, fit = fit_on_validation(cfg, data, adapter_dir, out_dir)
        checkpoint = out_dir / ACTOR_CHECKPOINT
        # Pinned to this node: its checkpoint is in this node's staging folder, and a restart must find it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Held here until the actor is gone: a restart runs the constructor again on the same arguments.
        initial_state = ray.put(clusterer.state_dict())
        actor = (
            ray.remote(ClusterActor)
            .options(num_cpus=0, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_RESTARTS,
                     scheduling_strategy=here)
            .remote(cfg.cluster, initial_state, str(checkpoint), cfg.grads.concurrency)
        )
        streamed, bad_train = assign_split(cfg, storage.join(data, TRAIN_SPLIT), adapter_dir, actor, "stream")
        ray.get(actor.finish_stream.remote())  # several workers' streams become one set of centroids, in stream order
        final = streamed
        if cfg.cluster.reassign:
            final, _ = assign_split(cfg, storage.join(data, TRAIN_SPLIT), adapter_dir, actor, "assign")
        # Held-out samples against the final centroids: each one's own cluster (oracle routing, expert eval sets).
        held_out, bad_eval = assign_split(cfg, storage.join(data, EVAL_SPLIT), adapter_dir, actor, "assign")
        state = ray.get(actor.state_dict.remote())
        resumed_from = ray.get(actor.resumed_from.remote())
        ray.kill(actor)
        # A kill in the middle of a save leaves its temporary file behind; neither belongs to the stage.
        for leftover in (checkpoint, *out_dir.glob(f".{ACTOR_CHECKPOINT}.tmp-*")):
            leftover.unlink(missing_ok=True)
    assignments = final
    summary: dict[str, Any] = {"k": fit["k"], "k_rule": fit["k_rule"], "k_candidates": fit["k_candidates"],
                               "val_samples": fit["val_samples"], "streams": cfg.grads.concurrency,
                               "actor_resumed_from_version": resumed_from,
                               "bad_gradients": checks.summary(fit.get("bad", []) + bad_train + bad_eval)}
    if cfg.cluster.reassign:
        changed = np.asarray(streamed["cluster"]) != np.asarray(final["cluster"])
        assignments = final.append_column("stream_cluster", streamed["cluster"])
        summary["reassign_changed_fraction"] = float(changed.mean())
    pq.write_table(assignments, out_dir / layout.ASSIGNMENTS_FILE)
    pq.write_table(held_out, out_dir / layout.EVAL_ASSIGNMENTS_FILE)
    save_file(
        {"centroids": state["centroids"], "mean": state["mean"]}, str(out_dir / layout.CENTROIDS_FILE),
        metadata={"k": str(state["k"]), "dim": str(state["dim"]), "centered": str(state["centered"])},
    )
    spectrum = {"k": fit["k"], "k_rule": fit["k_rule"], "centered": cfg.cluster.center,
                "singular_values": [float(s) for s in fit["singular_values"]], "gaps": fit["gaps"],
                "gap_index_offset": cfg.cluster.k_min - (1 if cfg.cluster.center else 0),
                "k_candidates": fit["k_candidates"], "silhouette": {str(k): s for k, s in fit["silhouette"].items()},
                "eigengaps": fit["eigengaps"],
                "prediction_strength": {str(k): s for k, s in fit["prediction_strength"].items()}}
    (out_dir / layout.SPECTRUM_FILE).write_text(json.dumps(spectrum, indent=2))
    clusters = np.asarray(assignments["cluster"])
    summary |= {
        "train_samples": len(clusters), "dim": int(state["dim"]),
        "sizes": np.bincount(clusters, minlength=fit["k"]).tolist(),
        "centroid_updates": np.asarray(state["updates"]).tolist(),
        "agreement": label_agreement(clusters, assignments["label"].to_pylist()),
    }
    _plot(spectrum, clusters, assignments["label"].to_pylist(), out_dir)
    return summary


def _plot(spectrum: dict, clusters: np.ndarray, labels: list, out_dir: Path) -> None:
    offset = spectrum["gap_index_offset"]
    gaps = {offset + i: gap for i, gap in enumerate(spectrum["gaps"])}
    plot_spectrum(spectrum["singular_values"], gaps, spectrum["k"], spectrum["k_rule"], out_dir / layout.SPECTRUM_PLOT)
    plot_cluster_sizes(clusters, labels, spectrum["k"], out_dir / layout.CLUSTER_SIZES_PLOT)


def _build(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    adapter = run.shared(run.stage_dir(layout.WARMUP_STAGE) / layout.ADAPTER_DIRNAME)
    return cluster_training_split(cfg, run.shared(run.stage_dir(layout.DATA_STAGE)), adapter, staging)


def describe(summary: dict[str, Any]) -> str:
    agreement = summary.get("agreement")
    against_labels = f"; vs labels: purity {agreement['purity']:.2f}, NMI {agreement['nmi']:.2f}" if agreement else ""
    return f"K={summary['k']} ({summary['k_rule']}); cluster sizes {summary['sizes']}{against_labels}"


CLUSTER = Stage(layout.CLUSTER_STAGE, ("model", "grads", "cluster"), (layout.DATA_STAGE, layout.WARMUP_STAGE),
                _build, describe)

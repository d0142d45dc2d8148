"""Stage III, the router stage: an encoder router trained to predict each training sample's expert from its
request text (gs_ray.train.router holds the model and its training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset
import pyarrow.parquet as pq

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.errors import DataError
from gs_ray.core.rundir import RunDir, Stage
from gs_ray.train.router import request_text, train_router


def _texts_and_clusters(split_dir: Path, assignments: Path) -> tuple[list[str], np.ndarray]:
    """Request text and assigned cluster of every sample of a split (joined on sample_id)."""
    samples = pyarrow.dataset.dataset(str(split_dir), format="parquet").to_table(columns=["sample_id", "messages"])
    joined = samples.join(pq.read_table(assignments, columns=["sample_id", "cluster"]), "sample_id").sort_by("sample_id")
    texts = [request_text(json.loads(messages)) for messages in joined["messages"].to_pylist()]
    return texts, joined["cluster"].to_numpy()


def train_run_router(cfg: Config, run: RunDir, out_dir: Path) -> dict:
    """Stage III router: train on the training split's experts, check on the held-out split's; save to out_dir."""
    record = json.loads((run.stage_dir(layout.EXPERTS_STAGE) / layout.EXPERTS_FILE).read_text())
    expert_of_cluster = np.asarray(record["expert_of_cluster"])
    experts = len(record["experts"])
    if experts < 2:
        raise DataError("only one expert was trained, so there is nothing to route; lower experts.min_cluster_size")
    cluster_dir, data_dir = run.stage_dir(layout.CLUSTER_STAGE), run.stage_dir(layout.DATA_STAGE)
    texts, clusters = _texts_and_clusters(data_dir / "train", cluster_dir / layout.ASSIGNMENTS_FILE)
    router, metrics = train_router(texts, expert_of_cluster[clusters], experts, cfg.router, seed=cfg.run.seed)
    eval_texts, eval_clusters = _texts_and_clusters(data_dir / "eval", cluster_dir / layout.EVAL_ASSIGNMENTS_FILE)
    if eval_texts:
        predicted, _ = router.predict(eval_texts)
        metrics["eval_accuracy"] = float(np.mean(predicted == expert_of_cluster[eval_clusters]))
        metrics["eval_samples"] = len(eval_texts)
    router.save(out_dir / layout.ROUTER_DIRNAME)
    (out_dir / layout.ROUTER_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return {key: metrics.get(key) for key in ("accuracy", "majority_baseline", "eval_accuracy", "eval_samples",
                                              "train_samples", "holdout_samples", "warnings")} | {
        "ece": metrics["calibration"]["ece"], "experts": experts}


def describe(summary: dict[str, Any]) -> str:
    held_out = f", held-out split {summary['eval_accuracy']:.3f}" if summary.get("eval_accuracy") is not None else ""
    accuracy = summary["accuracy"]
    return (f"accuracy {accuracy:.3f} (holdout{held_out}; majority {summary['majority_baseline']:.3f})"
            if accuracy is not None else "trained (no holdout)")


ROUTER = Stage(layout.ROUTER_STAGE, ("router",), (layout.DATA_STAGE, layout.CLUSTER_STAGE, layout.EXPERTS_STAGE),
               train_run_router, describe)

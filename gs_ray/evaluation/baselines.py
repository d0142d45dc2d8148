"""The clustering baselines: other ways to split the training set, run through the same experts and router stages.

Each baseline lives in `<run>/baselines/<method>/` with its own `cluster/` (assignments.parquet,
eval_assignments.parquet, centroids.safetensors: the files Stage III reads), `experts/` and
`router/`. `BaselineRun` is the run directory as those stages see it: cluster, experts and
router resolve to the baseline's folder, everything else (data, warm-up, analysis) to the
main run's, so the experts and router stages run unchanged on the alternative assignments,
with the same config, K and step budget as GradientSpace.

- `embedding`: the router encoder's (all-MiniLM-L6-v2) embedding of each request text,
  clustered by k-means on the unit sphere;
- `random_projection`: each sample's LoRA gradient projected to baselines.projection_dim
  dimensions by a seeded Rademacher matrix (LESS, ELREA), normalized, clustered by k-means.

K is the GradientSpace run's (cluster.k, or what the gap rule chose there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.cluster import KMeans

from gs_ray.config import Config
from gs_ray.core import layout, storage
from gs_ray.core.errors import DataError
from gs_ray.core.rundir import RunDir, Stage
from gs_ray.data.batches import load_split
from gs_ray.evaluation.analysis import load_analysis
from gs_ray.gradientspace.cluster import nearest_centroids
from gs_ray.gradientspace.metrics import label_agreement
from gs_ray.gradientspace.plots import plot_cluster_sizes
from gs_ray.train.router import embed_texts, request_text

BASELINES_DIRNAME = "baselines"
EMBEDDING, RANDOM_PROJECTION = "embedding", "random_projection"
BASELINE_METHODS = (EMBEDDING, RANDOM_PROJECTION)
OWN_STAGES = ("cluster", "experts", "router")
"""Stages a baseline has its own copy of; the rest are the main run's."""
FEATURES_FILE = "features.safetensors"
"""The training rows' clustering features, in assignments order (the report compares embedding and gradient cosines)."""
ZERO_NORM = 1e-12


class BaselineRun(RunDir):
    """A baseline's view of a run: its own cluster, experts and router; the main run's other stages."""

    def __init__(self, parent: RunDir, method: str):
        if method not in BASELINE_METHODS:
            raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINE_METHODS)}")
        self.parent, self.method = parent, method
        self.root = parent.root / BASELINES_DIRNAME / method
        self.remote = storage.join(parent.remote, BASELINES_DIRNAME, method) if parent.remote else None

    def stage_dir(self, stage: str) -> Path:
        return super().stage_dir(stage) if stage in OWN_STAGES else self.parent.stage_dir(stage)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return super().manifest(stage) if stage in OWN_STAGES else self.parent.manifest(stage)

    @property
    def ray_train_storage(self) -> str:
        return self.parent.ray_train_storage

    def shared(self, path: Path) -> str:
        return super().shared(path) if path.is_relative_to(self.root) else self.parent.shared(path)

    def expected_inputs(self, cfg: Config, stage: Stage) -> dict[str, Any]:
        inputs = super().expected_inputs(cfg, stage)
        if stage.name == "cluster":  # K comes from the GradientSpace clustering
            inputs["gradientspace_cluster"] = (self.parent.manifest("cluster") or {}).get("digest")
        return inputs


def baseline_k(cfg: Config, run: BaselineRun) -> int:
    """The K of the GradientSpace run: cluster.k, or the gap rule's choice recorded in its manifest."""
    return cfg.cluster.k or int(run.parent.manifest("cluster")["summary"]["k"])


def spherical_kmeans(train: np.ndarray, k: int, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clusters, centroids) of k-means on the unit-normalized rows; centroids are normalized member means."""
    if len(train) <= k:
        raise DataError(f"{k} clusters need more than {k} training samples, got {len(train)}")
    units = _normalize(train)
    clusters = KMeans(n_clusters=k, init="k-means++", n_init=restarts, random_state=seed).fit_predict(units)
    centroids = _normalize(np.stack([units[clusters == c].mean(axis=0) for c in range(k)]))
    return clusters.astype(np.int64), centroids.astype(np.float32)


def _normalize(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, ZERO_NORM)).astype(np.float32)


def _assignment_table(ids: list[str], clusters: np.ndarray, similarity: np.ndarray, labels: list) -> pa.Table:
    table = pa.table({"sample_id": ids, "cluster": clusters.astype(np.int64), "similarity": similarity.astype(np.float32),
                      "label": labels})
    return table.sort_by("sample_id")


def write_clustering(cfg: Config, k: int, train: dict[str, Any], held_out: dict[str, Any], staging: Path) -> dict:
    """Cluster the train features, assign the eval features to the nearest centroid, write what Stage III reads.

    train / held_out: {"ids", "features" (n x f), "labels"}.
    """
    from safetensors.numpy import save_file


    clusters, centroids = spherical_kmeans(train["features"], k, cfg.baselines.kmeans_restarts, cfg.run.seed)
    similarity = np.sum(_normalize(train["features"]) * centroids[clusters], axis=1)
    table = _assignment_table(train["ids"], clusters, similarity, train["labels"])
    pq.write_table(table, staging / layout.ASSIGNMENTS_FILE)
    eval_clusters, eval_similarity = nearest_centroids(_normalize(held_out["features"]), centroids)
    pq.write_table(_assignment_table(held_out["ids"], eval_clusters, eval_similarity, held_out["labels"]),
                   staging / layout.EVAL_ASSIGNMENTS_FILE)
    save_file({"centroids": centroids}, str(staging / layout.CENTROIDS_FILE))
    order = np.argsort(np.asarray(train["ids"], dtype=object))  # the assignments' order (sorted by sample_id)
    save_file({"features": np.ascontiguousarray(train["features"][order], dtype=np.float32)}, str(staging / FEATURES_FILE))
    sorted_clusters = np.asarray(table["cluster"])
    plot_cluster_sizes(sorted_clusters, table["label"].to_pylist(), k, staging / layout.CLUSTER_SIZES_PLOT)
    summary = {"k": k, "k_rule": "K of the GradientSpace run", "train_samples": len(sorted_clusters),
               "sizes": np.bincount(sorted_clusters, minlength=k).tolist(),
               "agreement": label_agreement(sorted_clusters, table["label"].to_pylist())}
    (staging / "clustering.json").write_text(json.dumps(summary, indent=2))
    return summary


def _split_texts(run: RunDir, split: str) -> dict[str, Any]:
    rows = load_split(str(run.stage_dir("data") / split))
    return {"ids": [row["sample_id"] for row in rows], "labels": [row["label"] for row in rows],
            "texts": [request_text(json.loads(row["messages"])) for row in rows]}


def build_embedding_clusters(cfg: Config, run: BaselineRun, staging: Path) -> dict[str, Any]:
    """Embedding baseline: k-means on the router encoder's embeddings of the request texts."""

    train, held_out = _split_texts(run, "train"), _split_texts(run, "eval")
    for split in (train, held_out):
        split["features"] = embed_texts(cfg.router, split.pop("texts")) if split["texts"] else np.zeros((0, 1))
    return write_clustering(cfg, baseline_k(cfg, run), train, held_out, staging)


def build_projection_clusters(cfg: Config, run: BaselineRun, staging: Path) -> dict[str, Any]:
    """Random-projection baseline: k-means on the seeded Rademacher projections of the LoRA gradients."""

    arrays, rows = load_analysis(run.stage_dir("analysis"))
    splits = np.asarray(rows["split"])
    parts = {}
    for split in ("train", "eval"):
        members = np.flatnonzero(splits == split)
        parts[split] = {"ids": [rows["sample_id"][i] for i in members], "labels": [rows["label"][i] for i in members],
                        "features": arrays["projected"][members]}
    return write_clustering(cfg, baseline_k(cfg, run), parts["train"], parts["eval"], staging)


def _describe(summary: dict[str, Any]) -> str:
    agreement = summary.get("agreement")
    against = f"; vs labels: purity {agreement['purity']:.2f}, NMI {agreement['nmi']:.2f}" if agreement else ""
    return f"K={summary['k']} ({summary['k_rule']}); cluster sizes {summary['sizes']}{against}"


CLUSTER_STAGES = {
    EMBEDDING: Stage("cluster", ("cluster", "baselines", "router"), ("data",), build_embedding_clusters, _describe),
    RANDOM_PROJECTION: Stage("cluster", ("cluster", "baselines"), ("data", "analysis"), build_projection_clusters,
                             _describe),
}
"""Each baseline's clustering stage; experts and router follow with the pipeline's own stages."""

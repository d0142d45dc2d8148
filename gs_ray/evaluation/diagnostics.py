"""What the clusterings say about the gradients, from the analysis stage's Gram matrix (no gradient is kept).

For the GradientSpace clusters, each baseline's clusters and, as a reference, the source
labels themselves: agreement with the labels (purity, NMI, ARI), and the paper's
variance-reduction claim as the mean within-cluster variance of the training gradients
over their whole-set variance, for raw gradients and for unit-normalized ones (the
features Stage II clusters). Then the paper's Fig. 4 analogue: for seeded random pairs of
training samples, the cosine of their gradients against the cosine of their request
embeddings, and how much each separates same-source from cross-source pairs. Last, how the
sources sit in gradient space: whether each sample's nearest neighbour shares its source
(local structure), and how much variance the top principal components hold (the global
structure a centroid clustering can use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir
from gs_ray.evaluation.analysis import cosine_matrix, load_analysis, variance_ratio
from gs_ray.evaluation.baselines import BASELINE_METHODS, EMBEDDING, FEATURES_FILE, BaselineRun
from gs_ray.gradientspace.metrics import label_agreement

SOURCE_LABELS = "source_labels"
"""The reference 'clustering' by source label: how much variance the true domains explain."""
PAIRS_FILE = "cosine_pairs.parquet"
PAIR_SEED_SALT = 4
"""Added to run.seed for the pair sample, so that it is independent of every other seeded draw."""
TOP_COMPONENTS = 5
"""Principal components of the unit training gradients whose variance shares the diagnostics report."""


def _train_clusterings(run: RunDir) -> dict[str, pa.Table]:
    runs = {"gradientspace": run} | {name: BaselineRun(run, name) for name in BASELINE_METHODS}
    return {name: pq.read_table(found.stage_dir("cluster") / layout.ASSIGNMENTS_FILE, columns=["sample_id", "cluster",
                                                                                              "label"])
            for name, found in runs.items()}


def clustering_diagnostics(cfg: Config, run: RunDir, out_dir: Path) -> dict[str, Any]:
    """Agreement and variance ratios per clustering, and the cosine-pair summary (pairs written to out_dir)."""

    arrays, rows = load_analysis(run.stage_dir("analysis"))
    train = [i for i, split in enumerate(rows["split"]) if split == "train"]
    ids = [rows["sample_id"][i] for i in train]
    labels = [rows["label"][i] for i in train]
    gram = arrays["gram"][np.ix_(train, train)]
    cosines = cosine_matrix(gram)
    clusterings = {}
    for name, table in _train_clusterings(run).items():
        cluster_of = dict(zip(table["sample_id"].to_pylist(), table["cluster"].to_pylist()))
        clusters = np.asarray([cluster_of[i] for i in ids])
        clusterings[name] = {"k": int(clusters.max()) + 1, "sizes": np.bincount(clusters).tolist(),
                             "agreement": label_agreement(clusters, labels),
                             "variance_ratio": variance_ratio(gram, clusters),
                             "variance_ratio_normalized": variance_ratio(cosines, clusters)}
    sources = np.unique(np.asarray([str(label) for label in labels]), return_inverse=True)[1]
    clusterings[SOURCE_LABELS] = {"k": int(sources.max()) + 1, "variance_ratio": variance_ratio(gram, sources),
                                  "variance_ratio_normalized": variance_ratio(cosines, sources)}
    embeddings = _embedding_features(run, ids)
    pairs = cosine_pairs(cosines, embeddings, labels, cfg.evaluate.cosine_pairs, cfg.run.seed + PAIR_SEED_SALT)
    pq.write_table(pa.table(pairs), out_dir / PAIRS_FILE)
    units = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    structure = {"nearest_same_source": {"gradient": nearest_neighbour_agreement(cosines, labels),
                                         "embedding": nearest_neighbour_agreement(units @ units.T, labels)},
                 "chance": float(np.sum(np.square(np.bincount(sources) / len(sources)))),
                 "top_component_shares": component_shares(cosines, TOP_COMPONENTS)}
    return {"clusterings": clusterings, "cosine_pairs": pair_summary(pairs), "source_structure": structure,
            "train_samples": len(ids)}


def nearest_neighbour_agreement(similarity: np.ndarray, labels: list) -> float | None:
    """Fraction of rows whose most similar other row has the same label (None for fewer than two rows)."""
    if len(labels) < 2:
        return None
    others = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(others, -np.inf)
    nearest = np.argmax(others, axis=1)
    labels = np.asarray([str(label) for label in labels])
    return float(np.mean(labels[nearest] == labels))


def component_shares(cosines: np.ndarray, count: int) -> list[float]:
    """Shares of the unit rows' total variance on their top `count` principal components, from their cosines."""
    n = len(cosines)
    centering = np.eye(n) - np.full((n, n), 1.0 / n)
    eigenvalues = np.clip(np.linalg.eigvalsh(centering @ cosines @ centering)[::-1], 0.0, None)
    total = eigenvalues.sum()
    return [float(value / total) for value in eigenvalues[:count]] if total > 0 else []


def _embedding_features(run: RunDir, ids: list[str]) -> np.ndarray:
    """The embedding baseline's request embeddings of `ids`, in that order."""
    from safetensors.numpy import load_file


    folder = BaselineRun(run, EMBEDDING).stage_dir("cluster")
    features = load_file(str(folder / FEATURES_FILE))["features"]
    order = pq.read_table(folder / layout.ASSIGNMENTS_FILE, columns=["sample_id"])["sample_id"].to_pylist()
    index = {sample_id: i for i, sample_id in enumerate(order)}
    return features[[index[i] for i in ids]]


def cosine_pairs(gradient_cosines: np.ndarray, embeddings: np.ndarray, labels: list, count: int,
                 seed: int) -> dict[str, list]:
    """Up to `count` distinct random pairs (i < j): gradient cosine, embedding cosine, same source or not."""
    n = len(labels)
    total = n * (n - 1) // 2
    if total == 0:
        return {"i": [], "j": [], "gradient": [], "embedding": [], "same_source": []}
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(count, total), replace=False))
    first, second = np.triu_indices(n, k=1)
    i, j = first[picks], second[picks]
    units = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return {"i": i.tolist(), "j": j.tolist(), "gradient": gradient_cosines[i, j].tolist(),
            "embedding": np.sum(units[i] * units[j], axis=1).tolist(),
            "same_source": [labels[a] == labels[b] for a, b in zip(i, j)]}


def pair_summary(pairs: dict[str, list]) -> dict[str, Any]:
    """Correlation of gradient and embedding cosines; each one's mean on same- and cross-source pairs."""
    same = np.asarray(pairs["same_source"], dtype=bool)
    summary: dict[str, Any] = {"pairs": len(same), "same_source_pairs": int(same.sum())}
    spread = len(same) > 1 and min(np.std(pairs["gradient"]), np.std(pairs["embedding"])) > 0
    # Undefined (None) when either cosine is constant over the pairs.
    summary["pearson"] = float(np.corrcoef(pairs["gradient"], pairs["embedding"])[0, 1]) if spread else None
    for name in ("gradient", "embedding"):
        values = np.asarray(pairs[name], dtype=np.float64)
        within = float(values[same].mean()) if same.any() else None
        across = float(values[~same].mean()) if (~same).any() else None
        summary[name] = {"same_source_mean": within, "cross_source_mean": across,
                         "separation": None if within is None or across is None else within - across,
                         "std": float(values.std()) if len(values) else None}
    return summary

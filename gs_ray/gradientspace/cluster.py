"""Stage II clustering math: online SVD clustering of per-sample LoRA gradients (numpy float32).

1. Features: u = g / ||g||; with centering, u' = normalize(u - mean), mean = mean validation u.
2. Spectrum of the m x d validation features through the m x m Gram matrix (never d x d);
   K by cluster.k_rule (gs_ray.gradientspace.k_rules) unless cluster.k fixes it.
3. Initial centroids: k-means (k-means++, cosine) on the row-normalized coordinates P s of the
   Gram eigendecomposition, the top K or all m of them (spherical k-means on the full-d
   features; `cluster.init_coordinates`); c_k = normalized mean of its members' features.
4. Streaming: assign u to argmax_k <u, c_k> and add it to cache_k (capacity C). When a cache
   fills, update=mean adds its sum to cluster k's running sum, c_k its direction (online
   spherical k-means); update=ema blends in its top right singular vector v (signed to c_k):
   c_k <- normalize((1 - beta) c_k + beta v). State is O(K d) (ema: O(K C d)), never O(N d).

A distributed worker runs steps 1, 4's assignment and its caches (gs_ray.gradientspace.caches) locally and sends only
the (k, v) summaries; `apply_summary` on the central copy then reproduces `partial_fit`.
"""

from __future__ import annotations

import logging

import numpy as np

from gs_ray.config import ClusterConfig
from gs_ray.core.errors import GsRayError
from gs_ray.gradientspace import k_rules
from gs_ray.gradientspace.caches import FEATURE_DTYPE, ZERO_NORM, ClusterCaches

logger = logging.getLogger(__name__)

VersionToken = tuple[str, int]
"""(actor incarnation, centroid version): what a worker's centroid replica is up to date with."""

COLUMN_BLOCK = 16384
"""Columns of the m x d validation matrix read at a time: bounds memory for np.memmap inputs."""
KMEANS_N_INIT = 10
"""k-means restarts for the initial centroids (best inertia wins)."""


class ClusterError(GsRayError):
    """Clustering cannot proceed: too few validation rows, an empty cluster, wrong dimension."""


def _row_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; rows with norm <= ZERO_NORM become exactly zero."""
    norms = np.sqrt(np.sum(rows * rows, axis=1, keepdims=True))
    scale = np.where(norms > ZERO_NORM, 1.0 / np.maximum(norms, ZERO_NORM), 0.0).astype(rows.dtype)
    return rows * scale


def _as_matrix(grads, dim: int | None = None) -> np.ndarray:
    array = np.asarray(grads)
    if array.ndim != 2:
        raise ValueError(f"expected an (n, d) gradient matrix, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ClusterError(f"gradient dimension {array.shape[1]} does not match the clusterer's dimension {dim}")
    return array


def _require_finite(rows: np.ndarray, what: str) -> None:
    """A NaN or inf row would poison a centroid for good: refuse it, naming the rows (the stage filters them first)."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        positions = np.flatnonzero(~finite)
        raise ClusterError(f"{what}: rows {positions[:5].tolist()}{' ...' if len(positions) > 5 else ''} "
                           f"({len(positions)} of {len(rows)}) have NaN or infinite values")


class GradientFeatures:
    """Raw gradients -> clustering features: u = g/||g||; if center: u' = normalize(u - mean)."""

    def __init__(self, mean: np.ndarray | None):
        self.mean = None if mean is None else np.asarray(mean, dtype=FEATURE_DTYPE)

    def __call__(self, grads: np.ndarray) -> np.ndarray:
        units = _row_normalize(np.asarray(grads, dtype=FEATURE_DTYPE))
        if self.mean is None:
            return units
        has_gradient = np.any(units != 0, axis=1, keepdims=True)
        return _row_normalize(np.where(has_gradient, units - self.mean, 0).astype(FEATURE_DTYPE))


def gram_matrix(matrix, spans: list[tuple[int, int]] | None = None) -> np.ndarray:
    """The m x m float64 Gram matrix of an m x d matrix's columns (all, or those in spans [start, stop)).

    Accumulated in place over column blocks, so only one m x m array is ever held.
    """
    matrix = _as_matrix(matrix)
    gram = np.zeros((matrix.shape[0], matrix.shape[0]), dtype=np.float64)
    for begin, end in spans or [(0, matrix.shape[1])]:
        for start in range(begin, end, COLUMN_BLOCK):
            block = np.asarray(matrix[:, start : min(start + COLUMN_BLOCK, end)], dtype=np.float64)
            gram += block @ block.T
    return gram


def spectrum_from_gram(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending) and left singular vectors (columns) from a Gram matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.arange(len(eigenvalues))[::-1]
    return np.sqrt(np.clip(eigenvalues[order], 0.0, None)), eigenvectors[:, order]


def singular_spectrum(features) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending, length m) and left singular vectors (m x m) of an m x d matrix."""
    return spectrum_from_gram(gram_matrix(features))


UPDATES = ("ema", "mean", "none")
"""How streamed samples move the centroids (cluster.update): `ema`, each filled cache's top singular vector
blended in with weight beta; `mean`, each filled cache's feature sum added to the cluster's running sum (the
validation members' sum to start), the centroid its direction (online spherical k-means); `none`, the centroids
stay those of the validation k-means."""


def _validation_transform(gram: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """(T, w): features = T @ G and the mean feature direction = w @ G, from the raw Gram R = G G^T.

    u = D^+ g (D = row norms); centering subtracts the mean over rows that have a gradient;
    then rows are renormalized. Everything is m x m, so G is only ever read in column blocks.
    """
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    has_gradient = norms > ZERO_NORM
    inverse_norms = np.where(has_gradient, 1.0 / np.maximum(norms, ZERO_NORM), 0.0)
    m = len(norms)
    mean_weights = has_gradient / max(int(has_gradient.sum()), 1)
    centering = np.diag(has_gradient.astype(np.float64))
    if center:
        centering = centering @ (np.eye(m) - np.outer(np.ones(m), mean_weights))
    shifted = centering * inverse_norms[None, :]  # rows of (centered) unit gradients, as combinations of G's rows
    shifted_norms = np.sqrt(np.clip(np.sum((shifted @ gram) * shifted, axis=1), 0.0, None))
    scale = np.where(shifted_norms > ZERO_NORM, 1.0 / np.maximum(shifted_norms, ZERO_NORM), 0.0)
    return shifted * scale[:, None], mean_weights * inverse_norms


def _combine_rows(weights: np.ndarray, matrix) -> np.ndarray:
    """weights (r x m) @ matrix (m x d) in float64, reading the matrix in column blocks."""
    out = np.empty((weights.shape[0], matrix.shape[1]), dtype=np.float64)
    for start in range(0, matrix.shape[1], COLUMN_BLOCK):
        out[:, start : start + COLUMN_BLOCK] = weights @ np.asarray(matrix[:, start : start + COLUMN_BLOCK], np.float64)
    return out


def nearest_centroids(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature row's most similar centroid (int64) and that cosine similarity (float32)."""
    similarities = np.asarray(features, dtype=FEATURE_DTYPE) @ centroids.T
    clusters = np.argmax(similarities, axis=1).astype(np.int64)
    return clusters, similarities[np.arange(len(clusters)), clusters].astype(FEATURE_DTYPE)


class OnlineSVDClusterer:
    """K and initial centroids from the validation features, then streamed updates by cluster.update."""

    def __init__(self, cfg: ClusterConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.k = 0
        self.dim = 0
        self.centroids: np.ndarray | None = None
        self.features = GradientFeatures(None)
        self.version = 0
        self.updates = np.zeros(0, dtype=np.int64)
        self.singular_values = np.zeros(0)
        self.gaps = np.zeros(0)
        self.sums = np.zeros((0, 0))
        self.caches: ClusterCaches | None = None

    def fit_validation(self, grads) -> dict:
        """Mean, spectrum, K and initial centroids from the first cfg.max_val_samples rows of `grads` (m x d)."""
        grads = _as_matrix(grads)[: self.cfg.max_val_samples]
        m, dim = grads.shape
        if self.cfg.k > 0 and m < self.cfg.k + 1:
            raise ClusterError(f"cluster.k={self.cfg.k} needs at least {self.cfg.k + 1} validation rows, got {m}")
        gram = gram_matrix(grads)
        _require_finite(np.diag(gram)[:, None], "validation gradients")
        transform, mean_weights = _validation_transform(gram, self.cfg.center)
        cosines = transform @ gram @ transform.T
        singular_values, vectors = spectrum_from_gram(cosines)
        coordinates = vectors * singular_values  # same inner products as the m features: spherical k-means on these
        members = np.flatnonzero(np.linalg.norm(coordinates, axis=1) > ZERO_NORM)
        candidates = self._k_candidates(singular_values, coordinates[members], cosines[np.ix_(members, members)])
        k = self.cfg.k or candidates["k"][self.cfg.k_rule]
        rule = "cluster.k" if self.cfg.k else f"cluster.k_rule={self.cfg.k_rule}"
        rank = k if self.cfg.init_coordinates == "top_k" else len(singular_values)
        found = candidates.pop("labels")
        labels = found[k] if rank == len(singular_values) and k in found else None
        labels, members = self._initial_labels(coordinates[:, :rank], k, labels)
        gaps = candidates["gap"]
        onehot = np.zeros((k, m))
        onehot[labels, members] = 1.0
        combined = _combine_rows(np.vstack([mean_weights[None, :], onehot @ transform]), grads)
        self.k, self.dim, self.version = k, dim, 0
        self.features = GradientFeatures(combined[0].astype(FEATURE_DTYPE) if self.cfg.center else None)
        self.centroids = _row_normalize(combined[1:]).astype(FEATURE_DTYPE)
        self.sums = combined[1:]  # the members' feature sums: where update=mean's running sums start
        self.updates = np.zeros(k, dtype=np.int64)
        self.singular_values, self.gaps = singular_values, np.asarray(gaps, dtype=np.float64)
        self.caches = ClusterCaches(k, self.cfg.cache_size, dim, self.cfg.update)
        return {"k": k, "singular_values": singular_values, "gaps": list(gaps), "k_rule": rule,
                "k_candidates": candidates["k"], "silhouette": candidates["silhouette"],
                "eigengaps": candidates["eigengap"], "prediction_strength": candidates["prediction_strength"]}

    def _k_candidates(self, singular_values: np.ndarray, coordinates: np.ndarray, cosines: np.ndarray) -> dict:
        """What each K rule picks on these validation features (all are recorded; cluster.k_rule's is used)."""
        cfg = self.cfg
        if len(coordinates) <= cfg.k_min:  # too few rows for any rule: only a fixed cluster.k can go on
            if not cfg.k:
                raise ClusterError(f"choosing K in [{cfg.k_min}, {cfg.k_max}] needs more than {cfg.k_min} validation "
                                   f"rows with a gradient, got {len(coordinates)}")
            return {"k": {}, "gap": [], "silhouette": {}, "eigengap": [], "prediction_strength": {}, "labels": {}}
        needed = "" if cfg.k else cfg.k_rule
        try:
            return k_rules.every_rule(singular_values, coordinates, cosines, cfg.k_min, cfg.k_max, cfg.center,
                                      self.seed, needed)
        except k_rules.KRuleError as exc:
            # The rows > k_min checked above are all the other rules need: only prediction strength can fail here.
            prefix = "cluster.k_rule=prediction_strength: " if needed == "prediction_strength" else ""
            raise ClusterError(f"{prefix}{exc}") from exc

    def _initial_labels(self, coordinates: np.ndarray, k: int,
                        labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k-means (k-means++, cosine via row normalization) on the rows that have a direction; `labels` if given."""
        members = np.flatnonzero(np.linalg.norm(coordinates, axis=1) > ZERO_NORM)
        if len(members) < k + 1:
            raise ClusterError(f"{k} clusters need at least {k + 1} validation rows with a gradient, got {len(members)}")
        if labels is None:
            labels = k_rules.spherical_labels(coordinates[members], k, self.seed)
        empty = sorted(set(range(k)) - set(labels.tolist()))
        if empty:
            raise ClusterError(f"initial k-means left clusters {empty} empty; lower cluster.k or add validation rows")
        return labels, members

    def _check_fitted(self) -> None:
        if self.centroids is None:
            raise ClusterError("the clusterer has no centroids yet: call fit_validation before assigning")

    def assign_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clusters int64, cosine float32) of feature rows against the current centroids; no update."""
        self._check_fitted()
        return nearest_centroids(_as_matrix(features, self.dim), self.centroids)

    def assign(self, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Assign raw gradients against the current centroids; no update."""
        self._check_fitted()
        return self.assign_features(self.features(_as_matrix(grads, self.dim)))

    def apply_summary(self, k: int, v: np.ndarray) -> None:
        """A filled cache's summary: under `ema`, v signed towards c_k, c_k <- normalize((1 - beta) c_k + beta v);
        under `mean`, the running sum of cluster k grows by v (a sum of features) and c_k is its direction."""
        self._check_fitted()
        v = np.asarray(v, dtype=FEATURE_DTYPE)
        if v.shape != (self.dim,):
            raise ClusterError(f"summary dimension {v.shape} does not match the clusterer's dimension {self.dim}")
        _require_finite(v[None, :], f"the summary of cluster {k}")
        if self.cfg.update == "mean":
            self.sums[k] += v
            self.centroids[k] = _row_normalize(self.sums[k : k + 1])[0].astype(FEATURE_DTYPE)
        else:
            if float(v @ self.centroids[k]) < 0:
                v = -v
            beta = FEATURE_DTYPE(self.cfg.ema_beta)
            self.centroids[k] = _row_normalize(((1 - beta) * self.centroids[k] + beta * v)[None, :])[0]
        self.version += 1
        self.updates[k] += 1

    def merge_streams(self, streams: list[OnlineSVDClusterer]) -> None:
        """Fold independent streams that each started from this clusterer's state into it, in list order.

        `mean`: every stream's added feature sums join the running sums (c_k = their direction);
        `ema`: c_k is the direction of the streams' centroids summed; `none`: nothing moved. The
        result depends on the streams and their order only, never on when their summaries arrived.
        """
        self._check_fitted()
        if self.cfg.update == "mean":
            start = self.sums.copy()
            for stream in streams:
                self.sums += stream.sums - start
            self.centroids = _row_normalize(self.sums).astype(FEATURE_DTYPE)
        elif self.cfg.update == "ema":
            self.centroids = _row_normalize(np.sum([s.centroids for s in streams], axis=0)).astype(FEATURE_DTYPE)
        self.updates = self.updates + np.sum([s.updates - self.updates for s in streams], axis=0)
        self.version = max([self.version, *(s.version for s in streams)]) + 1

    def partial_fit(self, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream rows in order: assign, cache, and apply any filled cache's summary before the next row."""
        self._check_fitted()
        grads = _as_matrix(grads, self.dim)
        _require_finite(grads, "streamed gradients")
        features = self.features(grads)
        clusters = np.empty(len(features), dtype=np.int64)
        similarities = np.empty(len(features), dtype=FEATURE_DTYPE)
        for i in range(len(features)):
            row = features[i : i + 1]
            (clusters[i],), (similarities[i],) = self.assign_features(row)
            if self.cfg.update == "none":
                continue
            for k, v in self.caches.add(clusters[i : i + 1], row):
                self.apply_summary(k, v)
        return clusters, similarities

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain arrays and numbers (np.savez-able without pickle)."""
        self._check_fitted()
        mean = self.features.mean
        return {
            "k": self.k, "dim": self.dim, "version": self.version, "seed": self.seed,
            "centroids": self.centroids.copy(), "updates": self.updates.copy(),
            "centered": int(mean is not None),
            "mean": np.zeros(self.dim, FEATURE_DTYPE) if mean is None else mean.copy(),
            "singular_values": self.singular_values.copy(), "gaps": self.gaps.copy(),
            "cache_rows": self.caches.filled_rows(), "cache_counts": self.caches.counts.copy(),
            "sums": self.sums.copy(),
        }

    def load_state_dict(self, state) -> None:
        """Restore from `state_dict` output (or an np.load of it)."""
        counts = np.asarray(state["cache_counts"], dtype=np.int64)
        if counts.max(initial=0) >= self.cfg.cache_size:
            raise ClusterError(f"saved caches hold up to {counts.max()} rows; cluster.cache_size={self.cfg.cache_size} is smaller")
        self.k, self.dim = int(state["k"]), int(state["dim"])
        self.version, self.seed = int(state["version"]), int(state["seed"])
        self.centroids = np.array(state["centroids"], dtype=FEATURE_DTYPE)
        self.updates = np.array(state["updates"], dtype=np.int64)
        self.features = GradientFeatures(np.array(state["mean"]) if int(state["centered"]) else None)
        self.singular_values = np.array(state["singular_values"], dtype=np.float64)
        self.gaps = np.array(state["gaps"], dtype=np.float64)
        self.sums = np.array(state["sums"], dtype=np.float64)
        self.caches = ClusterCaches(self.k, self.cfg.cache_size, self.dim, self.cfg.update)
        self.caches.restore(np.asarray(state["cache_rows"], dtype=FEATURE_DTYPE), counts)

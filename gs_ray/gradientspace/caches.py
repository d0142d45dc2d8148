"""Per-cluster caches of streamed features: what a gradient worker keeps between centroid updates."""

from __future__ import annotations

import numpy as np

FEATURE_DTYPE = np.float32
"""Features, centroids and caches are float32; Gram matrices are accumulated in float64."""
ZERO_NORM = 1e-12
"""Rows with a norm at or below this carry no direction: their features stay exactly zero."""


def top_singular_vector(rows: np.ndarray) -> np.ndarray:
    """Unit top right singular vector of a C x d matrix via its C x C Gram; zero if rows are all zero."""
    rows = np.asarray(rows, dtype=FEATURE_DTYPE)
    gram = (rows @ rows.T).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    if eigenvalues[-1] <= ZERO_NORM:
        return np.zeros(rows.shape[1], dtype=FEATURE_DTYPE)
    vector = eigenvectors[:, -1].astype(FEATURE_DTYPE) @ rows
    return (vector / np.linalg.norm(vector)).astype(FEATURE_DTYPE)


class ClusterCaches:
    """Per-cluster caches of capacity C; what a gradient worker keeps locally.

    Under update=ema a cluster's cache holds its C rows (their top singular vector is the
    summary); under mean only their running sum, since the sum is the summary: K d floats
    instead of K C d (docs/scaling.md). A cluster's buffer is allocated when its first row arrives.
    """

    def __init__(self, k: int, cache_size: int, dim: int, update: str = "ema"):
        self.cache_size, self.dim, self.update = cache_size, dim, update
        self.rows_kept = cache_size if update == "ema" else 1
        self.buffers: dict[int, np.ndarray] = {}
        self.counts = np.zeros(k, dtype=np.int64)

    def add(self, clusters: np.ndarray, features: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add rows to their caches in order; each time a cache fills, emit (k, its summary) and empty it."""
        summaries = []
        for k, row in zip(np.asarray(clusters).tolist(), features):
            buffer = self.buffers.get(k)
            if buffer is None:
                buffer = self.buffers[k] = np.zeros((self.rows_kept, self.dim), dtype=FEATURE_DTYPE)
            if self.update == "ema":
                buffer[self.counts[k]] = row
            else:
                buffer[0] += row
            self.counts[k] += 1
            if self.counts[k] == self.cache_size:
                summaries.append((k, top_singular_vector(buffer) if self.update == "ema" else buffer[0].copy()))
                buffer[...] = 0
                self.counts[k] = 0
        return summaries

    def filled_rows(self) -> np.ndarray:
        """What the caches hold, cluster by cluster (their rows, or under mean one running sum each): all a resume needs."""
        parts = [self.buffers[k][: min(self.counts[k], self.rows_kept)] for k in range(len(self.counts)) if self.counts[k]]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=FEATURE_DTYPE)

    def restore(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """Refill from `filled_rows` output and its counts."""
        self.counts[...] = 0
        start = 0
        for k, count in enumerate(np.asarray(counts, dtype=np.int64).tolist()):
            if count:
                kept = min(count, self.rows_kept)
                self.buffers[k] = np.zeros((self.rows_kept, self.dim), dtype=FEATURE_DTYPE)
                self.buffers[k][:kept] = rows[start : start + kept]
                self.counts[k] = count
                start += kept

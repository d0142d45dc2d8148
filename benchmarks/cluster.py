"""What online clustering costs next to the gradients it clusters.

Run from the repository root:  .venv/bin/python benchmarks/cluster.py [--quick]

Prints one JSON line per figure, then a summary line (`"figure": "summary"`) with:
- cluster_cost_ratio: clustering seconds per sample (features + assign + cache + summaries,
  pickling of each (k, v) message, apply_summary: worker side plus actor side) divided by
  the seconds per sample of the production per-sample gradient path
  (gs_ray.grads.PerSampleGradients on SmolLM2-135M with the demo preset's LoRA).
- memory_growth_10x: peak traced memory (tracemalloc) while streaming 10N rows over
  streaming N rows; rows are generated batch by batch inside the loop. Target <= 1.1.
- traffic_ratio: bytes sent to the central actor per sample (pickled (k, v) summaries)
  over the bytes of one float32 gradient (4 d). Target <= 0.125; ~1/C expected.
Clustering runs on synthetic planted gradients of the model's d (K=8, C=32, batches of 8).
--quick streams fewer rows and times fewer gradient batches (< 5 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
import tracemalloc
from pathlib import Path

import numpy as np

from gs_ray.config import ClusterConfig
from gs_ray.gradientspace.caches import ClusterCaches
from gs_ray.gradientspace.cluster import OnlineSVDClusterer

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GS_RAY_CACHE", str(ROOT / ".cache" / "test-models"))

K, CACHE_SIZE, BATCH = 8, 32, 8
"""Clusters, cache capacity C and rows per streamed batch (the gradient actor's batch size)."""
VAL_ROWS = 64
"""Validation rows for the initial centroids (only their existence matters for the timing)."""
STREAM_ROWS = {"quick": 2048, "full": 8192}
GRAD_BATCHES = {"quick": 2, "full": 5}
SEQ_LEN = 128
"""Tokens per random sample; the second half is the response (labels), the first half the prompt."""
MEMORY_DIM, MEMORY_ROWS = 20_000, 1000
"""Feature dimension and N for the memory-growth figure (N vs 10N streamed rows)."""
SHARED, SEPARATION, NOISE = 2.0, 1.0, 3.0
"""Planted gradients: norms of the shared direction, the cluster direction and the noise."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class PlantedStream:
    """Synthetic raw gradients: shared direction + one of K cluster directions + noise, one batch at a time."""

    def __init__(self, dim: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.shared = self._unit(self.rng.standard_normal((1, dim), dtype=np.float32))[0]
        self.directions = self._unit(self.rng.standard_normal((K, dim), dtype=np.float32))

    @staticmethod
    def _unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def batch(self, n: int) -> np.ndarray:
        labels = self.rng.integers(0, K, n)
        noise = self.rng.standard_normal((n, self.shared.shape[0]), dtype=np.float32)
        noise *= np.float32(NOISE / np.sqrt(self.shared.shape[0]))
        return SHARED * self.shared + SEPARATION * self.directions[labels] + noise


def fitted_clusterer(stream: PlantedStream) -> OnlineSVDClusterer:
    clusterer = OnlineSVDClusterer(ClusterConfig(k=K, cache_size=CACHE_SIZE), seed=0)
    clusterer.fit_validation(stream.batch(VAL_ROWS))
    return clusterer


def stream_batch(clusterer: OnlineSVDClusterer, caches: ClusterCaches, grads: np.ndarray) -> int:
    """One worker batch: features -> assign -> caches; each summary pickled and applied centrally. Bytes sent."""
    features = clusterer.features(grads)
    clusters, _ = clusterer.assign_features(features)
    sent = 0
    for k, vector in caches.add(clusters, features):
        message = pickle.dumps((k, vector))
        sent += len(message)
        clusterer.apply_summary(*pickle.loads(message))
    return sent


def gradient_seconds_per_sample(batches: int) -> dict:
    """Seconds per sample of PerSampleGradients on the demo model (SmolLM2-135M), after one untimed batch."""
    import torch
    from grads import random_batches  # benchmarks/grads.py, beside this script

    from gs_ray.config import load_config
    from gs_ray.gradientspace.grads import PerSampleGradients
    from gs_ray.modeling.models import attach_lora, load_base_model

    cfg = load_config("demo")
    model = attach_lora(load_base_model(cfg.model), cfg.lora)
    grads = PerSampleGradients(model)
    half = SEQ_LEN // 2  # prompt and reply of exactly half the tokens each
    warm, *inputs = random_batches(batches + 1, cfg.grads.batch_size, model.config.vocab_size, 0, (half, half + 1))
    grads(warm)  # warm-up: allocator, kernels
    start = time.perf_counter()
    for item in inputs:
        out = grads(item)
    seconds = time.perf_counter() - start
    samples = batches * cfg.grads.batch_size
    return {"model": cfg.model.name, "dim": grads.dim, "samples": samples, "seq_len": SEQ_LEN,
            "torch_threads": torch.get_num_threads(), "output_shape": list(out.shape),
            "grad_seconds_per_sample": seconds / samples}


def clustering_cost(dim: int, rows: int) -> dict:
    """Clustering seconds per sample and bytes sent per sample, streaming `rows` planted gradients."""
    stream = PlantedStream(dim, seed=1)
    clusterer = fitted_clusterer(stream)
    caches = ClusterCaches(K, CACHE_SIZE, dim)
    seconds, sent = 0.0, 0
    for _ in range(rows // BATCH):
        grads = stream.batch(BATCH)  # generating data is not clustering: untimed
        start = time.perf_counter()
        sent += stream_batch(clusterer, caches, grads)
        seconds += time.perf_counter() - start
    return {"dim": dim, "k": K, "cache_size": CACHE_SIZE, "stream_rows": rows, "summaries": clusterer.version,
            "cluster_seconds_per_sample": seconds / rows, "bytes_sent_per_sample": sent / rows,
            "gradient_bytes": 4 * dim, "traffic_ratio": sent / rows / (4 * dim)}


def streaming_peak(rows: int) -> int:
    """Peak traced bytes while streaming `rows` rows (state built before, counted; data made inside)."""
    tracemalloc.start()
    try:
        stream = PlantedStream(MEMORY_DIM, seed=2)
        clusterer = fitted_clusterer(stream)
        caches = ClusterCaches(K, CACHE_SIZE, MEMORY_DIM)
        tracemalloc.reset_peak()  # drop fit_validation's transient, keep the live state
        for _ in range(rows // BATCH):
            stream_batch(clusterer, caches, stream.batch(BATCH))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and gradient batches (< 5 minutes)")
    mode = "quick" if parser.parse_args().quick else "full"

    try:
        grad = gradient_seconds_per_sample(GRAD_BATCHES[mode])
    except Exception as exc:  # noqa: BLE001 - report and stop: the ratio needs a real model
        emit({"figure": "gradient_time", "error": f"{type(exc).__name__}: {exc}"})
        raise
    emit({"figure": "gradient_time", **grad})
    cost = clustering_cost(grad["dim"], STREAM_ROWS[mode])
    emit({"figure": "clustering_time", **cost})
    peak_n, peak_10n = streaming_peak(MEMORY_ROWS), streaming_peak(10 * MEMORY_ROWS)
    memory = {"dim": MEMORY_DIM, "rows_n": MEMORY_ROWS, "peak_bytes_n": peak_n, "peak_bytes_10n": peak_10n,
              "memory_growth_10x": peak_10n / peak_n}
    emit({"figure": "memory", **memory})
    emit({
        "figure": "summary", "mode": mode,
        "cluster_cost_ratio": cost["cluster_seconds_per_sample"] / grad["grad_seconds_per_sample"],
        "memory_growth_10x": memory["memory_growth_10x"], "traffic_ratio": cost["traffic_ratio"],
        "cluster_seconds_per_sample": cost["cluster_seconds_per_sample"],
        "grad_seconds_per_sample": grad["grad_seconds_per_sample"], "dim": grad["dim"], "k": K,
        "cache_size": CACHE_SIZE, "stream_rows": cost["stream_rows"], "summaries": cost["summaries"],
        "bytes_sent_per_sample": cost["bytes_sent_per_sample"],
        "peak_bytes_n": peak_n, "peak_bytes_10n": peak_10n,
    })


if __name__ == "__main__":
    main()

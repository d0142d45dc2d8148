"""Per-sample gradients for evaluation: the random-projection baseline's features and the diagnostics.

The `analysis` stage computes the full LoRA gradient of every train and eval sample with
the warm-up adapter (the Stage II worker pool, mode "gradients"), holds them only in a
memory-mapped scratch file, and keeps only small things:

- the Gram matrix G G^T of all rows (n x n, float64). Everything the report asks of the
  gradients follows from it: cosines, the within-cluster variance of any clustering
  (`variance_ratio`), and a 2-D PCA (`pca_2d`);
- the same Gram matrix split by gradient block (`grads.gradient_block`: one module's A or
  B matrices across layers, e.g. "v_proj.lora_B"), which sum to it, so the clustering can
  be replayed on any subset or reweighting of blocks (benchmarks/cluster_options.py);
- the rows projected to `baselines.projection_dim` dimensions by a seeded Rademacher
  matrix, as LESS and ELREA do (`rademacher_project`), for the random-projection baseline.

The Rademacher matrix (d x p, entries +-1/sqrt(p)) is never held whole: it is generated
in fixed blocks of PROJECTION_BLOCK rows, each from its own seed (projection_seed, block
index), so the result depends only on the seed and not on how the work is split.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.errors import DataError
from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split
from gs_ray.gradientspace.cluster import gram_matrix
from gs_ray.gradientspace.grads import gradient_blocks
from gs_ray.gradientspace.stream import INPUT_COLUMNS, gradients_to_file, ordered_execution

PROJECTION_BLOCK = 2048
"""Rows of the d x p Rademacher matrix generated at a time (p = 8192: 64 MiB of float32)."""
ZERO_NORM = 1e-12
"""Gradients with a norm at or below this have no direction; their cosines are 0."""
GRAM_FILE = "gradients.safetensors"
ROWS_FILE = "rows.parquet"
ANALYSIS_SPLITS = ("train", "eval")
BLOCK_GRAM_PREFIX = "block_gram/"
"""Key prefix, in GRAM_FILE, of each gradient block's Gram matrix (the block's name follows)."""


def rademacher_block(seed: int, block: int, rows: int, dim: int) -> np.ndarray:
    """Rows [block * PROJECTION_BLOCK, + rows) of the projection matrix: +-1/sqrt(dim), seeded per block."""
    rng = np.random.default_rng([seed, block])
    bits = np.unpackbits(np.frombuffer(rng.bytes((rows * dim + 7) // 8), dtype=np.uint8))[: rows * dim]
    signs = bits.astype(np.float32).reshape(rows, dim) * 2.0 - 1.0
    return signs / np.float32(np.sqrt(dim))


def rademacher_project(matrix, dim: int, seed: int) -> np.ndarray:
    """matrix (n x d, may be a memmap) @ R (d x dim), R Rademacher: inner products are preserved in expectation."""
    import torch

    n, d = matrix.shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros((n, dim), dtype=torch.float32, device=device)
    for block, start in enumerate(range(0, d, PROJECTION_BLOCK)):
        rows = min(PROJECTION_BLOCK, d - start)
        columns = torch.from_numpy(np.ascontiguousarray(matrix[:, start : start + rows], dtype=np.float32)).to(device)
        out += columns @ torch.from_numpy(rademacher_block(seed, block, rows, dim)).to(device)
    return out.cpu().numpy()


def block_grams(matrix, blocks: dict[str, list[tuple[int, int]]]) -> dict[str, np.ndarray]:
    """The Gram matrix of each block's columns of matrix (n x d); together they sum to the whole Gram matrix."""
    spans = sorted(span for block_spans in blocks.values() for span in block_spans)
    stops = [0] + [stop for _, stop in spans]
    if [start for start, _ in spans] != stops[:-1] or stops[-1] != matrix.shape[1]:
        raise ValueError(f"the gradient blocks cover columns {spans[:1]}..{spans[-1:]} with gaps or overlaps; "
                        f"the gradients have {matrix.shape[1]} columns")
    return {name: gram_matrix(matrix, block_spans) for name, block_spans in blocks.items()}


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    """Cosines between rows from their Gram matrix; rows without a gradient have cosine 0 with everything."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    inverse = np.where(norms > ZERO_NORM, 1.0 / np.maximum(norms, ZERO_NORM), 0.0)
    return gram * inverse[:, None] * inverse[None, :]


def variance_ratio(gram: np.ndarray, groups: np.ndarray | list) -> float:
    """Mean within-group variance over the variance of the whole set, from the rows' Gram matrix.

    Variance is the mean squared distance to the mean; for a set S,
    sum_{i in S} ||x_i - mean_S||^2 = sum_i G_ii - (1 / |S|) sum_{i,j in S} G_ij.
    Grouping can only lower it (ratio <= 1); clusters that capture how gradients differ lower it most.
    """
    groups = np.asarray(groups)
    if len(groups) != len(gram):
        raise DataError(f"variance_ratio got {len(groups)} groups for {len(gram)} rows")
    total = np.trace(gram) - gram.sum() / len(gram)
    within = np.trace(gram)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        within -= gram[np.ix_(members, members)].sum() / len(members)
    return float(within / total) if total > ZERO_NORM else float("nan")


def pca_2d(gram: np.ndarray) -> np.ndarray:
    """The rows' coordinates on their top two principal components (n x 2), from the Gram matrix of the rows."""
    n = len(gram)
    centering = np.eye(n) - np.full((n, n), 1.0 / n)
    eigenvalues, eigenvectors = np.linalg.eigh(centering @ gram @ centering)
    top = np.argsort(eigenvalues)[::-1][:2]
    return eigenvectors[:, top] * np.sqrt(np.clip(eigenvalues[top], 0.0, None))


def load_analysis(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(arrays {"gram", "projected", BLOCK_GRAM_PREFIX + block, ...}, rows {"sample_id", "split", "label"}).

    The arrays and rows of a finished analysis stage; stages built before block Grams existed have none.
    """
    from safetensors.numpy import load_file

    return load_file(str(folder / GRAM_FILE)), pq.read_table(folder / ROWS_FILE).to_pydict()


def build_analysis(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    """The analysis stage: gradients of the train and eval splits -> Gram matrix, projections, row table."""
    from safetensors.numpy import save_file


    rows, split_of = [], {}
    for split in ANALYSIS_SPLITS:
        for row in load_split(str(run.stage_dir("data") / split)):
            rows.append({column: row[column] for column in INPUT_COLUMNS})
            split_of[row["sample_id"]] = split
    if not rows:
        raise DataError("the train and eval splits are empty: nothing to analyse")
    label_of = {row["sample_id"]: row["label"] for row in rows}
    warmup_adapter = run.stage_dir("warmup") / layout.ADAPTER_DIRNAME
    adapter = run.shared(warmup_adapter)
    # The scratch file lives in the staging folder only while this runs: n x d floats are never kept.
    with ordered_execution(), tempfile.NamedTemporaryFile(dir=staging, prefix=".gradients-", suffix=".f32") as handle:
        ids, matrix, _ = gradients_to_file(cfg, rows, adapter, handle.name)
        grams = block_grams(matrix, gradient_blocks(warmup_adapter))
        gram = sum(grams.values())
        projected = rademacher_project(matrix, cfg.baselines.projection_dim, cfg.baselines.projection_seed)
        dim = int(matrix.shape[1])
        del matrix
    blocks = {f"{BLOCK_GRAM_PREFIX}{name}": block for name, block in grams.items()}
    save_file({"gram": gram, "projected": projected, **blocks}, str(staging / GRAM_FILE))
    table = {"sample_id": ids, "split": [split_of[i] for i in ids], "label": [label_of[i] for i in ids]}
    pq.write_table(pa.table(table), staging / ROWS_FILE)
    summary = {"rows": {split: table["split"].count(split) for split in ANALYSIS_SPLITS}, "dim": dim,
               "projection_dim": cfg.baselines.projection_dim,
               "block_norm_share": {name: round(float(np.trace(block) / max(np.trace(gram), ZERO_NORM)), 4)
                                    for name, block in grams.items()}}
    (staging / "analysis.json").write_text(json.dumps(summary, indent=2))
    return summary

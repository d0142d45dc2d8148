"""Stage II clustering options replayed on real gradients, without computing a gradient.

Run from the repository root, after `gs-ray evaluate` (or benchmarks/quality.py) has built a
run's analysis stage:

    .venv/bin/python benchmarks/cluster_options.py --run-dir runs/quality-cpu [--quick]

The analysis stage keeps the Gram matrix of the LoRA gradients of the run's training and
eval samples (computed with the run's warm-up adapter). Everything `OnlineSVDClusterer`
does (unit rows, centering, the m x m validation spectrum, k-means on its coordinates,
nearest-centroid assignment, cache top singular vectors, EMA) depends on the gradients only
through their inner products, so rows of P s from the eigendecomposition of the cosine matrix
stand in for the d-dimensional unit gradients exactly (an isometry).

For each seeded split (a random m rows play the validation split, the rest stream past as the
training split) and each option set (K fixed or automatic, centering, `init_coordinates`),
the real clusterer fits, streams, and is scored against the source labels. Prints one JSON
line per option set (mean and min purity and NMI over splits, the K it chose) and a summary
line (`"summary": true`) with the mean purity of each `init_coordinates` at each K, and two figures of
the gradients themselves: how often a sample's nearest neighbour shares its source, and the purity of
spherical k-means on all rows at once with K = the number of sources (raw and centered), about the
ceiling for a centroid method.
--quick runs 3 splits instead of 10 (seconds either way).

--blocks replays on part of the gradient: the sum of the Gram matrices of the blocks
(`grads.gradient_block`, e.g. "v_proj.lora_B") whose name contains any of the given strings,
so `--blocks lora_B` clusters on the B matrices' gradients alone and `--blocks v_proj` on
v_proj's A and B. Default: the whole gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from gs_ray.config import load_config
from gs_ray.core.rundir import MANIFEST
from gs_ray.evaluation.analysis import BLOCK_GRAM_PREFIX, cosine_matrix, load_analysis
from gs_ray.evaluation.baselines import spherical_kmeans
from gs_ray.evaluation.diagnostics import nearest_neighbour_agreement
from gs_ray.gradientspace.cluster import OnlineSVDClusterer, spectrum_from_gram
from gs_ray.gradientspace.metrics import label_agreement


def unit_gradient_rows(gram: np.ndarray) -> np.ndarray:
    """Rows whose inner products are the gradients' cosines (n x n, float32, as Stage II's features)."""
    singular_values, vectors = spectrum_from_gram(cosine_matrix(gram))
    return (vectors * singular_values).astype(np.float32)


def selected_gram(arrays: dict[str, np.ndarray], blocks: list[str] | None, analysis: Path) -> np.ndarray:
    """The whole Gram matrix, or the sum of the block Grams whose block name contains one of `blocks`."""
    if not blocks:
        return arrays["gram"]
    names = [key[len(BLOCK_GRAM_PREFIX):] for key in arrays if key.startswith(BLOCK_GRAM_PREFIX)]
    if not names:
        sys.exit(f"cluster_options: {analysis} has no per-block Gram matrices (built by an older gs_ray); "
                 f"remove that folder and rebuild it with `gs-ray evaluate`")
    chosen = [name for name in names if any(part in name for part in blocks)]
    if not chosen:
        sys.exit(f"cluster_options: no gradient block matches {blocks}; the blocks are {sorted(names)}")
    return sum(arrays[BLOCK_GRAM_PREFIX + name] for name in chosen)


def replay(rows: np.ndarray, labels: list, cluster_cfg, m: int, seed: int) -> dict:
    """Fit on a seeded random m rows, stream the rest, and score the streamed assignments."""
    order = np.random.default_rng(seed).permutation(len(rows))
    validation, streamed = order[:m], order[m:]
    clusterer = OnlineSVDClusterer(cluster_cfg, seed=seed)
    k = clusterer.fit_validation(rows[validation])["k"]
    clusters, _ = clusterer.partial_fit(rows[streamed])
    agreement = label_agreement(clusters, [labels[i] for i in streamed])
    return {"k": k, "purity": agreement["purity"], "nmi": agreement["nmi"]}


def structure(rows: np.ndarray, labels: list, restarts: int) -> dict:
    """Nearest-neighbour agreement with the source, and k-means purity on all rows at K = the number of sources."""
    k = len({label for label in labels if label is not None})
    found = {"nearest_neighbour_same_source": round(nearest_neighbour_agreement(rows @ rows.T, labels), 3)}
    for name, features in (("raw", rows), ("centered", rows - rows.mean(axis=0))):
        clusters, _ = spherical_kmeans(features, k, restarts, seed=0)
        found[f"kmeans_all_k{k}_{name}_purity"] = round(label_agreement(clusters, labels)["purity"], 3)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/quality-cpu", help="a run whose analysis stage is built")
    parser.add_argument("--quick", action="store_true", help="3 splits instead of 10")
    parser.add_argument("--val-samples", type=int, nargs="+", default=[48, 100, 200], help="validation rows m")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 3], help="cluster.k values (0: the gap rule)")
    parser.add_argument("--blocks", nargs="+", default=None,
                        help="cluster on these gradient blocks only (substrings of names like v_proj.lora_B)")
    args = parser.parse_args()
    analysis = Path(args.run_dir) / "analysis"
    if not (analysis / MANIFEST).exists():
        sys.exit(f"cluster_options: {analysis} is not a finished analysis stage; run `gs-ray evaluate "
                 f"--run-dir {args.run_dir}` (or benchmarks/quality.py) first")
    cfg = load_config(str(Path(args.run_dir) / "config.yaml"))
    arrays, table = load_analysis(analysis)
    rows, labels = unit_gradient_rows(selected_gram(arrays, args.blocks, analysis)), table["label"]
    if all(label is None for label in labels):
        sys.exit(f"cluster_options: the samples in {analysis} have no source labels to score against")
    splits = 3 if args.quick else 10
    means: dict[str, float] = {}
    for k, m, center, init in itertools.product(args.k, args.val_samples, (True, False), ("all", "top_k")):
        if m >= len(rows):
            continue
        options = {"k": k, "center": center, "init_coordinates": init}
        cluster_cfg = dataclasses.replace(cfg.cluster, **options)
        results = [replay(rows, labels, cluster_cfg, m, seed) for seed in range(splits)]
        purity = [r["purity"] for r in results]
        record = {**options, "val_samples": m, "splits": splits, "k_chosen": sorted({r["k"] for r in results}),
                  "purity_mean": round(float(np.mean(purity)), 3), "purity_min": round(float(np.min(purity)), 3),
                  "nmi_mean": round(float(np.mean([r["nmi"] for r in results])), 3)}
        print(json.dumps(record), flush=True)
        if center:
            means[f"purity_k{k}_m{m}_{init}"] = record["purity_mean"]
    print(json.dumps({"summary": True, "run_dir": args.run_dir, "blocks": args.blocks or "all", "samples": len(rows),
                      "centered": True, **means,
                      **structure(rows, labels, cfg.baselines.kmeans_restarts)}))


if __name__ == "__main__":
    main()

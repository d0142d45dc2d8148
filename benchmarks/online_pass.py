"""The online pass against offline k-means on the planted sets' saved features: what closes the gap.

    .venv/bin/python benchmarks/online_pass.py [--run-root runs/skills] [--val-fractions 0.2 0.33 0.5]
        [--cache-sizes 32 8 2] [--passes 1 2] [--repeats 6]

Reads the FEATURES_FILE that benchmarks/skills.py leaves in each set's run folder. Each
repeat shuffles a set's rows; the last half is the stream and the first `fraction` of the
rows plays the validation split. The production clusterer (OnlineSVDClusterer, at the
planted K) starts from k-means on those rows and streams the other half once or several
times; offline spherical k-means clusters the stream's rows themselves. The saved rows
have the same inner products as the features (centered already), so this is the stage's
arithmetic without recomputing a gradient. Prints one JSON line per (set, fraction, cache
size, passes) with NMI vs skill minus offline's, as streamed and as reassigned against the
final centroids (cluster.reassign), and a summary line averaging over the sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from gs_ray.config.sections import ClusterConfig
from gs_ray.gradientspace import k_rules
from gs_ray.gradientspace.cluster import OnlineSVDClusterer

ROOT = Path(__file__).resolve().parent.parent
FEATURES_FILE = "train_features.npz"  # benchmarks/skills.py writes it


def online_minus_offline(rows: np.ndarray, skills: np.ndarray, k: int, fraction: float, cache_size: int,
                         passes: int, seed: int) -> tuple[float, float]:
    """(streamed, reassigned) NMI vs skill minus offline k-means's, on the stream half of one shuffle."""
    order = np.random.default_rng(seed).permutation(len(rows))
    val, stream = order[: int(len(rows) * fraction)], order[len(rows) // 2 :]
    offline = k_rules.spherical_labels(rows[stream], k, seed)  # it takes unit rows itself
    clusterer = OnlineSVDClusterer(ClusterConfig(k=k, cache_size=cache_size, center=False), seed=seed)
    clusterer.fit_validation(rows[val])
    for _ in range(passes):
        streamed, _ = clusterer.partial_fit(rows[stream])
    reassigned, _ = clusterer.assign(rows[stream])
    truth = skills[stream]
    base = normalized_mutual_info_score(truth, offline)
    return (normalized_mutual_info_score(truth, streamed) - base,
            normalized_mutual_info_score(truth, reassigned) - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "skills")
    parser.add_argument("--val-fractions", type=float, nargs="+", default=[0.2, 0.33, 0.5])
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--passes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=6, help="shuffles per set and setting")
    args = parser.parse_args()
    if not all(0 < f <= 0.5 for f in args.val_fractions):
        raise SystemExit(f"online_pass: --val-fractions must lie in (0, 0.5], got {args.val_fractions}")
    if min(args.passes) < 1:
        raise SystemExit(f"online_pass: --passes must be >= 1, got {args.passes}")
    found = sorted(args.run_root.glob(f"*/{FEATURES_FILE}"))
    if not found:
        raise SystemExit(f"online_pass: no {FEATURES_FILE} under {args.run_root}; run benchmarks/skills.py first")
    by_setting: dict[tuple, list[tuple[float, float]]] = {}
    for path in found:
        saved = np.load(path)
        rows, skills = saved["coordinates"].astype(np.float32), saved["skill"]
        k = len(set(skills.tolist()))
        for fraction, cache_size, passes in itertools.product(args.val_fractions, args.cache_sizes, args.passes):
            diffs = np.asarray([online_minus_offline(rows, skills, k, fraction, cache_size, passes, seed)
                                for seed in range(args.repeats)])
            by_setting.setdefault((fraction, cache_size, passes), []).extend(map(tuple, diffs))
            print(json.dumps({"set": path.parent.name, "rows": len(rows), "k": k, "val_fraction": fraction,
                              "cache_size": cache_size, "passes": passes,
                              "streamed_minus_offline": round(float(diffs[:, 0].mean()), 4),
                              "reassigned_minus_offline": round(float(diffs[:, 1].mean()), 4),
                              "worst_streamed": round(float(diffs[:, 0].min()), 4)}), flush=True)
    for (fraction, cache_size, passes), diffs in sorted(by_setting.items()):
        diffs = np.asarray(diffs)
        print(json.dumps({"summary": True, "sets": len(found), "val_fraction": fraction, "cache_size": cache_size,
                          "passes": passes, "streamed_minus_offline": round(float(diffs[:, 0].mean()), 4),
                          "reassigned_minus_offline": round(float(diffs[:, 1].mean()), 4),
                          "within_0.02": round(float(np.mean(diffs[:, 0] >= -0.02)), 3)}), flush=True)


if __name__ == "__main__":
    main()

"""Every K rule on the planted sets' saved training features: how often each finds the planted K.

    .venv/bin/python benchmarks/k_rules.py [--run-root runs/skills] [--k-min 2] [--k-max 8]

Reads the FEATURES_FILE that benchmarks/skills.py leaves in each set's run folder (the
training split's features as coordinates, with each row's skill), runs each rule of
gs_ray.gradientspace.k_rules on them, and prints one JSON line per set (the planted K and
each rule's K) and a summary line with each rule's hits. The cluster stage chooses K on the
validation rows; this is a second, larger sample of the same features (a quarter of each
mix against about half), with no gradients recomputed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gs_ray.gradientspace import k_rules
from gs_ray.gradientspace.cluster import spectrum_from_gram

ROOT = Path(__file__).resolve().parent.parent
FEATURES_FILE = "train_features.npz"  # benchmarks/skills.py writes it


def rules_on(coordinates: np.ndarray, k_min: int, k_max: int, seed: int) -> dict[str, int]:
    """Each rule's K, as the cluster stage computes them (the saved coordinates are centered features)."""
    units = k_rules.unit_rows(coordinates)
    cosines = units @ units.T
    singular_values, _ = spectrum_from_gram(cosines)
    return k_rules.every_rule(singular_values, units, cosines, k_min, k_max, centered=True, seed=seed)["k"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "skills")
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=8, help="the demo preset's cluster.k_max")
    args = parser.parse_args()
    found = sorted(args.run_root.glob(f"*/{FEATURES_FILE}"))
    if not found:
        raise SystemExit(f"k_rules: no {FEATURES_FILE} under {args.run_root}; run benchmarks/skills.py first")
    hits: dict[str, int] = {}
    for path in found:
        saved = np.load(path)
        k_true = len(set(saved["skill"].tolist()))
        chosen = rules_on(saved["coordinates"], args.k_min, args.k_max, seed=0)
        for rule, k in chosen.items():
            hits[rule] = hits.get(rule, 0) + int(k == k_true)
        print(json.dumps({"set": path.parent.name, "rows": len(saved["skill"]), "k_true": k_true, "k": chosen}),
              flush=True)
    print(json.dumps({"summary": True, "sets": len(found), "hits": hits}), flush=True)


if __name__ == "__main__":
    main()

"""Planted skills: does Stage II find the skills that text embeddings miss, and pick K?

    .venv/bin/python benchmarks/skills.py [--families F ...] [--seeds 0 1 2] [--per-skill 40]
        [--config demo] [--run-root runs/skills] [--quick] [section.field=value ...]

For every family of gs_ray.data.planted (skills hidden in topic-heavy stories, near-identical
wording, 7 skills, two skills sharing a surface form) and every seed: write the mix, run the
`data`, `warmup` and `cluster` stages through the package (Ray Data actors, the clustering
actor), then score four clusterings of the same training split against the planted skill and
against the topic:

  gradientspace       the production clusters (K as the stage chose it, or cluster.k)
  offline             spherical k-means on the very same full-d features, at the production K:
                      the ceiling of the online pass (and `offline_true_k` at the planted K)
  minilm              all-MiniLM-L6-v2 embeddings of the instructions, spherical k-means, planted K
  random_projection   the gradients projected to 8192 dims (LESS), spherical k-means, planted K

Prints one JSON line per set ({"figure": "set"}), one per family with the mean and the spread
over seeds ({"figure": "family"}), and a summary ({"figure": "summary"}: K hit rate, the
online-minus-offline gap, gradientspace minus MiniLM). Each set's run folder keeps
FEATURES_FILE, the training features as coordinates, to compare K rules offline. --quick is
a smoke run on the tiny random model (its figures mean nothing; under 10 minutes on 2
cores): one seed, 20 rows per skill.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from safetensors.numpy import load_file

from gs_ray.config import Config, load_config
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split
from gs_ray.data.planted import FAMILIES, make_family, true_k
from gs_ray.evaluation.analysis import rademacher_project
from gs_ray.evaluation.baselines import spherical_kmeans
from gs_ray.gradientspace.cluster import GradientFeatures, gram_matrix, spectrum_from_gram
from gs_ray.gradientspace.metrics import label_agreement
from gs_ray.gradientspace.stream import INPUT_COLUMNS, gradients_to_file, ordered_execution
from gs_ray.stages.pipeline import run_stages
from gs_ray.train.router import embed_texts

ROOT = Path(__file__).resolve().parent.parent
PROJECTION_DIM = 8192
KMEANS_RESTARTS = 10
LOCAL_RAY_CPUS = 4
"""Logical CPUs of the local Ray: the warm-up's Train worker and the gradient actors on 2 cores."""
SPLIT_OVERRIDES = ("data.id_column=id", "data.label_column=skill", "data.sample_fraction=1", "data.warmup_fraction=0.25",
                   "data.val_fraction=0.25", "data.eval_fraction=0.05")
"""A quarter of each mix warms up, a quarter chooses K and the initial centroids, the rest is clustered."""
QUICK_OVERRIDES = ("warmup.max_steps=6",)
FEATURES_FILE = "train_features.npz"
"""In each set's run folder: the training split's feature coordinates, ids, skills and topics."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--per-skill", type=int, default=None, help="rows per skill (default 40, 20 with --quick)")
    parser.add_argument("--config", default=None, help="preset or YAML (default demo, tiny with --quick)")
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "skills")
    parser.add_argument("--quick", action="store_true", help="smoke run on the tiny model")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.per_skill = args.per_skill or (20 if args.quick else 40)
    args.config = args.config or ("tiny" if args.quick else "demo")
    return args


def write_mix(family: str, per_skill: int, seed: int, path: Path) -> dict[str, dict]:
    """The family's rows as alpaca JSONL with ids; returns {id: row} (skill and topic are the truths)."""
    rows = {f"{family}-{seed}-{i}": row for i, row in enumerate(make_family(family, per_skill, seed))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for sample_id, row in rows.items():
            handle.write(json.dumps({"id": sample_id, "instruction": row["instruction"], "output": row["output"],
                                     "skill": row["skill"]}) + "\n")
    return rows


def production_features(cfg: Config, run: RunDir, grads: np.ndarray) -> np.ndarray:
    """The features the cluster stage clustered: its saved mean, the same transform."""
    saved = load_file(str(run.stage_dir(layout.CLUSTER_STAGE) / layout.CENTROIDS_FILE))
    return GradientFeatures(saved["mean"] if cfg.cluster.center else None)(grads)


def isometric_rows(features: np.ndarray) -> np.ndarray:
    """n x n coordinates with the same inner products as the n x d features (from their Gram matrix)."""
    values, vectors = spectrum_from_gram(gram_matrix(features))
    return (vectors * values).astype(np.float32)


def scores(clusters: np.ndarray, ids: list[str], truth: dict[str, dict]) -> dict:
    out = {}
    for against in ("skill", "topic"):
        agreement = label_agreement(clusters, [truth[i][against] for i in ids])
        out[against] = {key: round(agreement[key], 4) for key in ("nmi", "ari", "purity")}
    return out


def score_set(cfg: Config, family: str, seed: int, truth: dict[str, dict], manifests: dict) -> dict:
    run = RunDir(cfg.run.run_dir)
    assigned = {row["sample_id"]: row["cluster"] for row in
                load_split_table(run.stage_dir(layout.CLUSTER_STAGE) / layout.ASSIGNMENTS_FILE)}
    train = [{c: row[c] for c in INPUT_COLUMNS} for row in load_split(str(run.stage_dir(layout.DATA_STAGE) / "train"))]
    k_true, k_chosen = true_k(family), int(manifests["cluster"]["summary"]["k"])
    adapter = str(run.stage_dir(layout.WARMUP_STAGE) / layout.ADAPTER_DIRNAME)
    with ordered_execution(), tempfile.NamedTemporaryFile(dir=run.root, suffix=".f32") as scratch:
        ids, grads, _ = gradients_to_file(cfg, train, adapter, scratch.name)
        grads = np.asarray(grads)
        coordinates = isometric_rows(production_features(cfg, run, grads))
        projected = rademacher_project(grads, PROJECTION_DIM, seed)
    # The training split's features as n x n coordinates (same inner products): what a K rule or a
    # clustering needs, kept so that rules can be compared offline without recomputing gradients.
    np.savez(run.root / FEATURES_FILE, coordinates=coordinates, ids=np.asarray(ids),
             skill=np.asarray([truth[i]["skill"] for i in ids]), topic=np.asarray([truth[i]["topic"] for i in ids]))
    texts = [truth[i]["instruction"] for i in ids]
    embedded = embed_texts(cfg.router, texts)
    methods = {
        "gradientspace": np.asarray([assigned[i] for i in ids]),
        "offline": spherical_kmeans(coordinates, k_chosen, KMEANS_RESTARTS, seed)[0],
        "offline_true_k": spherical_kmeans(coordinates, k_true, KMEANS_RESTARTS, seed)[0],
        "minilm": spherical_kmeans(embedded, k_true, KMEANS_RESTARTS, seed)[0],
        "random_projection": spherical_kmeans(projected, k_true, KMEANS_RESTARTS, seed)[0],
    }
    return {"figure": "set", "family": family, "seed": seed, "k_true": k_true, "k_chosen": k_chosen,
            "k_rule": manifests["cluster"]["summary"]["k_rule"],
            "k_candidates": manifests["cluster"]["summary"].get("k_candidates", {}),
            "samples": len(ids), "dim": int(grads.shape[1]),
            "methods": {name: scores(clusters, ids, truth) for name, clusters in methods.items()}}


def load_split_table(path: Path) -> list[dict]:
    return pq.read_table(path, columns=["sample_id", "cluster"]).to_pylist()


def run_set(args: argparse.Namespace, family: str, seed: int) -> dict:
    run_dir = (args.run_root / f"{family}-s{seed}").absolute()
    truth = write_mix(family, args.per_skill, seed, run_dir / "mix.jsonl")
    overrides = [f"run.run_dir={run_dir}", f"run.seed={seed}", f"data.paths=[{run_dir / 'mix.jsonl'}]",
                 *SPLIT_OVERRIDES, *(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    cfg = load_config(args.config, overrides)
    started = time.time()
    manifests = run_stages(cfg, "cluster")
    record = score_set(cfg, family, seed, truth, manifests)
    record["seconds"] = round(time.time() - started, 1)
    return record


def spread(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
            "max": round(float(np.max(values)), 4)}


def family_line(family: str, sets: list[dict]) -> dict:
    methods = sets[0]["methods"]
    return {"figure": "family", "family": family, "seeds": [s["seed"] for s in sets], "k_true": sets[0]["k_true"],
            "k_chosen": [s["k_chosen"] for s in sets], "k_candidates": [s["k_candidates"] for s in sets],
            "nmi_vs_skill": {m: spread([s["methods"][m]["skill"]["nmi"] for s in sets]) for m in methods},
            "nmi_vs_topic": {m: spread([s["methods"][m]["topic"]["nmi"] for s in sets]) for m in methods}}


def summary_line(sets: list[dict]) -> dict:
    nmi = lambda s, m: s["methods"][m]["skill"]["nmi"]  # noqa: E731
    rules = sorted({rule for s in sets for rule in s["k_candidates"]})
    return {"figure": "summary", "sets": len(sets),
            "k_hits": sum(s["k_chosen"] == s["k_true"] for s in sets),
            "k_hits_per_rule": {rule: sum(s["k_candidates"].get(rule) == s["k_true"] for s in sets) for rule in rules},
            "k_off_by_more_than_one": sum(abs(s["k_chosen"] - s["k_true"]) > 1 for s in sets),
            "online_minus_offline_nmi": spread([nmi(s, "gradientspace") - nmi(s, "offline") for s in sets]),
            "gradientspace_minus_minilm_nmi": spread([nmi(s, "gradientspace") - nmi(s, "minilm") for s in sets]),
            "min_gradientspace_nmi": round(min(nmi(s, "gradientspace") for s in sets), 4)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started_ray = not ray.is_initialized()
    if started_ray:
        joining = bool(os.environ.get("RAY_ADDRESS"))
        ray.init(logging_level=logging.WARNING, **({} if joining else {"num_cpus": LOCAL_RAY_CPUS}))
    try:
        sets = []
        for family in args.families:
            done = [run_set(args, family, seed) for seed in args.seeds]
            for record in done:
                emit(record)
            emit(family_line(family, done))
            sets.extend(done)
    finally:
        if started_ray:
            ray.shutdown()
    summary = summary_line(sets)
    emit(summary)
    return summary


if __name__ == "__main__":
    main()

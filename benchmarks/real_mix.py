"""Stage II on the real data mix: do gradient clusters recover the three sources?

Run from the repository root:

    .venv/bin/python benchmarks/real_mix.py [--quick] [--datasets ../shared/datasets]
        [--run-dir runs/real-mix] [--per-source N] [--seed S] [--config demo|gpu] [--evaluate] [--no-k3] [section.field=value ...]

1. Builds the mix as one JSONL file inside the run dir (never in the package: the Alpaca
   seed tasks are CC BY-NC), built by `gs_ray.data.mixes.build_mix`: a seeded sample of N rows
   per source among the rows that fit max_seq_len (`mixes.fits`), each with "domain" =
   gsm8k / mbpp / alpaca. GSM8K and MBPP rows come from the built-in mix's converters
   (GSM8K: question -> instruction, answer without <<...>> annotations -> output; MBPP:
   task text and its test asserts -> instruction, reference code -> output; tasks with
   setup code are left out). Alpaca: instruction, instance input, instance output (175
   tasks, one instance each, so N >= 175 takes all that fit).
2. Runs data -> warm-up -> Stage II with the demo preset (SmolLM2-135M-Instruct and its LoRA)
   on a local Ray (3 logical CPUs, see RAY_CPUS), automatic K; then re-runs only Stage II with
   cluster.k=3 (K = number of sources), reusing data and warm-up.
3. With --evaluate, continues the automatic-K run through experts, router and
   `gs-ray evaluate` (every method and baseline; benchmarks/quality.py is the benchmark
   built on it): held-out loss per source per method, and router accuracy.
4. Prints JSON lines (mix, stage seconds, K and rule, spectrum, sizes, cluster x source
   cross-tab, purity / NMI / ARI for each run, the evaluation) and a final
   {"summary": true, ...} line.

The demo preset is used with data.sample_fraction=1, 40 warm-up steps and 24 expert steps
(REAL_MIX_OVERRIDES), so figures stay comparable across sessions.

--quick: 60 rows per source and warmup.max_steps=10, a smoke run (figures meaningless).
Extra arguments are config overrides applied last (e.g. warmup.max_steps=80, cluster.center=false).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import ray

from gs_ray.config import load_config
from gs_ray.core import layout
from gs_ray.core.rundir import MANIFEST
from gs_ray.data.mixes import SEED, SOURCES, build_mix, write_mix
from gs_ray.stages.pipeline import run_stages

ROOT = Path(__file__).resolve().parent.parent
# Set before Ray starts, so its workers inherit them (the driver itself only loads local model folders).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GS_RAY_CACHE", str(ROOT / ".cache" / "test-models"))

PER_SOURCE = {"quick": 60, "full": 300}
QUICK_WARMUP_STEPS = 10
REAL_MIX_OVERRIDES = ("data.sample_fraction=1.0", "warmup.max_steps=40", "experts.max_steps=24")
"""The whole mix and the step budgets every recorded real-mix figure used (the demo preset is smaller)."""
SPECTRUM_SHOWN = 12
GRAD_ACTOR_CPUS = 2
"""grads.num_cpus_per_actor: the gradient actor uses both cores (torch threads follow Ray's CPU count)."""
RAY_CPUS = GRAD_ACTOR_CPUS + 1
"""Logical CPUs for the local Ray. One more than the gradient actor holds: with num_cpus=2 the actor pool
takes both and Ray Data's repartition task in front of it is never scheduled (Stage II hangs at 0 rows)."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def read_cluster_stage(run_dir: Path) -> dict:
    """What one Stage II run found: K, spectrum, sizes, cross-tab and agreement (read before a re-run replaces it)."""
    folder = run_dir / layout.CLUSTER_STAGE
    manifest = json.loads((folder / MANIFEST).read_text())
    summary = manifest["summary"]
    spectrum = json.loads((folder / layout.SPECTRUM_FILE).read_text())
    table = pq.read_table(folder / layout.ASSIGNMENTS_FILE, columns=["cluster", "label"]).to_pydict()
    counts = Counter(zip(table["cluster"], table["label"]))
    crosstab = {f"cluster {k}": {source: counts.get((k, source), 0) for source in SOURCES} for k in range(summary["k"])}
    agreement = summary["agreement"]
    return {
        "k": summary["k"], "k_rule": summary["k_rule"], "val_samples": summary["val_samples"],
        "train_samples": summary["train_samples"], "dim": summary["dim"], "seconds": manifest["seconds"],
        "singular_values": [round(s, 4) for s in spectrum["singular_values"][:SPECTRUM_SHOWN]],
        "centered": spectrum["centered"],
        "gaps": spectrum["gaps"],
        "sizes": summary["sizes"], "crosstab": crosstab,
        "purity": agreement["purity"], "nmi": agreement["nmi"], "ari": agreement["ari"],
    }


def report_cluster(tag: str, found: dict, k_min: int) -> None:
    """JSON lines for one Stage II run; gaps[i] is the relative gap of candidate K = k_min + i (centered or not)."""
    emit({"figure": "k", "run": tag, "k": found["k"], "rule": found["k_rule"], "val_samples": found["val_samples"],
          "train_samples": found["train_samples"], "dim": found["dim"]})
    gaps = {str(k_min + i): round(g, 4) for i, g in enumerate(found["gaps"])}
    emit({"figure": "spectrum", "run": tag, "centered": found["centered"],
          "singular_values": found["singular_values"], "relative_gap_by_k": gaps})
    emit({"figure": "clusters", "run": tag, "sizes": found["sizes"], "crosstab": found["crosstab"]})
    emit({"figure": "agreement", "run": tag, "purity": round(found["purity"], 4), "nmi": round(found["nmi"], 4),
          "ari": round(found["ari"], 4)})


def run_evaluation(cfg) -> dict:
    """Experts, router and the evaluate stage on the current clustering; JSON lines and the comparison."""
    manifests = run_stages(cfg, "evaluate")
    emit({"figure": "stages", "run": "evaluate",
          "seconds": {name: manifests[name]["seconds"] for name in ("experts", "router", "evaluate")}})
    experts = manifests["experts"]["summary"]["experts"]
    emit({"figure": "experts", "steps": [e["steps"] for e in experts], "train_samples": [e["train_samples"] for e in experts],
          "eval_loss": [e["eval_loss_end"] for e in experts]})
    summary = manifests["evaluate"]["summary"]
    per_source = {method: {"loss": round(result["loss"], 4), **{s: round(v, 4) for s, v in result["per_source"].items()}}
                  for method, result in summary["methods"].items()}
    against_single = [c for c in summary["comparisons"] if c["against"] == "single_lora" and c["metric"] == "loss"]
    beats = [c["source"] for c in against_single if c["routed_better"]]
    verdicts = {c["source"]: c["verdict"] for c in against_single}
    emit({"figure": "evaluation", "loss_per_token": per_source, "router_accuracy": summary["router_accuracy"],
          "router_holdout_accuracy": manifests["router"]["summary"]["accuracy"],
          "routed_beats_single_lora_on": beats, "verdict_against_single_lora": verdicts,
          "training_steps": summary["training_steps"]})
    return {"routed_beats_single_lora_on": beats, "verdict_against_single_lora": verdicts,
            "sources": summary["sources"], "router_accuracy": summary["router_accuracy"], "loss_per_token": per_source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 rows per source, 10 warm-up steps: a smoke run")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--run-dir", type=Path, default=None, help="default runs/real-mix (runs/real-mix-quick with --quick)")
    parser.add_argument("--per-source", type=int, default=None, help="rows per source (default 300, 60 with --quick)")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed of the mix")
    parser.add_argument("--config", default="demo", choices=["demo", "gpu"],
                        help="preset: demo (2 CPU cores, a local Ray of RAY_CPUS) or gpu (Ray takes the machine's CPUs and GPUs)")
    parser.add_argument("--evaluate", action="store_true",
                        help="continue the automatic-K run through experts, router and evaluate")
    parser.add_argument("--no-k3", action="store_true", help="skip the Stage II re-run with cluster.k=3")
    parser.add_argument("overrides", nargs="*", help="config overrides section.field=value, applied last")
    args = parser.parse_args()

    mode = "quick" if args.quick else "full"
    per_source = args.per_source or PER_SOURCE[mode]
    run_dir = (args.run_dir or ROOT / "runs" / ("real-mix-quick" if args.quick else "real-mix")).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)

    rows = build_mix(args.datasets, per_source, args.seed)
    mix_path = write_mix(run_dir, rows)
    emit({"figure": "mix", "mode": mode, "smoke_run": args.quick, "per_source": per_source, "seed": args.seed,
          "path": str(mix_path), "rows": dict(Counter(row["domain"] for row in rows)), "total": len(rows)})

    on_cpu = args.config == "demo"
    base = [f"run.run_dir={run_dir}", f"data.paths=[{mix_path}]",
            *([f"grads.num_cpus_per_actor={GRAD_ACTOR_CPUS}"] if on_cpu else []), *REAL_MIX_OVERRIDES]
    if args.quick:
        base.append(f"warmup.max_steps={QUICK_WARMUP_STEPS}")
    cfg = load_config(args.config, [*base, *args.overrides])
    emit({"figure": "config", "preset": args.config, "overrides": [*base, *args.overrides], "model": cfg.model.name,
          "lora_r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules), "warmup_steps": cfg.warmup.max_steps,
          "cluster_center": cfg.cluster.center})

    # With the dashboard: it serves the state API that Ray Train's placement-group cleaner polls,
    # which otherwise logs a warning every few seconds.
    ray.init(num_cpus=RAY_CPUS if on_cpu else None, logging_level=logging.WARNING)
    try:
        started = time.time()
        manifests = run_stages(cfg, "cluster")
        auto_wall = time.time() - started
        splits = manifests["data"]["summary"]["rows"]
        warm = manifests["warmup"]["summary"]
        emit({"figure": "stages", "run": "auto", "seconds": {name: m["seconds"] for name, m in manifests.items()},
              "wall_seconds": round(auto_wall, 1), "splits": splits,
              "warmup": {"steps": warm["step"], "eval_loss_base": warm["eval_loss_start"], "eval_loss_end": warm["eval_loss_end"]}})
        auto = read_cluster_stage(run_dir)
        report_cluster("auto", auto, cfg.cluster.k_min)

        evaluation = run_evaluation(cfg) if args.evaluate else None
        if cfg.cluster.k == 3 or args.no_k3:
            fixed = auto
        else:
            cfg3 = load_config(args.config, [*base, *args.overrides, "cluster.k=3"])
            started = time.time()
            manifests3 = run_stages(cfg3, "cluster", force=True)
            emit({"figure": "stages", "run": "k3", "seconds": {name: m["seconds"] for name, m in manifests3.items()},
                  "wall_seconds": round(time.time() - started, 1),
                  "reused": [name for name in ("data", "warmup") if manifests3[name]["digest"] == manifests[name]["digest"]]})
            fixed = read_cluster_stage(run_dir)
            report_cluster("k3", fixed, cfg3.cluster.k_min)
    finally:
        ray.shutdown()

    emit({"summary": True, "mode": mode, "smoke_run": args.quick, "samples": auto["train_samples"],
          "mix": dict(Counter(row["domain"] for row in rows)), "warmup_steps": cfg.warmup.max_steps,
          "overrides": args.overrides,
          "k": auto["k"], "purity": round(auto["purity"], 4), "nmi": round(auto["nmi"], 4), "ari": round(auto["ari"], 4),
          # None when the K = 3 re-run was skipped (--no-k3), rather than a copy of the automatic run.
          "k3": None if args.no_k3 and cfg.cluster.k != 3 else
          {"purity": round(fixed["purity"], 4), "nmi": round(fixed["nmi"], 4), "ari": round(fixed["ari"], 4)},
          "stage_seconds": {name: m["seconds"] for name, m in manifests.items()},
          "target_purity": 0.9, "evaluation": evaluation})


if __name__ == "__main__":
    main()

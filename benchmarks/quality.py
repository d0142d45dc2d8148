"""Quality benchmark: GradientSpace against its baselines on the real data mix, end to end.

Run from the repository root:

    .venv/bin/python benchmarks/quality.py [--config demo|gpu|tiny|FILE] [--datasets ../shared/datasets]
        [--mix real|builtin|FAMILY] [--run-dir DIR] [--per-source N] [--held-out-per-source M] [--seed S] [--quick]
        [section.field=value ...]

1. Builds the real mix (GSM8K + MBPP + Alpaca seed tasks, N rows per source, with
   `gs_ray.data.mixes.build_mix`, as benchmarks/real_mix.py does) into the run dir, or uses
   the package's built-in mix (`--mix builtin`: GSM8K, MBPP, string tasks), or a planted-skill
   family of gs_ray.data.planted (`--mix topic_heavy` etc.: N rows per skill, the skill as the
   source, every answer checked whole: evaluate.answer_check=text). With
   --held-out-per-source M, also M rows per source from outside the mix as held-out-only data
   (data.eval_paths): the same training, more rows to score, so that each source's interval
   is narrower.
2. Runs the pipeline (data, warm-up, Stage II, experts, router) and `gs-ray evaluate`:
   the analysis stage, the embedding and random-projection baselines (their own clusters,
   experts and router, same K and step budget), the one-LoRA baseline, every method on the
   held-out split (loss per token, GSM8K exact match), the diagnostics, and
   report/report.md with its PNGs. Finished stages are skipped on a re-run.
3. Prints JSON lines (mix, config, stage seconds, one line per method, diagnostics) and a
   final {"summary": true, ...} line naming, per method, the mean held-out loss and the
   exact match per source, and per source routed minus the one LoRA's loss with its 95%
   interval and verdict; writes the same summary to <run-dir>/quality.json.

--quick: a smoke run whose figures mean nothing: 40 rows per source, short generation
(QUICK_OVERRIDES). With `--config tiny` (a random two-layer model) it finishes in about 5
minutes on 2 CPU cores. Overrides given on the command line are applied last.

The full benchmark on 2 CPU cores (SmolLM2-135M, 150 rows per source, the demo preset's
evaluation sizes; under an hour, see benchmarks/RESULTS.md):

    python benchmarks/quality.py --run-dir runs/quality-cpu

and a larger one on a GPU machine:

    python benchmarks/quality.py --config gpu --datasets ../shared/datasets --run-dir runs/quality-gpu --per-source 300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import ray

from gs_ray.config import load_config
from gs_ray.data.mixes import HELD_OUT_FILE, SEED, build_held_out, build_mix, write_mix
from gs_ray.data.planted import FAMILIES, make_family
from gs_ray.evaluation.evaluate import routed_loses_to
from gs_ray.evaluation.stages import run_evaluation

ROOT = Path(__file__).resolve().parent.parent
# Set before Ray starts, so its workers inherit them (the driver itself only loads local model folders).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GS_RAY_CACHE", str(ROOT / ".cache" / "test-models"))

PER_SOURCE = {"quick": 40, "full": 150}
"""Rows per source: --quick, and the full run sized for an hour on 2 CPU cores with the demo preset."""
SPLIT_OVERRIDES = ("data.sample_fraction=1.0", "data.warmup_fraction=0.15", "data.val_fraction=0.1",
                   "data.eval_fraction=0.15")
"""For a mix built here: the whole mix, a warm-up split of a few dozen samples per source, and 15% held out
so that each source has enough held-out samples for per-source figures."""
QUICK_OVERRIDES = ("evaluate.max_new_tokens=8", "evaluate.exact_match_samples=4", "evaluate.cosine_pairs=200",
                   "baselines.projection_dim=256")
"""A smoke run: few, short answers and a small projection; figures mean nothing."""
PLANTED_OVERRIDES = ("evaluate.answer_check=text", "evaluate.max_new_tokens=12", "evaluate.exact_match_samples=10000")
"""A planted mix: every held-out answer is short and checkable whole, so all of them are generated."""
LOCAL_RAY_CPUS = 4
"""Logical CPUs of a local Ray without a GPU preset: Train workers, the gradient actor and Ray Data tasks on 2 cores."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="preset (demo, gpu, tiny) or YAML file; default demo")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets",
                        help="folder with gsm8k_train.jsonl, mbpp_train.jsonl, alpaca_seed_tasks.jsonl")
    parser.add_argument("--mix", choices=("real", "builtin", *FAMILIES), default="real",
                        help="real: build the mix from --datasets; builtin: the package's own mix; a planted-skill "
                             "family (gs_ray.data.planted), per skill N rows and exact match of the whole answer")
    parser.add_argument("--run-dir", type=Path, default=None, help="default runs/quality (runs/quality-quick with --quick)")
    parser.add_argument("--per-source", type=int, default=None, help="rows per source (default 150, 40 with --quick)")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed of the mix")
    parser.add_argument("--held-out-per-source", type=int, default=0,
                        help="rows per source from outside the mix added to the eval split only (data.eval_paths): "
                             "training is unchanged, the per-source intervals narrow (beside a 150-row mix the Alpaca "
                             "seed tasks have 3 rows left)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small mix, short generation")
    parser.add_argument("overrides", nargs="*", help="config overrides section.field=value, applied last")
    args = parser.parse_args(argv)
    if args.held_out_per_source < 0:
        parser.error(f"--held-out-per-source must be >= 0, got {args.held_out_per_source}")
    if args.held_out_per_source and args.mix != "real":
        parser.error("--held-out-per-source draws from --datasets' sources: it needs --mix real")
    return args


def data_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """Overrides that point the config at the mix (nothing for the built-in mix: the preset's data section holds)."""
    if args.mix == "builtin":
        return []
    per_source = args.per_source or PER_SOURCE["quick" if args.quick else "full"]
    if args.mix in FAMILIES:
        return planted_overrides(args.mix, per_source, args.seed, run_dir)
    rows = build_mix(args.datasets, per_source, args.seed)
    mix_path = write_mix(run_dir, rows)
    emit({"figure": "mix", "per_source": per_source, "seed": args.seed, "path": str(mix_path),
          "rows": dict(Counter(row["domain"] for row in rows)), "total": len(rows)})
    if not args.held_out_per_source:
        return [f"data.paths=[{mix_path}]", *SPLIT_OVERRIDES]
    held_out = build_held_out(args.datasets, rows, args.held_out_per_source, args.seed)
    held_out_path = write_mix(run_dir, held_out, HELD_OUT_FILE)
    emit({"figure": "held_out", "per_source": args.held_out_per_source, "path": str(held_out_path),
          "rows": dict(Counter(row["domain"] for row in held_out)), "total": len(held_out)})
    return [f"data.paths=[{mix_path}]", f"data.eval_paths=[{held_out_path}]", *SPLIT_OVERRIDES]


def planted_overrides(family: str, per_skill: int, seed: int, run_dir: Path) -> list[str]:
    """Write a planted-skill mix (the skill as `domain`, the source label) and point the config at it.

    A generator may draw the same row twice (a short list of numbers or words): the copy is dropped, so
    that no held-out row is also a training row."""
    drawn = make_family(family, per_skill, seed)
    rows = {(row["instruction"], row["output"]): {"instruction": row["instruction"], "output": row["output"],
                                                  "domain": row["skill"], "topic": row["topic"]} for row in drawn}
    mix_path = write_mix(run_dir, list(rows.values()), f"{family}_mix.jsonl")
    emit({"figure": "mix", "family": family, "per_skill": per_skill, "seed": seed, "path": str(mix_path),
          "rows": dict(Counter(row["domain"] for row in rows.values())), "total": len(rows),
          "duplicates_dropped": len(drawn) - len(rows)})
    return [f"data.paths=[{mix_path}]", *SPLIT_OVERRIDES, *PLANTED_OVERRIDES]


def summary_line(evaluation: dict, manifests: dict, args: argparse.Namespace, seconds: float) -> dict:
    """Per method: mean held-out loss and exact match per source; plus the diagnostics' headline figures."""
    methods = {method: {"loss": round(result["loss"], 4),
                        "exact_match": {s: round(v, 4) for s, v in result["exact_match_per_source"].items()}}
               for method, result in evaluation["methods"].items()}
    clusterings = evaluation["diagnostics"]["clusterings"]
    return {
        "summary": True, "smoke_run": args.quick, "config": args.config, "mix": args.mix,
        "held_out_per_source": args.held_out_per_source, "eval_samples": evaluation["eval_samples"],
        "methods": methods, "router_accuracy": evaluation["router_accuracy"],
        "nmi": {name: round(found["agreement"]["nmi"], 4) for name, found in clusterings.items()
                if found.get("agreement")},
        "variance_ratio_normalized": {name: round(found["variance_ratio_normalized"], 4)
                                      for name, found in clusterings.items()},
        "routed_loses_to": routed_loses_to(evaluation["comparisons"]),
        "routed_vs_single_lora": {c["source"]: {"difference": round(c["difference"], 4), "verdict": c["verdict"],
                                                "interval": [round(end, 4) for end in c["interval"]]}
                                  for c in evaluation["comparisons"]
                                  if c["against"] == "single_lora" and c["metric"] == "loss"},
        "stage_seconds": {name: manifest["seconds"] for name, manifest in manifests.items()},
        "wall_seconds": round(seconds, 1), "report": str(Path(manifests["report"]["summary"]["report"])),
    }


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def quality_config(args: argparse.Namespace, run_dir: Path):
    """(Config, overrides) of a quality run: the preset, the mix, the smoke settings with --quick, then args.overrides."""
    overrides = [f"run.run_dir={run_dir}", *data_overrides(args, run_dir), *(QUICK_OVERRIDES if args.quick else ()),
                 *args.overrides]
    return load_config(args.config, overrides), overrides


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run_dir = (args.run_dir or ROOT / "runs" / ("quality-quick" if args.quick else "quality")).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)

    cfg, overrides = quality_config(args, run_dir)
    emit({"figure": "config", "preset": args.config, "overrides": overrides, "model": cfg.model.name,
          "lora_r": cfg.lora.r, "warmup_steps": cfg.warmup.max_steps, "expert_steps": cfg.experts.max_steps})
    started_ray = not ray.is_initialized()
    if started_ray:
        # A cluster to join (RAY_ADDRESS) brings its own resources; a local one gets LOCAL_RAY_CPUS.
        joining = bool(os.environ.get("RAY_ADDRESS"))
        resources = {} if cfg.train.use_gpu or joining else {"num_cpus": LOCAL_RAY_CPUS}
        # With the dashboard: it serves the state API that Ray Train's placement-group cleaner polls,
        # which otherwise logs a warning every few seconds.
        ray.init(logging_level=logging.WARNING, **resources)
    try:
        started = time.time()
        manifests = run_evaluation(cfg)
    finally:
        if started_ray:
            ray.shutdown()
    evaluation = manifests["evaluate"]["summary"]
    for method, result in evaluation["methods"].items():
        emit({"figure": "method", "method": method, "loss": result["loss"], "per_source": result["per_source"],
              "exact_match": result["exact_match"], "exact_match_per_source": result["exact_match_per_source"]})
    emit({"figure": "diagnostics", **evaluation["diagnostics"]})
    summary = summary_line(evaluation, manifests, args, time.time() - started)
    summary["report"] = str(run_dir / summary["report"])
    write_json(run_dir / "quality.json", summary)
    emit(summary)
    return summary


if __name__ == "__main__":
    main()

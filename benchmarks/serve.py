"""Serving latency and load on a live local deployment: routed vs one LoRA vs the ensemble.

Run from the repository root:  .venv/bin/python benchmarks/serve.py [--quick] [--run-dir DIR]

Setup (not timed): a local Ray cluster (RAY_CPUS logical CPUs), the run to serve (--run-dir,
e.g. runs/demo once `make demo` has finished; without it, a tiny run is built in a temporary
folder: the tiny preset on every third row of the built-in mix, K=2), the app deployed with
`gs_ray.serve.start` (HTTP on a free local port) and a few warm-up requests per model, so
that adapters are loaded before any clock starts.

Timed, over real HTTP with greedy decoding and `ignore_eos` so every reply is exactly
--max-tokens tokens long (the same decoding work whatever the model picks):
  - latency: --rounds rounds; each round sends every prompt once to `gs-ray` (routed),
    once to `gs-ray:expert-<k>` with k the expert the router picks for that prompt (one
    LoRA, no router), and once to `gs-ray:ensemble`, one request at a time, the order of
    the three rotating per round. router_overhead = median routed / median single;
    ensemble_over_routed = median ensemble / median routed (target >= 0.8 x K: routing
    saves about K-fold over the ensemble's K forward passes per token). The router costs
    one encoder pass per request, decoding costs one pass per token: router_overhead
    shrinks with longer replies and larger models, so it is reported with its absolute
    part (router_s = median routed - median single) and the reply length.
  - load: --requests routed requests from --clients concurrent clients (threads), prompts
    cycling; errors (non-200 answers or exceptions), p50 and p99 latency, requests/s, and
    the mean number of requests per decoded batch (from the replica's `batch_stats`).
Prints one JSON line per figure, the last a summary (`"summary": true`) with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray

from gs_ray.config import load_config
from gs_ray.core.rundir import RunDir
from gs_ray.data.inputs import BUILTIN_MIX
from gs_ray.stages.pipeline import run_stages

ROOT = Path(__file__).resolve().parent.parent
# Set before Ray starts, so its workers inherit them (the driver itself only loads local model folders).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GS_RAY_CACHE", str(ROOT / ".cache" / "test-models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RAY_CPUS = 4
"""Logical CPUs on 2 cores: building the tiny run runs two expert jobs at once, serving needs 1.5."""
TINY_ROW_STRIDE = 3
"""The built tiny run reads every third row of the built-in mix (all three domains, a third of the cost)."""
TINY_OVERRIDES = ("warmup.max_steps=10", "cluster.k=2", "cluster.cache_size=8", "experts.budget=fixed",
                  "experts.max_steps=8", "experts.min_cluster_size=1", "experts.cpus_per_worker=1", "router.epochs=10")
PROMPTS = 4
"""Distinct prompts (from the run's eval split) used by the latency and load runs."""
WARMUP_REQUESTS = 2
"""Untimed requests per model and prompt before measuring."""
SERVE_OVERRIDES = ("serve.num_replicas=1", "serve.autoscale_max_replicas=0")
"""One expert replica: the figures are per replica, and its batch statistics are read from it."""
TARGETS = {"router_overhead_max": 1.15, "ensemble_over_routed_min_per_expert": 0.8, "errors": 0}
FULL = {"rounds": 15, "requests": 256, "clients": 16, "max_tokens": 64}
QUICK = {"rounds": 5, "requests": 64, "clients": 16, "max_tokens": 32}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_run(folder: Path) -> Path:
    """A finished tiny run (data ... router) on a slice of the built-in mix."""
    rows = Path(BUILTIN_MIX).read_text().splitlines()[::TINY_ROW_STRIDE]
    data = folder / "mix.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run_dir = folder / "run"
    run_stages(load_config("tiny", [f"run.run_dir={run_dir}", f"data.paths=[{data}]", *TINY_OVERRIDES]), "router")
    return run_dir


def eval_prompts(run_dir: Path, count: int) -> list[str]:
    """The first user turns of the eval split (sorted by sample id, so the same every run)."""
    import pyarrow.dataset

    table = pyarrow.dataset.dataset(str(RunDir(run_dir).stage_dir("data") / "eval"), format="parquet").to_table(
        columns=["sample_id", "messages"]).sort_by("sample_id")
    users = [next(m["content"] for m in json.loads(raw) if m["role"] == "user") for raw in table["messages"].to_pylist()]
    return users[:count]


def timed_chat(url: str, text: str, model: str, max_tokens: int) -> tuple[float, dict]:
    from gs_ray.serving.client import chat

    started = time.perf_counter()
    answer = chat(url, text, model=model, max_tokens=max_tokens, ignore_eos=True)
    return time.perf_counter() - started, answer


def latency(url: str, prompts: list[str], experts: list[int], rounds: int, max_tokens: int) -> dict[str, list[float]]:
    """Seconds per request for routed, single (the routed expert by name) and ensemble, interleaved."""
    kinds = ["routed", "single", "ensemble"]
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for text, expert in zip(prompts, experts):
            for kind in order:
                model = {"routed": "gs-ray", "single": f"gs-ray:expert-{expert}", "ensemble": "gs-ray:ensemble"}[kind]
                elapsed, answer = timed_chat(url, text, model, max_tokens)
                assert answer["usage"]["completion_tokens"] == max_tokens, answer["usage"]
                seconds[kind].append(elapsed)
    return seconds


def batch_stats() -> dict[int, int]:
    """Batches decoded per batch size by the (single, see SERVE_OVERRIDES) expert replica."""
    from ray import serve

    from gs_ray.serving.app import APP_NAME

    return serve.get_deployment_handle("Expert", app_name=APP_NAME).batch_stats.remote().result()


def load_run(url: str, prompts: list[str], requests: int, clients: int, max_tokens: int) -> dict:
    """A fixed number of routed requests from `clients` concurrent threads; also the batch sizes they got."""
    def one(i: int) -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            timed_chat(url, prompts[i % len(prompts)], "gs-ray", max_tokens)
            return time.perf_counter() - started, True
        except Exception as exc:  # an error is a figure here, not a crash
            print(f"request {i} failed: {exc!r}", file=sys.stderr)
            return time.perf_counter() - started, False

    before = batch_stats()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    batches = {size: count - before.get(size, 0) for size, count in batch_stats().items()}
    decoded = sum(size * count for size, count in batches.items())
    seconds = [s for s, ok in results if ok]
    return {"figure": "load", "requests": requests, "clients": clients, "max_tokens": max_tokens,
            "errors": sum(not ok for _, ok in results),
            "p50_s": round(float(np.percentile(seconds, 50)), 4) if seconds else None,
            "p99_s": round(float(np.percentile(seconds, 99)), 4) if seconds else None,
            "requests_per_s": round(requests / wall, 2), "wall_s": round(wall, 1),
            "mean_batch_size": round(decoded / max(1, sum(batches.values())), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (about 5 minutes on 2 cores)")
    parser.add_argument("--run-dir", default=None, help="finished run to serve; default: build a tiny one")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value} ({QUICK[name]} with --quick)")
    args = parser.parse_args()
    sizes = {name: getattr(args, name) or (QUICK if args.quick else FULL)[name] for name in FULL}

    from ray import serve

    from gs_ray.serving.app import finished_run_experts, load_run_config, start

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gs-ray-serve-bench-") as tmp:
        run_dir = Path(args.run_dir).absolute() if args.run_dir else build_tiny_run(Path(tmp))
        k = finished_run_experts(run_dir)
        cfg = load_run_config(run_dir, None, [*SERVE_OVERRIDES, f"serve.port={_free_port()}"])
        url = start(cfg, quiet=True)
        emit({"figure": "setup", "run_dir": str(run_dir), "model": cfg.model.name, "experts": k,
              "setup_s": round(time.perf_counter() - started, 1), **sizes})
        try:
            prompts = eval_prompts(run_dir, PROMPTS)
            experts = []
            for text in prompts:
                for model in ("gs-ray", "gs-ray:ensemble", "base") * WARMUP_REQUESTS:
                    _, answer = timed_chat(url, text, model, sizes["max_tokens"])
                    if model == "gs-ray":
                        expert = answer["gs_ray"]["expert"]
                timed_chat(url, text, f"gs-ray:expert-{expert}", sizes["max_tokens"])
                experts.append(expert)
            seconds = latency(url, prompts, experts, sizes["rounds"], sizes["max_tokens"])
            medians = {kind: statistics.median(values) for kind, values in seconds.items()}
            for kind, values in seconds.items():
                emit({"figure": "latency", "kind": kind, "requests": len(values), "median_s": round(medians[kind], 4),
                      "p90_s": round(float(np.percentile(values, 90)), 4)})
            load = load_run(url, prompts, sizes["requests"], sizes["clients"], sizes["max_tokens"])
            emit(load)
        finally:
            serve.shutdown()
    router_overhead = medians["routed"] / medians["single"]
    ensemble_over_routed = medians["ensemble"] / medians["routed"]
    emit({"summary": True, "run_dir": str(run_dir) if args.run_dir else "tiny (built)", "model": cfg.model.name,
          "experts": k, "quick": args.quick, "router_overhead": round(router_overhead, 3),
          "ensemble_over_routed": round(ensemble_over_routed, 3),
          "router_s": round(medians["routed"] - medians["single"], 4), "max_tokens": sizes["max_tokens"], "errors": load["errors"], "p50_s": load["p50_s"],
          "p99_s": load["p99_s"], "requests_per_s": load["requests_per_s"], "clients": load["clients"],
          "targets_met": {"router_overhead": router_overhead <= TARGETS["router_overhead_max"],
                          "ensemble_over_routed": ensemble_over_routed >= TARGETS["ensemble_over_routed_min_per_expert"] * k,
                          "errors": load["errors"] == TARGETS["errors"]},
          "total_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()

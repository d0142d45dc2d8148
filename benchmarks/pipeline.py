"""Stage II through Ray Data on a local Ray cluster against the same work in one plain process.

Run from the repository root:  .venv/bin/python benchmarks/pipeline.py [--quick]

Setup (not timed): `ray.init(num_cpus=3)` (logical CPUs on 2 cores; see RAY_CPUS), a fresh
run directory with the tiny preset
(--quick) or the demo preset (SmolLM2-135M, warm-up cut to --warmup-steps, the default
without --quick), `run_stages(cfg, "warmup")` for data/ and warmup/adapter, then
`fit_on_validation` for K and the initial centroids. --max-train-rows bounds the training
split (a sorted prefix written to a scratch data dir that both sides read).

Timed, on the same training rows, from the same fitted clusterer state:
  - ray:   `assign_split(cfg, <data>/train, adapter_dir, actor, "stream")` with a fresh
           `ClusterActor` (started and ready before the clock starts), grads.concurrency=1,
           grads.num_cpus_per_actor=2. End to end: actor-pool startup (process start, imports,
           model + adapter load), cutting the split into blocks, gradients, clustering,
           collection and the final sort.
  - plain: the same work in the driver, no Ray: model + adapter + tokenizer load (counted, to
           match the actor's startup; the driver's imports are already done and not counted),
           the split cut into the same length-sorted blocks as the Ray side (so both pad the
           same batches), batches of grads.batch_size, `PerSampleGradients` ->
           `GradientFeatures` -> `nearest_centroids` -> `ClusterCaches.add` -> `apply_summary`
           on a local `OnlineSVDClusterer` loaded from the same state; torch.set_num_threads(2).
Steady state: the time at which each block of output reaches the driver is recorded (by
wrapping `gradient_stream._gradient_pass`, which `assign_split` calls); the steady
rate is the rows after the first block over the time after it, and the plain side's rate is
taken the same way over the same row count.

Each repeat runs both sides (alternating which goes first); --quick runs one repeat.
Prints one JSON line per repeat, a `trivial` line (the same Ray Data plan with an identity
actor: Ray Data's own startup and transfer cost), a `probe` line (a fresh Ray worker's import
and model-load seconds, and its torch thread count), then a summary line (`"summary": true`) with
ray_efficiency = plain seconds / Ray seconds summed over the repeats (end to end; target
>= 0.85), ray_efficiency_steady, both timings and samples/s, the sample counts, and the
fraction of samples both sides put in the same cluster. Both sides see the same batches in the
same order; assignments can still differ where the Ray side's centroid replica is a batch
behind the actor.

--run-dir keeps the setup stages (data, warm-up) in a folder that later runs reuse; without
it they are built in a scratch folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from gs_ray.config import load_config
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split, pad_batch
from gs_ray.gradientspace import stream as gradient_stream
from gs_ray.gradientspace.actor import ClusterActor
from gs_ray.gradientspace.caches import ClusterCaches
from gs_ray.gradientspace.cluster import OnlineSVDClusterer, nearest_centroids
from gs_ray.stages.pipeline import run_stages

ROOT = Path(__file__).resolve().parent.parent
# Set before Ray starts, so its workers inherit them (the driver itself only loads local model folders).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GS_RAY_CACHE", str(ROOT / ".cache" / "test-models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RAY_CPUS = 3
"""Logical CPUs of the local cluster (2 physical cores): the gradient actor holds 2 (so torch takes 2
threads, as on the plain side), and one more leaves room for the setup stages' Ray Data tasks."""
TORCH_THREADS = 2


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class _BlockClock:
    """Wraps gradient_stream._gradient_pass: (seconds since start, rows) of each output block."""

    def __init__(self):
        self.original = gradient_stream._gradient_pass
        self.start = 0.0
        self.marks: list[tuple[float, int]] = []

    def __enter__(self):
        def timed_pass(*args, **kwargs):
            for batch in self.original(*args, **kwargs):
                self.marks.append((time.perf_counter() - self.start, batch.num_rows))
                yield batch

        gradient_stream._gradient_pass = timed_pass
        return self

    def __exit__(self, *exc):
        gradient_stream._gradient_pass = self.original


def _steady(marks: list[tuple[float, int]]) -> tuple[int, float, float] | None:
    """(rows in the first block, seconds to it, seconds of the remaining rows), None if one block."""
    marks = [(t, n) for t, n in marks if n]
    if len(marks) < 2:
        return None
    return marks[0][1], marks[0][0], marks[-1][0] - marks[0][0]


def prepare(args, tmp: Path):
    """Config, data dir, adapter dir and the fitted clusterer's state (nothing here is timed)."""
    preset = "tiny" if args.quick else args.preset
    overrides = [f"run.run_dir={args.run_dir or tmp / 'run'}", "grads.concurrency=1", f"grads.num_cpus_per_actor={TORCH_THREADS}"]
    if args.warmup_steps:
        overrides.append(f"warmup.max_steps={args.warmup_steps}")
    if args.batch_size:
        overrides.append(f"grads.batch_size={args.batch_size}")
    cfg = load_config(preset, overrides + list(args.set or []))
    started = time.perf_counter()
    run_stages(cfg, "warmup")
    run = RunDir(cfg.run.run_dir)
    data_dir, adapter_dir = run.stage_dir(layout.DATA_STAGE), str(run.stage_dir(layout.WARMUP_STAGE) / layout.ADAPTER_DIRNAME)
    if args.max_train_rows:
        rows = load_split(str(data_dir / "train"))[: args.max_train_rows]
        bounded = tmp / "bounded-data"
        (bounded / "train").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), bounded / "train" / "part-0.parquet")
        (bounded / "val").symlink_to(data_dir / "val")
        data_dir = bounded
    with gradient_stream.ordered_execution():
        clusterer, fit = gradient_stream.fit_on_validation(cfg, str(data_dir), adapter_dir, tmp)
    setup = {"preset": preset, "model": cfg.model.name, "setup_s": round(time.perf_counter() - started, 1),
             "k": fit["k"], "dim": clusterer.dim, "val_samples": fit["val_samples"]}
    return cfg, data_dir, adapter_dir, clusterer.state_dict(), setup


def _stream(cfg, data_dir: Path, adapter_dir: str, actor):
    """The training split's stream pass, as Stage II runs it."""
    return gradient_stream.assign_split(cfg, str(data_dir / "train"), adapter_dir, actor, "stream")[0]


def time_ray(cfg, data_dir: Path, adapter_dir: str, state: dict) -> dict:
    actor = (
        ray.remote(ClusterActor)
        .options(num_cpus=0, max_restarts=gradient_stream.ACTOR_MAX_RESTARTS,
                 max_task_retries=gradient_stream.ACTOR_MAX_RESTARTS)
        .remote(cfg.cluster, state)
    )
    ray.get(actor.state_dict.remote())  # the actor is up before the clock starts
    with gradient_stream.ordered_execution(), _BlockClock() as clock:
        clock.start = time.perf_counter()
        table = _stream(cfg, data_dir, adapter_dir, actor)
        seconds = time.perf_counter() - clock.start
    final = ray.get(actor.state_dict.remote())
    ray.kill(actor)
    return {"seconds": seconds, "marks": clock.marks, "ids": table["sample_id"].to_pylist(),
            "clusters": np.asarray(table["cluster"]), "updates": int(np.sum(final["updates"]))}


def _rows_in_stream_order(split: str, batch_size: int) -> list[dict]:
    """The split's rows in the order the Ray side's actor sees them: file by file, in windows of
    the same size, each sorted by length by the same function, without Ray, so both sides pad
    the same batches."""
    rows_per_block = batch_size * gradient_stream.BATCHES_PER_BLOCK
    table = pa.concat_tables([pq.read_table(part) for part in sorted(Path(split).glob("*.parquet"))])
    windows = (table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block))
    return [row for window in windows for row in gradient_stream._sorted_by_length(window).to_pylist()]


def time_plain(cfg, data_dir: Path, adapter_dir: str, state: dict) -> dict:
    import torch

    from gs_ray.gradientspace.grads import PerSampleGradients
    from gs_ray.modeling.models import load_adapter, load_base_model, load_tokenizer

    torch.set_num_threads(TORCH_THREADS)
    started = time.perf_counter()
    model = load_adapter(load_base_model(cfg.model), adapter_dir)
    gradients = PerSampleGradients(model)
    pad_id = load_tokenizer(cfg.model).pad_token_id or 0
    load_s = time.perf_counter() - started
    clusterer = OnlineSVDClusterer(cfg.cluster, seed=int(state["seed"]))
    clusterer.load_state_dict(state)
    caches = ClusterCaches(clusterer.k, cfg.cluster.cache_size, clusterer.dim)
    rows = _rows_in_stream_order(str(data_dir / "train"), cfg.grads.batch_size)
    size = cfg.grads.batch_size
    clusters, marks = [], []
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        grads = gradients(pad_batch(batch, pad_id)).cpu().numpy()
        features = clusterer.features(grads)
        assigned, _ = nearest_centroids(features, clusterer.centroids)
        for k, vector in caches.add(assigned, features):
            clusterer.apply_summary(k, vector)
        clusters.append(assigned)
        marks.append((time.perf_counter() - started, len(batch)))
    seconds = time.perf_counter() - started
    del model, gradients
    by_id = np.argsort([row["sample_id"] for row in rows], kind="stable")  # the Ray side's output order
    return {"seconds": seconds, "load_s": load_s, "marks": marks, "ids": [rows[i]["sample_id"] for i in by_id],
            "clusters": np.concatenate(clusters)[by_id], "updates": int(clusterer.updates.sum())}


def _plain_steady(marks: list[tuple[float, int]], skip_rows: int) -> tuple[float, float]:
    """(seconds to the first skip_rows rows, seconds of the rest) of the plain loop."""
    done = 0
    for t, n in marks:
        done += n
        if done >= skip_rows:
            return t, marks[-1][0] - t
    return marks[-1][0], 0.0


def compare(ray_run: dict, plain_run: dict) -> dict:
    n_ray, n_plain = len(ray_run["ids"]), len(plain_run["ids"])
    same_ids = ray_run["ids"] == plain_run["ids"]
    record = {
        "train_samples_ray": n_ray, "train_samples_plain": n_plain,
        "counts_equal": n_ray == n_plain, "same_sample_ids": same_ids,
        "assignment_agreement": round(float(np.mean(ray_run["clusters"] == plain_run["clusters"])), 4) if same_ids else None,
        "centroid_updates_ray": ray_run["updates"], "centroid_updates_plain": plain_run["updates"],
        "ray_s": round(ray_run["seconds"], 2), "plain_s": round(plain_run["seconds"], 2),
        "plain_model_load_s": round(plain_run["load_s"], 2),
        "ray_samples_per_s": round(n_ray / ray_run["seconds"], 2),
        "plain_samples_per_s": round(n_plain / plain_run["seconds"], 2),
        "ray_efficiency": round(plain_run["seconds"] / ray_run["seconds"], 3),
    }
    steady = _steady(ray_run["marks"])
    if steady:
        first_rows, ray_first_s, ray_rest_s = steady
        plain_first_s, plain_rest_s = _plain_steady(plain_run["marks"], first_rows)
        rest = n_ray - first_rows
        record |= {
            "blocks": len(ray_run["marks"]), "first_block_rows": first_rows,
            "ray_to_first_block_s": round(ray_first_s, 2), "plain_to_first_block_s": round(plain_first_s, 2),
            "ray_after_first_block_s": round(ray_rest_s, 2), "plain_after_first_block_s": round(plain_rest_s, 2),
            "ray_after_last_block_s": round(ray_run["seconds"] - ray_run["marks"][-1][0], 3),
            "ray_steady_samples_per_s": round(rest / ray_rest_s, 2) if ray_rest_s else None,
            "plain_steady_samples_per_s": round(rest / plain_rest_s, 2) if plain_rest_s else None,
            "ray_efficiency_steady": round(plain_rest_s / ray_rest_s, 3) if ray_rest_s else None,
        }
    return record


class _Identity:
    """A map_batches actor that does nothing: what Ray Data costs without the model."""

    def __call__(self, batch):
        return batch


def time_trivial(cfg, data_dir: Path) -> dict:
    """The stream pass's Ray Data plan (blocks, 1-actor pool, collect, sort) with no work in the actor."""
    grads = cfg.grads
    started = time.perf_counter()
    with gradient_stream.ordered_execution():
        rows_per_block = grads.batch_size * gradient_stream.BATCHES_PER_BLOCK
        blocks = gradient_stream._length_sorted(gradient_stream.split_rows(str(data_dir / "train")), rows_per_block, 1)
        mapped = blocks.map_batches(_Identity, batch_size=grads.batch_size, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=grads.num_cpus_per_actor)
        first, tables = None, []
        for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first if first is not None else time.perf_counter() - started
            tables.append(batch)
        rows = pa.concat_tables(tables).sort_by("sample_id").num_rows
    return {"trivial_pass_s": round(time.perf_counter() - started, 2), "trivial_to_first_block_s": round(first, 2),
            "trivial_rows": rows}


@ray.remote
def _probe(model_cfg: dict, adapter_dir: str) -> dict:
    """In a fresh worker: what GradientWorker's process imports and loads before its first batch."""
    started = time.perf_counter()
    import gs_ray.gradientspace.stream  # noqa: F401  (the actor class's module: ray.data, sklearn, pyarrow)

    module_imported = time.perf_counter()
    import torch

    from gs_ray.config import config_from_dict
    from gs_ray.gradientspace.grads import PerSampleGradients  # noqa: F401
    from gs_ray.modeling.models import load_adapter, load_base_model, load_tokenizer

    imported = time.perf_counter()
    cfg = config_from_dict(model_cfg)
    load_adapter(load_base_model(cfg.model), adapter_dir)
    load_tokenizer(cfg.model)
    loaded = time.perf_counter()
    return {"import_gradient_stream_s": round(module_imported - started, 2),
            "import_torch_models_s": round(imported - module_imported, 2),
            "import_s": round(imported - started, 2), "model_load_s": round(loaded - imported, 2),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (< 5 minutes on 2 busy cores)")
    parser.add_argument("--preset", default="demo", help="preset without --quick (default demo: SmolLM2-135M)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (default: 5 for demo, preset's for tiny)")
    parser.add_argument("--max-train-rows", type=int, default=None, help="bound the training split (default: 256 for demo, all for tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="grads.batch_size (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of both sides (default: 1 quick, 2 full)")
    parser.add_argument("--ray-cpus", type=int, default=RAY_CPUS, help="logical CPUs for ray.init (see RAY_CPUS)")
    parser.add_argument("--set", action="append", help="extra config override key=value (repeatable)")
    parser.add_argument("--run-dir", default="", help="keep the setup stages here and reuse them (default: scratch)")
    args = parser.parse_args()
    if args.quick:
        args.warmup_steps = args.warmup_steps or 10
    else:
        args.warmup_steps = args.warmup_steps or 5
        args.max_train_rows = args.max_train_rows or 256
    repeats = args.repeats or (1 if args.quick else 2)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its scratch dir
    # With the dashboard: it serves the state API that Ray Train's placement-group cleaner polls,
    # which otherwise logs a warning every few seconds.
    ray.init(num_cpus=args.ray_cpus, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="gs-ray-bench-pipeline-"))
    try:
        cfg, data_dir, adapter_dir, state, setup = prepare(args, tmp)
        emit({"figure": "setup", **setup, "batch_size": cfg.grads.batch_size, "cache_size": cfg.cluster.cache_size})
        records = []
        for repeat in range(repeats):
            if repeat % 2 == 0:
                ray_run = time_ray(cfg, data_dir, adapter_dir, state)
                plain_run = time_plain(cfg, data_dir, adapter_dir, state)
            else:
                plain_run = time_plain(cfg, data_dir, adapter_dir, state)
                ray_run = time_ray(cfg, data_dir, adapter_dir, state)
            record = {"figure": "repeat", "repeat": repeat, "ray_first": repeat % 2 == 0} | compare(ray_run, plain_run)
            emit(record)
            records.append(record)
        trivial = time_trivial(cfg, data_dir)
        emit({"figure": "trivial", "what": "same Ray Data plan, identity actor (no torch, no model)", **trivial})
        probe = ray.get(_probe.options(num_cpus=TORCH_THREADS).remote(cfg.to_dict(), adapter_dir))
        emit({"figure": "probe", "what": "fresh Ray worker: import and model+adapter+tokenizer load", **probe})
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    ray_s = sum(r["ray_s"] for r in records)
    plain_s = sum(r["plain_s"] for r in records)
    samples = sum(r["train_samples_ray"] for r in records)
    summary = {
        "summary": True, "preset": setup["preset"], "model": setup["model"], "repeats": repeats,
        "ray_num_cpus": args.ray_cpus,
        "ray_efficiency": round(plain_s / ray_s, 3),
        "ray_s": round(ray_s, 2), "plain_s": round(plain_s, 2),
        "ray_samples_per_s": round(samples / ray_s, 2), "plain_samples_per_s": round(samples / plain_s, 2),
        "train_samples": records[0]["train_samples_ray"],
        "counts_equal": all(r["counts_equal"] and r["same_sample_ids"] for r in records),
        "assignment_agreement": records[0]["assignment_agreement"],
        "plain_includes": "model+adapter+tokenizer load (not imports)",
        "ray_includes": "actor-pool startup (process, imports, model load), blocks, collect, sort",
    }
    if all("ray_efficiency_steady" in r and r["ray_efficiency_steady"] for r in records):
        ray_rest = sum(r["ray_after_first_block_s"] for r in records)
        plain_rest = sum(r["plain_after_first_block_s"] for r in records)
        summary |= {
            "ray_efficiency_steady": round(plain_rest / ray_rest, 3),
            "ray_startup_to_first_block_s": round(statistics.mean(r["ray_to_first_block_s"] for r in records), 2),
            "plain_startup_to_first_block_s": round(statistics.mean(r["plain_to_first_block_s"] for r in records), 2),
        }
    summary |= {"ray_data_trivial_pass_s": trivial["trivial_pass_s"], "ray_worker_import_s": probe["import_s"], "ray_worker_model_load_s": probe["model_load_s"],
                "ray_worker_torch_threads": probe["torch_threads"], "plain_torch_threads": TORCH_THREADS,
                "machine": platform.machine(), "cpus": os.cpu_count()}
    emit(summary)


if __name__ == "__main__":
    main()

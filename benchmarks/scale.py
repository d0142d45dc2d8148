"""Stage II at growing N: driver memory, object-store use and samples/s should stay flat.

Run from the repository root:  .venv/bin/python benchmarks/scale.py [--quick | --full]

Setup (not timed): a local Ray cluster (RAY_CPUS logical CPUs), the tiny preset's data and
warm-up stages on the built-in mix (`run_stages(cfg, "warmup")`), then for each N a generated
data folder: a training split of N rows written as Parquet files of ROWS_PER_FILE rows (the
warm run's tokenized training rows repeated under fresh sample ids: memory follows the tokens,
not what they say), and the warm run's own val and eval splits.

Measured, per N: the whole Stage II (`cluster_training_split`: K and centroids from the
validation rows, the stream pass over the N training rows, the eval split's assignment, the
files), with a sampler thread reading every SAMPLE_S seconds the driver's resident memory
(/proc) and the object store's bytes in use on all nodes (the raylet's store stats, what
`ray memory --stats-only` prints). Prints one JSON line per N (driver_peak_rss_mib over the
stage, object_store_peak_mib, stage_s, samples_per_s = N / stage_s) and a summary line
(`"summary": true`) with the ratios largest N / smallest N; issue 28's targets are peaks
within 1.2x and samples/s not lower.

Sizes: 10k and 100k by default (15 minutes on 2 CPU cores); --quick 2k and 20k (5 minutes);
--full adds 1M (about 2 hours more). The slow test runs two small splits under a small cap.
--set grads.object_store_mib=0 shows what Ray Data does without the cap Stage II sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from gs_ray.config import load_config
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split
from gs_ray.stages.cluster import cluster_training_split
from gs_ray.stages.pipeline import run_stages

RAY_CPUS = 3
"""Logical CPUs on 2 cores: one gradient actor of grads.num_cpus_per_actor=2 plus the zero-CPU reads."""
ROWS_PER_FILE = 2_000
"""What the generated split's files hold: a read task reads one file, so file size, not N, bounds the store."""
SAMPLE_S = 0.5
SIZES = {"default": [10_000, 100_000], "quick": [2_000, 20_000], "full": [10_000, 100_000, 1_000_000]}
OVERRIDES = ["grads.concurrency=1", "grads.num_cpus_per_actor=2", "grads.batch_size=16"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _object_store_mib() -> float:
    # Private API, the one `ray memory --stats-only` uses: Ray has no public call for the store's bytes in use.
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used / 2**20


class PeakSampler:
    """Samples driver RSS and object-store use in a thread while the `with` block runs; keeps the peaks."""

    def __init__(self):
        self.rss = self.store = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.rss, self.store = max(self.rss, _rss_mib()), max(self.store, _object_store_mib())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def write_generated_data(source: Path, n: int, out: Path, rows_per_file: int = ROWS_PER_FILE) -> Path:
    """A data folder whose train split holds n rows (source's train rows repeated, fresh ids), file by file."""
    rows = load_split(str(source / "train"))
    template = pa.Table.from_pylist(rows).select(["input_ids", "labels", "label"])
    (out / "train").mkdir(parents=True)
    for file_index, start in enumerate(range(0, n, rows_per_file)):
        count = min(rows_per_file, n - start)
        picks = pa.array([(start + i) % template.num_rows for i in range(count)])
        part = template.take(picks)
        ids = pa.array([f"scale-{start + i:08d}" for i in range(count)])
        pq.write_table(part.add_column(0, "sample_id", ids), out / "train" / f"part-{file_index:05d}.parquet")
    for split in ("val", "eval"):
        (out / split).symlink_to(source / split)
    return out


def measure(cfg, data_dir: Path, adapter_dir: str, n: int, scratch: Path) -> dict:
    out_dir = scratch / f"cluster-{n}"
    out_dir.mkdir()
    started = time.perf_counter()
    with PeakSampler() as peaks:
        summary = cluster_training_split(cfg, str(data_dir), adapter_dir, out_dir)
    seconds = time.perf_counter() - started
    if summary["train_samples"] != n:
        sys.exit(f"scale: Stage II assigned {summary['train_samples']} of {n} training rows")
    return {"n": n, "stage_s": round(seconds, 1), "samples_per_s": round(n / seconds, 1),
            "driver_peak_rss_mib": round(peaks.rss, 1), "object_store_peak_mib": round(peaks.store, 1),
            "k": summary["k"], "dim": summary["dim"]}


def summarize(records: list[dict]) -> dict:
    small, large = records[0], records[-1]
    return {"summary": True, "n_small": small["n"], "n_large": large["n"],
            "driver_peak_ratio": round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3),
            "object_store_peak_ratio": round(large["object_store_peak_mib"] / max(small["object_store_peak_mib"], 1.0), 3),
            "samples_per_s_ratio": round(large["samples_per_s"] / small["samples_per_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help=f"N = {SIZES['quick']}")
    sizes.add_argument("--full", action="store_true", help=f"N = {SIZES['full']}")
    parser.add_argument("--sizes", type=int, nargs="+", help="explicit N values, smallest first")
    parser.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE,
                        help="rows per generated Parquet file (a read task's unit, so what bounds the store's use)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides on top of the tiny preset")
    args = parser.parse_args()
    ns = args.sizes or SIZES["quick" if args.quick else "full" if args.full else "default"]
    joining = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(logging_level=logging.WARNING, **({} if joining else {"num_cpus": RAY_CPUS}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    scratch = Path(tempfile.mkdtemp(prefix="gs-ray-scale-"))
    try:
        cfg = load_config("tiny", [f"run.run_dir={scratch / 'run'}", *OVERRIDES, *args.set])
        run_stages(cfg, "warmup")
        run = RunDir(cfg.run.run_dir)
        source = run.stage_dir(layout.DATA_STAGE)
        adapter_dir = str(run.stage_dir(layout.WARMUP_STAGE) / layout.ADAPTER_DIRNAME)
        records = []
        for n in ns:
            data_dir = write_generated_data(source, n, scratch / f"data-{n}", args.rows_per_file)
            records.append(measure(cfg, data_dir, adapter_dir, n, scratch))
            print(json.dumps(records[-1]), flush=True)
            shutil.rmtree(data_dir)
        print(json.dumps(summarize(records)), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not joining:
            ray.shutdown()


if __name__ == "__main__":
    main()

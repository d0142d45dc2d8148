"""benchmarks/scale.py on small splits, as users run it: a script of its own, joined to the session's Ray.

The object store must not grow with N: Stage II reads the split as a stream of files. Before
it did, the whole tokenized split sat in the store, so the store's peak grew with N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCALE_TIMEOUT_S = 600
SIZES = [500, 2000]
ROWS_PER_FILE = 250
# Generous next to the benchmark's 1.2x target: what it guards is growth with N, not noise.
MAX_STORE_GROWTH = 2.0


@pytest.mark.slow
@pytest.mark.timeout(SCALE_TIMEOUT_S)
def test_object_store_and_driver_memory_stay_flat_when_the_split_grows_4x(ray_start_4_cpus):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # A cap small next to both splits, as the default cap is next to a real corpus: the peaks must then meet it.
    argv = ["--sizes", *map(str, SIZES), "--rows-per-file", str(ROWS_PER_FILE), "--set", "grads.object_store_mib=4"]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=SCALE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    *per_n, summary = figures
    assert [record["n"] for record in per_n] == SIZES  # the script checks every row was assigned
    assert summary["summary"] and summary["n_large"] == SIZES[-1]
    assert all(record["object_store_peak_mib"] > 0 and record["samples_per_s"] > 0 for record in per_n)
    assert summary["object_store_peak_ratio"] < MAX_STORE_GROWTH, figures
    assert summary["driver_peak_ratio"] < MAX_STORE_GROWTH, figures

"""Stage II on a local Ray cluster: the tiny model's gradients streamed past the ClusterActor."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split
from gs_ray.stages.pipeline import run_stages

from conftest import WARM_RUN_OVERRIDES

STAGE_FILES = {"assignments.parquet", "eval_assignments.parquet", "centroids.safetensors", "spectrum.json", "spectrum.png", "cluster_sizes.png"}


@pytest.fixture(scope="module")
def warm_run(tiny_warm_run):
    """A tiny run with data and warm-up done; each test here re-runs the cluster stage in it."""
    return tiny_warm_run("stage2")


def _cluster(run_dir, *overrides):
    from gs_ray.config import load_config

    cfg = load_config("tiny", [f"run.run_dir={run_dir}", *WARM_RUN_OVERRIDES, *overrides])
    manifest = run_stages(cfg, "cluster", force=True)["cluster"]
    return cfg, manifest


def _check_every_sample_assigned_once(run_dir, manifest, k):
    out = RunDir(run_dir).stage_dir("cluster")
    assert STAGE_FILES <= set(manifest["files"])
    table = pq.read_table(out / "assignments.parquet")
    assignments = table.to_pylist()
    train_ids = sorted(row["sample_id"] for row in load_split(str(run_dir / "data" / "train")))
    assert [row["sample_id"] for row in assignments] == train_ids  # all of them, none twice, sorted
    assert {row["cluster"] for row in assignments} <= set(range(k))
    assert all(-1.0 <= row["similarity"] <= 1.0 + 1e-5 for row in assignments)
    assert {row["label"] for row in assignments} == {"math", "code", "text"}  # carried through

    summary = manifest["summary"]
    assert summary["train_samples"] == len(train_ids) and sum(summary["sizes"]) == len(train_ids)
    assert sum(summary["centroid_updates"]) > 0  # the EMA refinement ran
    assert summary["agreement"]["labelled_samples"] == len(train_ids)
    saved = load_file(str(out / "centroids.safetensors"))
    assert saved["centroids"].shape == (k, summary["dim"])
    np.testing.assert_allclose(np.linalg.norm(saved["centroids"], axis=1), 1.0, rtol=1e-5)
    return table


def test_one_worker_fixed_k_assigns_every_sample_once(tiny_finished_run):
    """The session's finished run clustered with one gradient worker and K = 2.

    Same seed, same assignments is checked by test_faults' killed-driver test: it rebuilds this
    stage in another process and compares the assignments with this run's.
    """
    cfg, manifests = tiny_finished_run
    _check_every_sample_assigned_once(Path(cfg.run.run_dir), manifests["cluster"], cfg.cluster.k)


def test_two_workers_automatic_k_and_reassignment_same_in_two_runs(warm_run):
    overrides = ("grads.concurrency=2", "cluster.reassign=true", "cluster.k_max=6", "cluster.cache_size=8")
    _, first = _cluster(warm_run, *overrides)
    first_table = pq.read_table(warm_run / "cluster" / "assignments.parquet")
    first_centroids = load_file(str(warm_run / "cluster" / "centroids.safetensors"))["centroids"]
    _, manifest = _cluster(warm_run, *overrides)
    k = manifest["summary"]["k"]
    table = _check_every_sample_assigned_once(warm_run, manifest, k)
    # Two workers, each its own stream: nothing depends on how Ray interleaved their batches.
    assert manifest["summary"]["streams"] == 2 and first["summary"]["k"] == k
    assert table.to_pylist() == first_table.to_pylist()
    np.testing.assert_array_equal(load_file(str(warm_run / "cluster" / "centroids.safetensors"))["centroids"],
                                  first_centroids)
    spectrum = json.loads((warm_run / "cluster" / "spectrum.json").read_text())
    assert 2 <= spectrum["k"] <= 6 and spectrum["k"] == k
    assert spectrum["singular_values"] == sorted(spectrum["singular_values"], reverse=True)
    changed = np.mean(np.asarray(table["cluster"]) != np.asarray(table["stream_cluster"]))
    assert manifest["summary"]["reassign_changed_fraction"] == pytest.approx(changed)


def test_too_few_validation_samples_is_a_clear_error(warm_run):
    from gs_ray.core.errors import DataError

    with pytest.raises(DataError, match="val split has .* clustering needs at least"):
        _cluster(warm_run, "cluster.k=100")

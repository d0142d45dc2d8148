"""Stage III: experts trained concurrently on their own clusters, and the router stage."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from gs_ray.config import ExpertsConfig
from gs_ray.core.errors import ConfigError
from gs_ray.core.rundir import RunDir
from gs_ray.stages.experts import expert_steps, merge_small_clusters
from gs_ray.train.loop import samples_digest


def test_small_clusters_merge_into_their_nearest_neighbour():
    centroids = np.eye(4, dtype=np.float32)
    centroids[3] = [0.1, 0.0, 0.9, 0.0]  # closest to cluster 2
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    expert_of_cluster, kept = merge_small_clusters([50, 40, 30, 3], centroids, min_size=10)
    assert kept == [0, 1, 2] and expert_of_cluster == [0, 1, 2, 2]
    # Nothing large enough: the largest cluster stays, so there is still one expert.
    assert merge_small_clusters([3, 5], centroids[:2], min_size=10) == ([0, 0], [1])


def test_a_merged_cluster_is_announced_in_one_line(capsys):
    from gs_ray.config import load_config
    from gs_ray.stages.experts import _plan

    cfg = load_config("tiny", ["experts.min_cluster_size=3"])
    expert_of_cluster, plan = _plan(cfg, np.array([0, 0, 0, 1]), np.eye(2, dtype=np.float32))
    assert expert_of_cluster == [0, 0] and [entry["train_samples"] for entry in plan] == [4]
    assert capsys.readouterr().out == ("[experts] cluster 1 (1 samples < experts.min_cluster_size=3) "
                                       "merged into expert 0\n")


def test_step_budgets():
    assert expert_steps([10, 30], ExpertsConfig(budget="fixed", max_steps=20), samples_per_step=4) == [20, 20]
    proportional = expert_steps([10, 30, 160], ExpertsConfig(budget="proportional", max_steps=20, min_steps=8),
                                samples_per_step=4)
    assert proportional == [8, 9, 48]  # shares of 60 total steps, with the floor applied
    # Two passes at 8 samples a step: 100 samples need 25 steps, 30 need 7.5 (rounded up), 10 get the floor.
    epochs = expert_steps([100, 30, 10], ExpertsConfig(budget="epochs", epochs=2.0, min_steps=5), samples_per_step=8)
    assert epochs == [25, 8, 5]


def test_an_epochs_budget_needs_a_number_of_passes():
    with pytest.raises(ConfigError, match="experts.epochs: must be > 0 with experts.budget=epochs"):
        ExpertsConfig(budget="epochs")
    with pytest.raises(ConfigError, match="experts.budget: must be one of fixed, proportional, epochs, got 'passes'"):
        ExpertsConfig(budget="passes")


def test_two_experts_train_at_the_same_time_on_their_own_clusters(tiny_finished_run):
    cfg, manifests = tiny_finished_run
    run = RunDir(cfg.run.run_dir)
    experts = manifests["experts"]["summary"]["experts"]
    assert len(experts) == 2
    # Both jobs were running at once: each started before the other ended.
    assert max(e["started_at"] for e in experts) < min(e["ended_at"] for e in experts)
    assert manifests["experts"]["summary"]["parallel_seconds"] > 0

    assignments = pq.read_table(run.stage_dir("cluster") / "assignments.parquet").to_pylist()
    for expert in experts:
        own = [row["sample_id"] for row in assignments if row["cluster"] in expert["clusters"]]
        assert expert["train_samples"] == len(own) and expert["step"] == 8
        assert expert["train_samples_digest"] == samples_digest(own)  # what the loop trained on, nothing else
        folder = run.stage_dir("experts") / f"expert-{expert['expert']}"
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert expert["eval_loss_end"] < expert["eval_loss_start"]


def test_router_stage_trains_on_expert_ids(tiny_finished_run):
    from gs_ray.train.router import Router

    cfg, manifests = tiny_finished_run
    summary = manifests["router"]["summary"]
    assert summary["experts"] == 2 and summary["eval_samples"] > 0
    out = RunDir(cfg.run.run_dir).stage_dir("router")
    router = Router.load(out / "router")
    clusters, probabilities = router.predict(["What is 12 plus 30?", "Write a python function to sort a list."])
    assert probabilities.shape == (2, 2) and set(clusters) <= {0, 1}
    metrics = json.loads((out / "router_metrics.json").read_text())
    assert np.sum(metrics["confusion"]) == metrics["holdout_samples"]
    # The summary's accuracy is the holdout's confusion matrix read back, not a number made up elsewhere.
    assert summary["accuracy"] == pytest.approx(np.trace(metrics["confusion"]) / metrics["holdout_samples"])

"""Stage III: experts trained concurrently on their own clusters, and the router stage."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gs_ray.config import ExpertsConfig
from gs_ray.core.errors import ConfigError
from gs_ray.core.rundir import RunDir
from gs_ray.stages.experts import expert_steps, merge_small_clusters
from gs_ray.train.loop import samples_digest

from conftest import FINISHED_RUN_OVERRIDES


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

    cfg = load_config("tiny", ["experts.min_cluster_size=3", "train.micro_batch_size=1"])
    expert_of_cluster, plan = _plan(cfg, np.array([0, 0, 0, 1, 2, 2, 2]), np.eye(3, dtype=np.float32))
    assert expert_of_cluster == [0, 0, 1] and [entry["train_samples"] for entry in plan] == [4, 3]
    assert capsys.readouterr().out == ("[experts] cluster 1 (1 samples < experts.min_cluster_size=3) "
                                       "merged into expert 0\n")


def test_a_cluster_smaller_than_one_batch_of_the_experts_workers_is_merged_before_any_job(capsys):
    """Two expert workers x micro-batch 8 = 16 samples: a cluster of 10 would fail inside its Train job."""
    from gs_ray.config import load_config
    from gs_ray.stages.experts import _plan

    cfg = load_config("tiny", ["experts.min_cluster_size=1", "experts.num_workers=2", "train.micro_batch_size=8"])
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.98]], dtype=np.float32)
    expert_of_cluster, plan = _plan(cfg, np.repeat([0, 1, 2], [20, 20, 10]), centroids)
    assert expert_of_cluster == [0, 1, 1] and [entry["train_samples"] for entry in plan] == [20, 30]
    assert capsys.readouterr().out == ("[experts] cluster 2 (10 samples < one batch of 2 workers x "
                                       "train.micro_batch_size=8) merged into expert 1\n")


@pytest.mark.parametrize("sizes, overrides", [
    ([40, 5, 3], ["experts.min_cluster_size=16"]),  # one cluster large enough: one expert would be left
    ([12, 10], ["experts.min_cluster_size=1", "experts.num_workers=2"]),  # none holds a batch of 2 x 8
])
def test_fewer_than_two_experts_is_an_error_naming_the_clusters_and_sizes(sizes, overrides):
    from gs_ray.config import load_config
    from gs_ray.core.errors import DataError
    from gs_ray.stages.experts import _plan

    cfg = load_config("tiny", overrides)
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    listed = ", ".join(f"cluster {k}: {size}" for k, size in enumerate(sizes))
    with pytest.raises(DataError, match=f"fewer than 2 experts .* Cluster sizes: {listed}\\."):
        _plan(cfg, clusters, np.eye(len(sizes), dtype=np.float32))


def test_a_fixed_budget_on_a_tiny_cluster_warns_of_many_passes(caplog):
    from gs_ray.config import load_config
    from gs_ray.stages.experts import _plan

    cfg = load_config("tiny", ["experts.budget=fixed", "experts.max_steps=100", "experts.min_cluster_size=8"])
    with caplog.at_level("WARNING", logger="gs_ray.stages.experts"):
        _, plan = _plan(cfg, np.repeat([0, 1], [16, 800]), np.eye(2, dtype=np.float32))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(
        "[experts] expert 0 (clusters [0]) trains 100 steps, 50.0 passes over its 16 samples (more than 4)")
    assert [entry["epochs"] for entry in plan] == [50.0, 1.0]  # 100 steps x 8 samples over 16 and 800 samples


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


FAILURE_WAIT_S = 300
"""Longest wait for a Train worker to start, and for the stage to fail once one job has (busy 2-core machine)."""
STOPPED_WAIT_S = 60
"""Longest wait, once the stage has failed, for the cancelled sibling's Train run to be gone."""
TRAIN_ACTORS = ("TrainController", "RayTrainWorker")


def _alive_actors(*class_names: str) -> dict[str, str]:
    """Id -> class of this session's live actors of the given classes (the GCS actor table: the test cluster has
    no dashboard)."""
    import ray._private.state

    return {actor_id: info["ActorClassName"] for actor_id, info in ray._private.state.actors().items()
            if info["ActorClassName"] in class_names and info["State"] == "ALIVE"}


def _until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_a_failed_expert_job_cancels_its_sibling_and_the_siblings_train_run(tiny_warm_run, tmp_path, monkeypatch):
    """Expert 1's job fails while expert 0's trains (for a million steps): the stage fails at once, and expert
    0's Ray Train run (controller and workers) is stopped rather than left training."""
    import ray

    import gs_ray.stages.experts as experts_stage
    from gs_ray.config import load_config
    from gs_ray.stages.pipeline import run_stages

    sibling_trains = str(tmp_path / "sibling-trains")

    @ray.remote(num_cpus=0)
    def expert_1_fails(config, job):
        import os
        import time

        from gs_ray.config import config_from_dict
        from gs_ray.train.loop import TrainJob, run_training

        if job["name"].startswith("expert-1-"):
            while not os.path.exists(sibling_trains):
                time.sleep(0.2)
            raise RuntimeError("expert 1 failed (injected)")
        return run_training(config_from_dict(config), TrainJob(**{**job, "max_steps": 1_000_000})).metrics

    monkeypatch.setattr(experts_stage, "_train_expert", expert_1_fails)
    cfg = load_config("tiny", [f"run.run_dir={tiny_warm_run('expert-fails')}", *FINISHED_RUN_OVERRIDES])
    run_stages(cfg, "cluster")
    # The warm-up's controller outlives its run in this process (Ray Train's SIGINT handler holds its handle).
    before = _alive_actors(*TRAIN_ACTORS)
    started = lambda: _alive_actors(*TRAIN_ACTORS).keys() - before.keys()
    pool = ThreadPoolExecutor(max_workers=1)  # not a `with`: on a hang the test must fail, not wait for the thread
    try:
        stage = pool.submit(run_stages, cfg, "experts")
        assert _until(lambda: "RayTrainWorker" in {_alive_actors(*TRAIN_ACTORS)[a] for a in started()}
                      or stage.done(), FAILURE_WAIT_S)
        assert not stage.done(), stage.exception()
        Path(sibling_trains).touch()
        with pytest.raises(RuntimeError, match="expert 1 failed \\(injected\\)"):
            stage.result(timeout=FAILURE_WAIT_S)
    finally:
        pool.shutdown(wait=False)
    assert _until(lambda: not started(), STOPPED_WAIT_S), started()

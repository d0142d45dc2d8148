"""Faults injected for real: a killed clustering actor, a killed Ray Train worker, a killed driver."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from gs_ray.config import load_config
from gs_ray.core.rundir import MANIFEST, STAGING_SUFFIX
from gs_ray.data.batches import load_split
from gs_ray.gradientspace.stream import ACTOR_CHECKPOINT
from gs_ray.stages.pipeline import STAGES, run_stages
from gs_ray.train.loop import TrainJob, run_training

from conftest import CHECKPOINT_SNAPSHOT, WARM_RUN_OVERRIDES

pytestmark = pytest.mark.slow

WAIT_S = 300
"""Longest wait for a fault's trigger (a checkpoint, a staging folder) on a busy 2-core machine."""
POLL_S = 0.05
"""How often a test looks for its trigger: short, so the fault lands early in what it interrupts."""
PIPELINE = (
    *WARM_RUN_OVERRIDES, "cluster.k=2", "experts.budget=fixed", "experts.max_steps=3",
    "experts.min_cluster_size=1", "experts.cpus_per_worker=1", "router.epochs=2",
)
"""The tiny pipeline as the session's finished run builds it up to the cluster stage; experts and router shrunk."""
KILLED_STAGES = ("data", "warmup", "cluster", "experts", "router")
"""Stages the driver is killed in, in turn, starting from an empty run dir: every stage `gs-ray run` runs."""


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(POLL_S)


def _alive_actor_pids(class_name: str) -> list[int]:
    """Pids of this session's live actors of a class.

    The GCS actor table, not ray.util.state: the test cluster runs without the dashboard that
    the state API needs.
    """
    import ray._private.state

    return [info["Pid"] for info in ray._private.state.actors().values()
            if info["ActorClassName"] == class_name and info["State"] == "ALIVE" and info["Pid"]]


def _train_ids(run_dir: Path) -> list[str]:
    return sorted(row["sample_id"] for row in load_split(str(run_dir / "data" / "train")))


def _assignments(run_dir: Path) -> dict[str, int]:
    table = pq.read_table(run_dir / "cluster" / "assignments.parquet", columns=["sample_id", "cluster"])
    return dict(zip(table["sample_id"].to_pylist(), table["cluster"].to_pylist()))


def test_killed_cluster_actor_resumes_from_its_checkpoint(tiny_warm_run):
    run_dir = tiny_warm_run("actor-fault")
    cfg = load_config("tiny", [f"run.run_dir={run_dir}", *WARM_RUN_OVERRIDES, "cluster.k=2",
                               "cluster.checkpoint_every=1"])
    checkpoint = run_dir / f".cluster{STAGING_SUFFIX}" / ACTOR_CHECKPOINT
    with ThreadPoolExecutor(max_workers=1) as pool:
        stage = pool.submit(run_stages, cfg, "cluster")
        _wait_for(lambda: checkpoint.is_file() or stage.done(), "the clustering actor's first checkpoint")
        pids = _alive_actor_pids("ClusterActor")
        assert len(pids) == 1 and not stage.done(), "the stream ended before the actor could be killed"
        os.kill(pids[0], signal.SIGKILL)
        manifest = stage.result(timeout=WAIT_S)["cluster"]

    summary = manifest["summary"]
    assert summary["actor_resumed_from_version"] > 0  # from a checkpoint, not the initial state (version 0)
    assignments = pq.read_table(run_dir / "cluster" / "assignments.parquet")["sample_id"].to_pylist()
    assert assignments == _train_ids(run_dir)  # every sample, none twice (the table is sorted by sample_id)
    assert sum(summary["sizes"]) == len(assignments)
    assert ACTOR_CHECKPOINT not in manifest["files"] and not checkpoint.exists()


def _registered_checkpoints(run_storage: Path) -> list[dict]:
    """Checkpoints the Ray Train controller has taken in; a folder on storage alone may not be one yet.

    A worker killed between writing a checkpoint and the controller's next poll restarts from
    the checkpoint before, so the fault waits for this record.
    """
    try:
        return json.loads((run_storage / CHECKPOINT_SNAPSHOT).read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_killed_train_worker_resumes_from_its_checkpoint(tiny_warm_run, tiny_config, tmp_path):
    data_dir = tiny_warm_run("worker-fault") / "data"
    cfg = tiny_config("train.checkpoint_every=2", "train.max_failures=1", "train.log_every=2")
    job = TrainJob(name="worker-fault", train_split=str(data_dir / "warmup"), output_dir=str(tmp_path / "out"),
                   storage_path=str(tmp_path / "ray_train"), max_steps=12, learning_rate=1e-2)
    run_storage = tmp_path / "ray_train" / job.name
    killed: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        training = pool.submit(run_training, cfg, job)
        _wait_for(lambda: _registered_checkpoints(run_storage) or training.done(), "a registered training checkpoint")
        for pid in _alive_actor_pids("RayTrainWorker"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        metrics = training.result(timeout=WAIT_S).metrics

    assert killed and not training.exception()
    assert 0 < metrics["resumed_from_step"] < job.max_steps  # restarted from a checkpoint, not from step 0
    assert metrics["step"] == job.max_steps
    logged = [step for step, _ in metrics["loss_curve"]]
    assert logged == list(range(2, job.max_steps + 1, 2))  # no step logged twice, none missing


def _kill_session(session: int) -> None:
    """SIGKILL every process left in a session this test started (a driver; never the session's Ray)."""
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                process.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass


def _live_actors_of_driver(driver_pid: int) -> list[str]:
    """Class names of the live actors of the Ray job whose driver had this pid.

    Detached actors (Ray's own helpers, such as Ray Train's placement group cleaner) are
    left out: they outlive any driver by design and end themselves.
    """
    import ray._private.state

    jobs = {job["JobID"] for job in ray._private.state.jobs() if job["DriverPid"] == driver_pid}
    return [info["ActorClassName"] for info in ray._private.state.actors().values()
            if info["JobID"] in jobs and info["State"] != "DEAD" and not info["IsDetached"]]


def _gs_ray_run(run_dir: Path, log: Path, ray_address: str, kill_in: str | None) -> tuple[int | None, str]:
    """`gs-ray run` as its own process (its own session) attached to the test cluster.

    With `kill_in`, the driver is SIGKILLed once that stage's staging folder appears, and
    the test waits until Ray has ended the actors the dead driver owned, so none outlive it.
    """
    command = [sys.executable, "-m", "gs_ray.cli", "run", "--config", "tiny", "--run-dir", str(run_dir), *PIPELINE,
               f"run.ray_address={ray_address}"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    with log.open("w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if kill_in is None:
            returncode = driver.wait(timeout=WAIT_S * 2)
        else:
            staging = run_dir / f".{kill_in}{STAGING_SUFFIX}"
            _wait_for(lambda: staging.is_dir() or driver.poll() is not None, f"{staging}")
            assert driver.poll() is None, f"the run ended before {kill_in} started:\n{log.read_text()}"
            os.killpg(driver.pid, signal.SIGKILL)
            returncode = driver.wait()
            _wait_for(lambda: not _live_actors_of_driver(driver.pid), "Ray to end the killed driver's actors")
    finally:
        _kill_session(driver.pid)
    return returncode, log.read_text()


def test_killed_driver_resumes_each_stage_and_matches_uninterrupted_run(ray_start_4_cpus, tiny_finished_run,
                                                                         tmp_path):
    import ray

    # The session's finished tiny run is the uninterrupted run: same seed, same settings up to the cluster stage.
    reference_cfg, reference = tiny_finished_run
    cfg = load_config("tiny", [f"run.run_dir={tmp_path / 'run'}", *PIPELINE])
    for stage in ("data", "warmup", "cluster"):
        assert reference[stage]["inputs"]["config"] == cfg.digest(list(STAGES[stage].sections)), stage
        assert reference[stage]["inputs"]["seed"] == cfg.run.seed

    run_dir = Path(cfg.run.run_dir)
    address = ray.get_runtime_context().gcs_address
    for index, stage in enumerate(KILLED_STAGES):
        returncode, output = _gs_ray_run(run_dir, tmp_path / f"killed-in-{stage}.log", address, kill_in=stage)
        assert returncode == -signal.SIGKILL, output
        assert not (run_dir / stage / MANIFEST).exists()  # the interrupted stage never landed
        for finished in KILLED_STAGES[: max(0, index - 1)]:
            assert f"[{finished}] up to date" in output, output
        if index:  # the stage the previous run was killed in is rebuilt whole
            assert f"[{KILLED_STAGES[index - 1]}] done" in output, output

    returncode, output = _gs_ray_run(run_dir, tmp_path / "resumed.log", address, kill_in=None)
    assert returncode == 0, output
    for finished in KILLED_STAGES[:-1]:
        assert f"[{finished}] up to date" in output, output
    assert "[router] done" in output and "== gs-ray summary ==" in output
    assert not list(run_dir.glob(f".*{STAGING_SUFFIX}"))

    resumed = _assignments(run_dir)
    assert sorted(resumed) == _train_ids(run_dir)
    assert resumed == _assignments(Path(reference_cfg.run.run_dir))

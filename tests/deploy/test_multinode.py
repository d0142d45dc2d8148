"""The cluster claims, proved on a simulated 3-node Ray cluster: placement, storage, a lost node.

A head with no CPUs (as the cluster configs have it) and two worker nodes, each a `ray start`
process group with its own temp dir and its own GS_RAY_CACHE, so nothing a node wrote locally is
there for another node's gs_ray code to find. The run dir is on S3 (moto on loopback). Jobs go in
through the Jobs API, and where work ran is read back from Ray's state API, not from logs.

The tests share the cluster and one run, in file order: the pipeline, which loses the node that trains one of its
experts, then serving the run, which loses the node of its expert replica. Each lost node is replaced by a fresh
one afterwards, as the autoscaler would replace a reclaimed spot instance.
"""

import contextlib
import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest.mock import ANY

import pytest
import requests
from conftest import CHECKPOINT_SNAPSHOT, FINISHED_RUN_OVERRIDES, S3_BUCKET
from ray_nodes import Node, free_port, node_ids, start_head, start_worker, state, wait_for_nodes

from gs_ray.cli import main
from gs_ray.core import layout, storage
from gs_ray.core.rundir import MANIFEST, RunDir
from gs_ray.stages.pipeline import STAGES

pytestmark = pytest.mark.slow

WORKERS = ("node_a", "node_b")
WORKER_CPUS = 2
"""Each worker alone can hold what the tiny run needs at once (two expert jobs of one 1-CPU worker each)."""
EVERY = 5
"""Steps between checkpoints and between logged losses, in every training job of the run."""
EXPERT_STEPS = 30
"""Long enough for a node to be lost between two of an expert's checkpoints."""
RUN_OVERRIDES = (*FINISHED_RUN_OVERRIDES, f"train.checkpoint_every={EVERY}", f"train.log_every={EVERY}",
                 f"experts.max_steps={EXPERT_STEPS}")
EXPERT_REPLICA = "ServeReplica:gs-ray:Expert"
GRADIENT_ACTOR = "MapWorker(MapBatches(GradientWorker"
"""How Ray Data names the actors of Stage II's gradient pool in Ray's state API."""
SERVE_LOAD_CLIENTS = 4
"""The bounded load under which the serving node is lost: this many clients, each one request at a time."""
REQUEST_TIMEOUT_S = 60
"""A request not answered in this long counts as a hang."""
LOAD_BEFORE_FAULT_S, LOAD_AFTER_RECOVERY_S, RECOVERY_TIMEOUT_S = 3, 5, 120
SERVE_UP_TIMEOUT_S = 240
JOB_END_TIMEOUT_S = 600
KILL_WAIT_S = 300


class Cluster:
    def __init__(self, url: str, gcs: str, head: Node, caches: dict[str, str], logs: Path):
        self.url, self.gcs, self.head, self.caches, self.logs = url, gcs, head, caches, logs
        self.workers: dict[str, Node] = {}
        self.names = {node_id: name for name, node_id in wait_for_nodes(url, ["head"]).items()}
        """Every node id the cluster has had, alive or not, and the name it was started under."""

    def name_of(self, node_id: str) -> str:
        return self.names[node_id]

    def start_worker(self, name: str) -> None:
        """Start worker `name`, or a fresh one in its place once a test has killed it (as the autoscaler replaces a
        reclaimed spot instance, so that the next test again has two workers); return once it has joined.

        Serve's proxies share the HTTP port through SO_REUSEPORT; on one machine the kernel would hand clients to
        a worker's proxy too. Clients here reach the head's (the address a load balancer or KubeRay's service
        points at), so a lost worker takes replicas with it, never the endpoint.
        """
        env = {"GS_RAY_CACHE": self.caches[name], "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(free_port())}
        self.workers[name] = start_worker(name, self.gcs, WORKER_CPUS, self.logs, env)
        self.names |= {node_id: known for known, node_id in wait_for_nodes(self.url, [name]).items()}

    def where(self, class_name: str) -> set[str]:
        """Names of the nodes that hosted actors whose class name starts so, alive or dead (Ray Data names its
        pool's actors `MapWorker(MapBatches(<the class>))`)."""
        return {self.name_of(actor["node_id"]) for actor in state(self.url, "actors")
                if actor["class_name"].startswith(class_name) and actor.get("node_id")}


@pytest.fixture(scope="module")
def three_nodes(s3_endpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("nodes")
    caches = {name: str(tmp_path_factory.mktemp(f"cache-{name}")) for name in ("head", *WORKERS)}
    head, gcs, url = start_head("head", 0, logs, {"GS_RAY_CACHE": caches["head"]})
    cluster = Cluster(url, gcs, head, caches, logs)
    try:
        for name in WORKERS:
            cluster.start_worker(name)
        yield cluster
    finally:
        for node in (*cluster.workers.values(), head):
            node.stop()


@pytest.fixture(scope="module")
def run_uri():
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}/run"


def _manifest_matches_storage(uri: str, stage: str) -> None:
    manifest = json.loads(storage.read_text(storage.join(uri, stage, MANIFEST)))
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    assert {**sizes, MANIFEST: ANY} == storage.file_sizes(storage.join(uri, stage)), stage


def _expert_snapshots(uri: str) -> list[str]:
    return [name for name in storage.file_sizes(storage.join(uri, "ray_train"))
            if name.endswith(CHECKPOINT_SNAPSHOT) and name.startswith("expert-")]


def _registered(uri: str, snapshot: str) -> bool:
    text = storage.read_text(storage.join(uri, "ray_train", snapshot))
    return bool(text and json.loads(text).get("checkpoint_results"))


def _lose_a_node_training_an_expert(cluster: Cluster, uri: str, job) -> tuple[str, list[str]]:
    """Once both experts train and each has a checkpoint the controller registered, kill a node that hosts one of
    their Train workers; return (its name, the node of every Train worker alive just before)."""
    deadline = time.monotonic() + KILL_WAIT_S
    while not (len(snapshots := _expert_snapshots(uri)) == 2 and all(_registered(uri, name) for name in snapshots)):
        assert not job.done() and time.monotonic() < deadline, "the run ended before its experts had checkpoints"
        time.sleep(0.5)
    training = [cluster.name_of(actor["node_id"])
                for actor in state(cluster.url, "actors", class_name="RayTrainWorker", state="ALIVE")]
    cluster.workers[training[0]].kill()
    return training[0], training


def _check_experts_resumed(uri: str, lost: str, training: list[str]) -> list[int]:
    """Every expert trained its steps once each; those whose worker was lost resumed from a checkpoint."""
    from gs_ray.config import load_config
    from gs_ray.modeling.models import load_adapter, load_base_model

    local = RunDir(uri).pull_finished((layout.EXPERTS_STAGE,)) / layout.EXPERTS_STAGE
    resumed = []
    for expert in (0, 1):
        metrics = json.loads((layout.expert_dir(local, expert) / layout.TRAIN_METRICS_FILE).read_text())
        assert metrics["step"] == EXPERT_STEPS
        logged = [step for step, _ in metrics["loss_curve"]]
        assert logged == list(range(EVERY, EXPERT_STEPS + 1, EVERY))  # no step logged twice, none missing
        resumed.append(metrics["resumed_from_step"])
    # Each expert whose worker was on the lost node started again from a checkpoint, not from step 0.
    assert [step > 0 for step in resumed].count(True) == training.count(lost), (resumed, training, lost)
    cfg = load_config("tiny", [f"run.run_dir={uri}"])
    for expert in (0, 1):  # complete and loadable
        adapted = load_adapter(load_base_model(cfg.model), layout.expert_dir(local, expert) / layout.ADAPTER_DIRNAME)
        assert any("lora_" in name for name, _ in adapted.named_parameters())
    return resumed


def test_pipeline_job_runs_on_the_workers_survives_losing_one_mid_experts_and_lands_whole_on_s3(
        three_nodes, run_uri, capsys, tmp_path, monkeypatch):
    from gs_ray.submit import client

    argv = ["submit", "run", "--address", three_nodes.url, "--config", "tiny", "--run-dir", run_uri, *RUN_OVERRIDES]
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(main, argv)
        lost, training = _lose_a_node_training_an_expert(three_nodes, run_uri, job)
        assert job.result(timeout=JOB_END_TIMEOUT_S) == 0
    out = capsys.readouterr().out
    job_id = _job_id(out)
    assert f"job {job_id} SUCCEEDED; results in {run_uri}" in out
    assert "[experts] done" in out and "[router] done" in out and "== gs-ray summary ==" in out  # logs followed

    # The driver sits on the head (never on a worker that can be reclaimed); the work on the workers.
    assert three_nodes.name_of(client(three_nodes.url).get_job_info(job_id).driver_node_id) == "head"
    for actors in (GRADIENT_ACTOR, "RayTrainWorker"):  # Stage II's gradient actors; every Train worker
        assert three_nodes.where(actors) and three_nodes.where(actors) <= set(WORKERS), actors
    # Every stage landed on S3 whole: each file its manifest lists, at the size listed.
    for stage in STAGES:
        _manifest_matches_storage(run_uri, stage)
    # The Train workers read their splits from the bucket and checkpointed to it, not to a node's disk.
    assert any("/checkpoint_" in name for name in storage.file_sizes(storage.join(run_uri, "ray_train")))
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "mirror"))
    resumed = _check_experts_resumed(run_uri, lost, training)
    with capsys.disabled():  # the figures RESULTS.md records
        print(f"\n[multinode] experts: lost {lost} hosting {training.count(lost)} of 2 Train workers; "
              f"resumed from steps {resumed} of {EXPERT_STEPS} (checkpoint every {EVERY})")

    assert main(["status", job_id, "--address", three_nodes.url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", job_id, "--address", three_nodes.url]) == 0
    assert "[router] done" in capsys.readouterr().out
    three_nodes.start_worker(lost)  # as the autoscaler would: serving gets two workers again


def _job_id(out: str) -> str:
    return re.search(r"\[submit\] job (\S+):", out).group(1)


def _wait_until_ended(cluster: Cluster, job_id: str) -> str:
    from gs_ray.submit import client

    jobs, deadline = client(cluster.url), time.monotonic() + JOB_END_TIMEOUT_S
    while (status := str(jobs.get_job_status(job_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {JOB_END_TIMEOUT_S} s"
        time.sleep(1)
    return status


def _ask(base: str) -> requests.Response:
    body = {"model": "gs-ray", "max_tokens": 4, "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    return requests.post(f"{base}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)


def _wait_for_endpoint(base: str, job_id: str, cluster: Cluster) -> None:
    from gs_ray.submit import client

    deadline = time.monotonic() + SERVE_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        status = client(cluster.url).get_job_status(job_id).value
        assert status in ("PENDING", "RUNNING"), client(cluster.url).get_job_logs(job_id)[-3000:]
        time.sleep(2)
    pytest.fail(f"{base} did not come up in {SERVE_UP_TIMEOUT_S} s")


class RoutedLoad:
    """CLIENTS threads sending routed requests back to back; each outcome kept as (sent, answered, status or error)."""

    def __init__(self, base: str):
        self.base, self.outcomes, self.stopping = base, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(SERVE_LOAD_CLIENTS)]

    def _client(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                reply = _ask(self.base)
                outcome: int | str = reply.status_code if reply.status_code in (200, 503) else \
                    f"{reply.status_code}: {reply.text[:300]}"
            except requests.RequestException as exc:  # a timeout (a hang) or a dropped connection
                outcome = type(exc).__name__
            self.outcomes.append((sent, time.monotonic(), outcome))

    def __enter__(self) -> "RoutedLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 5)

    def recovered_after(self, moment: float) -> bool:
        """A request sent after `moment`, and after every failure so far, has been answered."""
        failures = [answered for _, answered, outcome in self.outcomes if answered > moment and outcome != 200]
        since = max(failures, default=moment)
        return any(sent > since and outcome == 200 for sent, _, outcome in self.outcomes)

    def longest_silence_after(self, moment: float) -> float:
        """The longest time after `moment` with no request answered successfully: what a client saw of the fault."""
        answered = sorted(end for _, end, outcome in self.outcomes if end > moment and outcome == 200)
        return max((b - a for a, b in zip([moment, *answered], answered)), default=float("inf"))


def _alive_replica_nodes(cluster: Cluster) -> set[str]:
    alive = set(node_ids(cluster.url))
    return {name for actor in state(cluster.url, "actors", class_name=EXPERT_REPLICA, state="ALIVE")
            if (name := cluster.name_of(actor["node_id"])) in alive}


def test_served_run_answers_from_a_worker_and_a_lost_expert_node_costs_only_503s(three_nodes, run_uri, capsys):
    port = free_port()
    assert main(["submit", "serve", "--address", three_nodes.url, "--config", "tiny", "--run-dir", run_uri,
                 "--no-wait", f"serve.port={port}"]) == 0
    job_id, base = _job_id(capsys.readouterr().out), f"http://127.0.0.1:{port}"
    try:
        _wait_for_endpoint(base, job_id, three_nodes)
        reply = _ask(base)
        assert reply.status_code == 200 and reply.json()["gs_ray"]["expert"] in (0, 1), reply.text
        # The replicas mirrored the run from S3 onto worker nodes (the head holds no CPU for them).
        placed = _alive_replica_nodes(three_nodes)
        assert len(placed) == 1 and placed <= set(WORKERS), placed
        lost = placed.pop()
        other = next(name for name in WORKERS if name != lost)
        ingress = state(three_nodes.url, "actors", class_name="ServeReplica:gs-ray:Ingress", state="ALIVE")
        assert [three_nodes.name_of(actor["node_id"]) for actor in ingress] == ["head"]  # serve.ingress_on_head

        with RoutedLoad(base) as load:
            time.sleep(LOAD_BEFORE_FAULT_S)
            killed_at = time.monotonic()
            three_nodes.workers[lost].kill()
            deadline = killed_at + RECOVERY_TIMEOUT_S
            while not (recovered := load.recovered_after(killed_at)) and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(LOAD_AFTER_RECOVERY_S)
        outcomes = [outcome for _, _, outcome in load.outcomes]
        gap = load.longest_silence_after(killed_at)
        with capsys.disabled():
            print(f"\n[multinode] serving: {len(outcomes)} requests, {outcomes.count(200)} answered, "
                  f"{outcomes.count(503)} 503, {len(outcomes) - outcomes.count(200) - outcomes.count(503)} other; "
                  f"longest gap {gap:.1f} s after losing {lost}")
        assert recovered, f"routed requests still failed {RECOVERY_TIMEOUT_S} s after the node was lost"
        assert set(outcomes) <= {200, 503}, sorted(set(map(str, outcomes)))  # never a 500, a hang, a reset
        # The replica came back on the other worker (once the cluster has marked the lost node dead).
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while (again := _alive_replica_nodes(three_nodes)) != {other} and time.monotonic() < deadline:
            time.sleep(1)
        assert again == {other}, again
    finally:
        main(["stop", job_id, "--address", three_nodes.url])
        _wait_until_ended(three_nodes, job_id)
        for name, node in three_nodes.workers.items():
            if not node.alive():
                three_nodes.start_worker(name)

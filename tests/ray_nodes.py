"""Ray nodes as separate processes on this machine (`ray start`), for tests that need a real cluster.

Each node runs `ray start --block` in its own process group, so stopping one touches nothing else
(never `ray stop`, which would stop every Ray on the machine), and SIGKILLing the group makes the node
vanish at once, its raylet, object store and workers with it, as a reclaimed spot instance does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

NODE_START_TIMEOUT_S = 90
NODE_STOP_TIMEOUT_S = 10
NODE_OBJECT_STORE_BYTES = 256 * 1024 * 1024
"""Per node: the tiny pipeline's objects are small, and three default-sized stores would not fit /dev/shm."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent_ports() -> list[str]:
    """Ports every node's agents would otherwise take at fixed defaults, and so collide on one machine."""
    ports = {"--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    return [str(part) for flag, port in ports.items() for part in (flag, port)]


@dataclass
class Node:
    """One `ray start --block` process group, its log, its temp dir and the custom resource that names it."""

    name: str
    process: subprocess.Popen
    log: Path
    temp_dir: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list:
        """Every process of this node: its group, and its workers, whose command lines name its temp dir (a worker
        may have left the group)."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if str(self.temp_dir) in " ".join(process.info["cmdline"] or ()) or \
                        os.getpgid(process.pid) == self.process.pid:
                    found.append(process)
        return found

    def kill(self) -> None:
        """Vanish at once: SIGKILL the raylet, its object store and its workers, with no chance to clean up."""
        import psutil

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.process.wait(NODE_STOP_TIMEOUT_S)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


def start_node(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Node:
    """`ray start --block ARGS` as node `name` (also its custom resource, so placement can be read back)."""
    temp_dir = Path(f"/tmp/gsr-{uuid.uuid4().hex[:6]}")  # Unix socket paths must stay short
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(temp_dir), "--disable-usage-stats", "--resources", json.dumps({name: 1}),
               "--object-store-memory", str(NODE_OBJECT_STORE_BYTES), *_agent_ports(), *args]
    # Jobs and workers started by this node run this interpreter. Token auth, as Ray 2.60 heads start by default:
    # the head writes the token to ~/.ray/auth_token, and a node joins only if it is told to present it.
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "RAY_AUTH_MODE": "token", **(env or {})}
    log = log_dir / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(name, process, log, temp_dir)


def start_head(name: str, num_cpus: int, log_dir: Path, env: dict[str, str] | None = None) -> tuple[Node, str, str]:
    """A head with a dashboard on loopback; returns (node, GCS address, Jobs API URL) once the Jobs API answers."""
    gcs, dashboard = free_port(), free_port()
    node = start_node(name, ["--head", "--port", str(gcs), "--num-cpus", str(num_cpus), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--ray-client-server-port", str(free_port())], log_dir, env)
    url = f"http://127.0.0.1:{dashboard}"
    _wait_for_jobs_api(url, node)
    return node, f"127.0.0.1:{gcs}", url


def start_worker(name: str, gcs_address: str, num_cpus: int, log_dir: Path, env: dict[str, str]) -> Node:
    return start_node(name, ["--address", gcs_address, "--num-cpus", str(num_cpus)], log_dir, env)


def _wait_for_jobs_api(url: str, head: Node) -> None:
    from gs_ray.submit import client

    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not head.alive():
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            client(url).list_jobs()
            return
        except Exception:  # not up yet
            time.sleep(1)
    pytest.fail(f"the Jobs API at {url} did not come up:\n{head.log.read_text()[-3000:]}")


def wait_for_nodes(url: str, names: list[str]) -> dict[str, str]:
    """{node name: Ray node id} once every named node is alive in the cluster."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        ids = node_ids(url)
        if all(name in ids for name in names):
            return ids
        time.sleep(1)
    pytest.fail(f"nodes {names} did not all join the cluster at {url} (alive: {sorted(node_ids(url))})")


def state(url: str, kind: str, **filters: str) -> list[dict]:
    """Rows of Ray's state API (`kind`: nodes, actors, tasks) matching every filter, over HTTP with the cluster's token.

    Through the dashboard's REST endpoint rather than `ray.util.state`, which reads the token only when this
    process itself runs in token mode, and this test session's own local cluster does not.
    """
    import requests

    from gs_ray.submit import auth_headers

    params = [("limit", "10000"), ("detail", "true")]
    for key, value in filters.items():
        params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    reply = requests.get(f"{url}/api/v0/{kind}", params=params, headers=auth_headers(), timeout=30)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def node_ids(url: str) -> dict[str, str]:
    """{node name: node id} of the alive nodes, the name read from the custom resource each was started with."""
    return {resource: node["node_id"] for node in state(url, "nodes", state="ALIVE")
            for resource in node["resources_total"] if resource.startswith("node_") or resource == "head"}

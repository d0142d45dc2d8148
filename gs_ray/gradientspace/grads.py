"""Stage II: exact per-sample gradients of every LoRA A and B matrix, in one batched pass.

For a linear map y = x W^T applied at every token, the gradient of sample i's loss with
respect to W is sum_t dy_it^T x_it: the layer's input and the gradient at its output,
both already present in an ordinary batched backward pass, just not yet summed over the
batch. PerSampleGradients hooks the LoRA A and B linears of a PEFT model to keep their
inputs and outputs, asks autograd for the gradient at those outputs (and nothing else:
no weight gradient of any kind is formed), and contracts over tokens per sample with one
batched matmul per matrix. Padding needs no mask: padded positions carry no loss, so
their output gradient is zero. The loss of a sample is its mean over its target tokens.
A LoRA linear called more than once per forward (a layer shared between positions of the
network) contributes the sum over its calls, as autograd's own gradient does. LoRA on other
layers (PEFT's `lora_embedding_A/B` on an embedding, convolutions) is refused: its weights
are not linears this method can hook, and leaving them out would make every gradient wrong.

`reference_gradients` is the batch-size-1 loop the batched path must equal; tests and
benchmarks use it, the pipeline never does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gs_ray.data.batches import IGNORE_INDEX
from gs_ray.modeling.losses import token_losses
from gs_ray.modeling.models import ADAPTER_WEIGHTS, lora_parameters

WEIGHT_SUFFIX = ".weight"
_BLOCK = re.compile(r"\.(\w+)\.(lora_[AB])\.")
_ANY_LORA = re.compile(r"^(.*)\.(lora_\w+)\.")
"""Any LoRA tensor's module and kind: lora_A/lora_B, and also lora_embedding_A/B, lora_magnitude_vector, ..."""


TOKEN_SELECTIONS = ("all", "answer", "end")
"""Which target tokens a sample's gradient is taken over (grads.tokens): the whole reply with its end of turn, the
reply alone, or the end-of-turn tokens alone."""


def select_target_tokens(row: dict, tokens: str, end_ids: list[int]) -> dict:
    """The row with loss labels left only on the target tokens the gradient is taken over.

    `end`: the chat template's end-of-turn tokens (`end_ids`); a reply truncated before them
    gets them appended, as if it had ended there, so every sample's gradient has the same kind
    of target. `answer`: every reply token but the end of turn. `all`: the row unchanged.
    """
    if tokens == "all":
        return row
    ids, labels, n = list(row["input_ids"]), list(row["labels"]), len(end_ids)
    ends_its_turn = n > 0 and labels[-n:] == list(end_ids)
    if tokens == "end":
        if not ends_its_turn:
            ids, labels = ids + list(end_ids), labels + list(end_ids)
        labels = [IGNORE_INDEX] * (len(labels) - n) + labels[-n:]
    elif ends_its_turn and any(label != IGNORE_INDEX for label in labels[:-n]):
        labels = labels[:-n] + [IGNORE_INDEX] * n
    return {**row, "input_ids": ids, "labels": labels}


def per_sample_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sample's target tokens: shape (batch,)."""
    losses, mask = token_losses(model, batch)
    return losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _lora_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear behind every LoRA weight, in the order of `lora_parameters`."""
    covered = {name for name, _ in lora_parameters(model)}
    for name, _ in model.named_parameters():
        found = _ANY_LORA.match(name)
        if found and name not in covered:
            raise ValueError(f"{found.group(1)} has LoRA weights ({found.group(2)}) that per-sample gradients cannot "
                             "include: only LoRA on linear layers is supported (remove that module from "
                             "lora.target_modules)")
    modules = dict(model.named_modules())
    linears = []
    for name, _ in lora_parameters(model):
        if not name.endswith(WEIGHT_SUFFIX):
            raise ValueError(f"per-sample gradients support LoRA weights only, not {name} (set lora bias off)")
        module = modules[name[: -len(WEIGHT_SUFFIX)]]
        if not isinstance(module, torch.nn.Linear) or module.bias is not None:
            raise ValueError(f"{name}: expected a bias-free nn.Linear LoRA matrix, got {type(module).__name__}")
        linears.append((name, module))
    return linears


def gradient_block(parameter_name: str) -> str:
    """The block of gradient coordinates a LoRA weight belongs to: its module and matrix, e.g. "q_proj.lora_B"."""
    found = _BLOCK.search(parameter_name)
    if found is None:
        raise ValueError(f"{parameter_name} is not a LoRA A or B weight")
    return f"{found.group(1)}.{found.group(2)}"


def gradient_blocks(adapter_dir: str | Path) -> dict[str, list[tuple[int, int]]]:
    """Column spans [start, stop) of each block in the gradient rows of the adapter saved at adapter_dir.

    Read from the weight file's header, without loading the model. Saved names lack
    PEFT's adapter-name segment (".default"), which every parameter name carries in the
    same place, so sorting them gives the order of `lora_parameters`.
    """
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="numpy") as weights:
        sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()
                 if _BLOCK.search(name)}
    blocks: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name in sorted(sizes):
        blocks.setdefault(gradient_block(name), []).append((start, start + sizes[name]))
        start += sizes[name]
    return blocks


class PerSampleGradients:
    """Batch of padded samples -> (batch, d) float32: each row one sample's full LoRA gradient.

    Rows are laid out as the concatenation of `lora_parameters(model)` flattened in
    order, exactly like `torch.cat([p.grad.flatten() for _, p in lora_parameters(model)])`.
    The model is switched to eval mode: dropout would make a sample's gradient random.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.linears = _lora_linears(model)
        if not self.linears:
            raise ValueError("model has no LoRA parameters: attach or load an adapter first")
        self.dim = sum(module.weight.numel() for _, module in self.linears)
        for _, module in self.linears:  # autograd traces the LoRA path only if its weights require grad
            module.weight.requires_grad_(True)
        self.device = next(model.parameters()).device

    def _forward_capturing(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list]]:
        """Per-sample losses and, per LoRA linear, the (input, output) of each of its calls in this forward."""
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in self.linears}

        def keep(name: str) -> Callable:
            def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                captured[name].append((inputs[0], output))

            return hook

        handles = [module.register_forward_hook(keep(name)) for name, module in self.linears]
        try:
            losses = per_sample_mean_loss(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return losses, captured

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.enable_grad():
            losses, captured = self._forward_capturing(batch)
            # Samples are independent in the forward pass, so the gradient of the summed
            # loss at sample i's activations is the gradient of sample i's own loss.
            outputs = [output for name, _ in self.linears for _, output in captured[name]]
            output_grads = iter(torch.autograd.grad(losses.sum(), outputs))
        pieces = []
        with torch.no_grad():
            for name, module in self.linears:
                # A weight used in several calls gets the sum of each call's gradient; one never called, zero.
                # (batch, out, tokens) @ (batch, tokens, in) -> (batch, out, in), summed over tokens.
                calls = [torch.bmm(next(output_grads).float().transpose(1, 2), layer_input.float()).flatten(1)
                         for layer_input, _ in captured[name]]
                if not calls:
                    calls = [torch.zeros(len(losses), module.weight.numel(), device=losses.device)]
                pieces.append(calls[0] if len(calls) == 1 else torch.stack(calls).sum(dim=0))
            return torch.cat(pieces, dim=1)


def reference_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same (batch, d) gradients from one backward pass per sample (slow; for checking only)."""
    model.eval()
    params = [param for _, param in lora_parameters(model)]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        sample = {key: value[i : i + 1, :length] for key, value in batch.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(per_sample_mean_loss(model, sample)[0], params)
        rows.append(torch.cat([grad.float().flatten() for grad in grads]))
    return torch.stack(rows)


def batched_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """One plain forward+backward of the whole batch (summed LoRA gradients only): the speed limit."""
    params = [param for _, param in lora_parameters(model)]
    with torch.enable_grad():
        return torch.autograd.grad(per_sample_mean_loss(model, batch).sum(), params)

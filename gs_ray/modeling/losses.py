"""Token losses of a causal LM on a padded batch whose labels mark the target tokens (the response)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gs_ray.data.batches import IGNORE_INDEX


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position (0 where there is no target) and the target mask.

    Both are (batch, tokens - 1). Training sums them; Stage II averages them per sample.
    The vocabulary projection runs only at positions that predict a target token (the
    response, not the prompt or padding): on a small model it is a fifth of the compute
    and most of the activation memory.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    # Position t predicts token t + 1, so the last position never has a target.
    keep = F.pad(mask, (0, 1), value=False)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
    ).logits  # (number of targets, vocab)
    kept = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[mask], reduction="none")
    losses = torch.zeros(mask.shape, dtype=kept.dtype, device=kept.device).masked_scatter(mask, kept)
    return losses, mask


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, and how many there were."""
    losses, mask = token_losses(model, batch)
    return losses.sum(), mask.sum()

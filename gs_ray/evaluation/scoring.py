"""Held-out scoring of routed adapters on one model: loss per target token and greedy answers.

A *route* says how one held-out sample is answered: the adapters that answer it and,
for more than one, the weight of each (the ensemble: router probabilities). A method is
a route per sample. Every adapter of every method is loaded once into one PeftModel as a
named adapter, as a serving replica holds them, and each sample is scored under each
adapter its route names (teacher forcing, the same `token_losses` as training). A
mixture's loss at a token is -log sum_k w_k p_k(token): the ensemble's next-token
distribution, the one `gs_ray.generation.Decoder` samples from when serving
`gs-ray:ensemble`. Answers are decoded greedily by that same Decoder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from gs_ray.config import Config
from gs_ray.data.batches import pad_batch
from gs_ray.modeling.generation import Decoder, GenerationRequest
from gs_ray.modeling.losses import token_losses
from gs_ray.modeling.models import attach_lora, load_adapter, load_base_model, load_tokenizer

BASE = "base"
"""The adapter name that means: no adapter (the base model)."""


@dataclass(frozen=True)
class Route:
    """Adapters answering one sample, and their mixture weights (empty for a single adapter)."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...] = ()


def prompt_ids(row: dict) -> list[int]:
    """The tokens before the first target token: the rendered prompt the model answers, exactly as trained."""
    labels = row["labels"]
    first = next((i for i, label in enumerate(labels) if label >= 0), len(labels))
    return list(row["input_ids"][:first])


def mixed_token_losses(component_losses: list[np.ndarray], weights: tuple[float, ...]) -> np.ndarray:
    """Per-token loss of a mixture: -log sum_k w_k exp(-loss_k), from each component's per-token losses."""
    stacked = -np.stack(component_losses)  # log-probabilities of the targets, (components, tokens)
    logw = np.log(np.maximum(np.asarray(weights, dtype=np.float64), np.finfo(np.float64).tiny))[:, None]
    top = np.max(stacked + logw, axis=0)
    return -(top + np.log(np.sum(np.exp(stacked + logw - top), axis=0)))


class AdapterScorer:
    """One base model holding every adapter by name; per-token losses and greedy answers under routes."""

    def __init__(self, cfg: Config, adapters: dict[str, str]):
        import torch


        self.device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        base = load_base_model(cfg.model)
        self.tokenizer = load_tokenizer(cfg.model)
        # The PeftModel needs one adapter to exist; a fresh LoRA (B = 0) changes nothing.
        model = attach_lora(base, cfg.lora)
        for name, path in adapters.items():
            load_adapter(model, path, adapter_name=name)
        self.model = model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id or 0
        eos = base.generation_config.eos_token_id
        self.eos_ids = frozenset([self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]) - {None}

    def _component(self, name: str):
        """A context that runs the model as `name` (an adapter, or BASE with adapters disabled)."""
        if name == BASE:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def token_losses(self, name: str, rows: list[dict], batch_size: int) -> list[np.ndarray]:
        """Each row's per-target-token losses under one adapter."""
        import torch


        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {key: value.to(self.device) for key, value in pad_batch(chunk, self.pad_id).items()}
            with torch.no_grad(), self._component(name):
                losses, mask = token_losses(self.model, batch)
            out.extend(loss[keep].double().cpu().numpy() for loss, keep in zip(losses, mask))
        return out

    def answers(self, rows: list[dict], routes: list[Route], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy answers of rows, each under its route; rows sharing adapters decode in one batch."""

        decoder = Decoder(self.model, self.tokenizer, self.eos_ids, self.device)
        texts = [""] * len(rows)
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, route in enumerate(routes):
            groups.setdefault(route.adapters, []).append(index)
        for adapters, members in groups.items():
            components = [lambda name=name: self._component(name) for name in adapters]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                requests = [GenerationRequest(prompt_ids(rows[i]), max_new_tokens, mixture=routes[i].weights)
                            for i in chunk]
                for step in decoder.steps(requests, components):
                    for i, delta in zip(chunk, step):
                        if delta is not None:
                            texts[i] += delta.text
        return texts


def score_methods(cfg: Config, adapters: dict[str, str], rows: list[dict], methods: dict[str, list[Route]],
                  generate: list[int]) -> dict[str, dict[str, Any]]:
    """{method: {"loss_sums", "token_counts" (per row), "answers" ({row index: text} for rows in `generate`)}}."""
    scorer = AdapterScorer(cfg, adapters)
    batch = cfg.train.micro_batch_size
    needed: dict[str, set[int]] = {}
    for routes in methods.values():
        for index, route in enumerate(routes):
            for name in route.adapters:
                needed.setdefault(name, set()).add(index)
    losses: dict[tuple[str, int], np.ndarray] = {}
    for name, members in needed.items():
        ordered = sorted(members)
        for index, values in zip(ordered, scorer.token_losses(name, [rows[i] for i in ordered], batch)):
            losses[name, index] = values
    answers = answers_by_method(scorer, rows, methods, generate, cfg.evaluate.max_new_tokens,
                                cfg.evaluate.generation_batch_size)
    out = {}
    for method, routes in methods.items():
        per_row = [losses[route.adapters[0], i] if len(route.adapters) == 1 else
                   mixed_token_losses([losses[name, i] for name in route.adapters], route.weights)
                   for i, route in enumerate(routes)]
        out[method] = {"loss_sums": [float(v.sum()) for v in per_row], "token_counts": [len(v) for v in per_row],
                       "answers": answers[method]}
    return out


def answers_by_method(scorer: AdapterScorer, rows: list[dict], methods: dict[str, list[Route]], generate: list[int],
                      max_new_tokens: int, batch_size: int) -> dict[str, dict[int, str]]:
    """{method: {row index: greedy answer}} for the rows in `generate`, each (row, route) decoded once.

    Greedy decoding is a function of the prompt and the route, so methods that send a row the same way
    (routed and oracle wherever the router is right) share one answer instead of decoding it again.
    """
    unique = list(dict.fromkeys((i, routes[i]) for routes in methods.values() for i in generate))
    texts = scorer.answers([rows[i] for i, _ in unique], [route for _, route in unique], max_new_tokens,
                           batch_size) if unique else []
    decoded = dict(zip(unique, texts))
    return {method: {i: decoded[i, routes[i]] for i in generate} for method, routes in methods.items()}

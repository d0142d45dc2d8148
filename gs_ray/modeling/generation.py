"""Token-by-token decoding for serving: batched, streamable, and able to mix several adapters.

Serving needs three things `model.generate` does not give together: every decoding step
handed back to the caller (so replies can stream and Ray Serve can interleave batches),
per-request sampling settings within one batch, and the ensemble baseline, whose next-token
distribution at every step is the router-probability-weighted mixture of each expert's
distribution. So the loop is written out here, on plain torch, and knows nothing of Ray:

- prompts of a batch are left-padded; positions come from the attention mask, so a padded
  row decodes exactly like the same prompt alone;
- a *component* is one way to run the model (one adapter, or the base model with adapters
  disabled); a batch runs C components per step, each with its own KV cache, and mixes
  their log-probabilities with per-row weights: log sum_c w_c p_c. One component with
  weight 1 is ordinary decoding;
- a request with a seed samples from its own random generator, seeded with it, so its reply
  does not depend on the requests it shares a batch with: the same seed and prompt give the
  same text (up to the last-bit differences of a different batch's float arithmetic);
- text leaves through `TextStream`, which decodes incrementally, holds back a partial UTF-8
  character or a possible beginning of a stop string, and cuts the reply at a stop string.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

INCOMPLETE_CHAR = "\ufffd"
"""What a tokenizer decodes an unfinished multi-byte character to: wait for the next token."""
MIN_TEMPERATURE = 1e-5
"""Guards the division by temperature for sampled rows (temperature 0 means greedy)."""
FINISH_STOP, FINISH_LENGTH = "stop", "length"
"""OpenAI finish reasons: end of turn or a stop string; max_tokens reached."""
SEED_MODULUS = 2**64
"""torch generators take seeds in [0, 2**64); a request's seed is taken modulo this."""


@dataclass
class GenerationRequest:
    """One request as an expert replica decodes it: token ids in, sampling settings, limits."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    """0 decodes greedily."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Strings that end the reply; the reply never contains them."""
    ignore_eos: bool = False
    """Keep going past the end-of-turn token (benchmarks use it for fixed-length replies)."""
    mixture: tuple[float, ...] = ()
    """Weight of each component (ensemble: router probabilities); empty for one component."""
    seed: int | None = None
    """Seed of this request's own sampling generator; None samples from torch's global one."""


@dataclass
class Delta:
    """One step's output for one request: new text, and once finished, why and how many tokens."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextStream:
    """Incremental detokenization of one reply, with stop strings cut off."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        # A stop string may start in text already decoded; never emit its possible first chars.
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit now, whether a stop string was reached)."""
        self.ids.append(int(token_id))
        text = self._text()
        if text.endswith(INCOMPLETE_CHAR):
            return "", False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._advance(text, max(cut, self.emitted)), True
        return self._advance(text, max(len(text) - self.holdback, self.emitted)), False

    def flush(self) -> str:
        """The rest of the text, at the end of the reply."""
        text = self._text()
        return self._advance(text, max(len(text), self.emitted))

    def _advance(self, text: str, end: int) -> str:
        delta, self.emitted = text[self.emitted:end], end
        return delta


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def sample(logprobs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else nucleus sampling at that temperature.

    generators: one per row (None: torch's global generator); a row with its own draws only from it.
    """
    greedy = logprobs.argmax(dim=-1)
    if bool((temperature == 0).all()):
        return greedy
    probs = torch.softmax(logprobs / temperature.clamp(min=MIN_TEMPERATURE)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p, and always the most likely token: a top_p below
    # float32's range arrives as 0, which would otherwise leave nothing to sample from.
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None]
    outside[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    nucleus = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generators is None or all(generator is None for generator in generators):
        sampled = torch.multinomial(nucleus, 1).squeeze(-1)
    else:
        sampled = greedy.clone()
        for row in torch.nonzero(temperature > 0).flatten().tolist():
            sampled[row] = torch.multinomial(nucleus[row], 1, generator=generators[row])[0]
    return torch.where(temperature == 0, greedy, sampled)


Component = Callable[[], contextlib.AbstractContextManager]
"""Puts the model into one configuration (an adapter, or adapters disabled) for a forward pass."""


@dataclass
class _Row:
    request: GenerationRequest
    text: TextStream
    generated: int = 0
    finished: bool = False


@dataclass
class Decoder:
    """Runs batches of requests on one causal LM under one or more components."""

    model: torch.nn.Module
    tokenizer: object
    eos_ids: frozenset[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def _mixed_logprobs(self, components: Sequence[Component], caches: list, weights: torch.Tensor | None,
                        ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mixture of the components' next-token distributions; updates caches."""
        parts = []
        for c, component in enumerate(components):
            with component():
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=caches[c], use_cache=True)
            caches[c] = out.past_key_values
            parts.append(torch.log_softmax(out.logits[:, -1, :].float(), dim=-1))
        if weights is None:
            return parts[0]
        return torch.logsumexp(torch.stack(parts, dim=-1) + weights.log()[:, None, :], dim=-1)

    def _finish(self, row: _Row, token: int) -> Delta:
        """Account for one new token of a row and say what to emit."""
        row.generated += 1
        if token in self.eos_ids and not row.request.ignore_eos:
            row.finished, text, reason = True, row.text.flush(), FINISH_STOP
        else:
            text, stopped = row.text.push(token)
            reason = FINISH_STOP if stopped else None
            if reason is None and row.generated >= row.request.max_tokens:
                text, reason = text + row.text.flush(), FINISH_LENGTH
            row.finished = reason is not None
        if not row.finished:
            return Delta(text)
        return Delta(text, reason, len(row.request.prompt_ids), row.generated)

    @torch.inference_mode()
    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed % SEED_MODULUS)

    def steps(self, requests: Sequence[GenerationRequest],
              components: Sequence[Component]) -> Iterator[list[Delta | None]]:
        """Yield, per decoding step, each request's Delta (None once it has finished)."""
        rows = [_Row(r, TextStream(self.tokenizer, r.stop)) for r in requests]
        ids, mask = left_pad([r.prompt_ids for r in requests], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        weights = None
        if len(components) > 1:
            weights = torch.tensor([r.mixture for r in requests], dtype=torch.float32, device=self.device)
        temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=self.device)
        top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=self.device)
        generators = [self._generator(r.seed) for r in requests]
        caches: list = [None] * len(components)
        while True:
            logprobs = self._mixed_logprobs(components, caches, weights, ids, mask, positions)
            tokens = sample(logprobs, temperature, top_p, generators)
            out = [None if row.finished else self._finish(row, int(tokens[i])) for i, row in enumerate(rows)]
            yield out
            if all(row.finished for row in rows):
                return
            # Finished rows keep decoding as padding for the others; their output is ignored.
            ids = tokens[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
            positions = positions[:, -1:] + 1

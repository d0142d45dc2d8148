"""Exact match where an answer can be checked without running anything, by one of two rules.

`number` (evaluate.answer_check's default): GSM8K references end with `#### <number>`. A
held-out sample is *checkable* when its reference has such a line. A generated answer's
number is the one after its last `####` when it wrote one (the format the experts learn),
otherwise the last number in the text (what a model that never saw the format would end
with); numbers compare by value, so `1,000`, `1000.0` and `$1000` match `1000`.

MBPP code is not executed: running model-written code safely needs a sandbox (no network,
no filesystem, killed on a time limit) that gs_ray does not ship, so MBPP samples have
held-out loss but no exact match.

`text`: every sample is checkable and the whole reply must equal the reference, up to case,
surrounding whitespace and a trailing period: for short answers such as the planted-skill mixes'
(gs_ray.data.planted: a number, `even`, a reversed word).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_MARK = "####"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
"""A number as written in GSM8K: optional sign, thousands commas, optional decimals."""


def _value(token: str) -> Decimal | None:
    try:
        return Decimal(token.replace(",", "")).normalize()
    except InvalidOperation:
        return None


def reference_answer(text: str) -> Decimal | None:
    """The number after the last `####` of a reference, or None when the reference has none (not checkable)."""
    if ANSWER_MARK not in text:
        return None
    found = NUMBER.search(text.rsplit(ANSWER_MARK, 1)[1])
    return _value(found.group()) if found else None


def predicted_answer(text: str) -> Decimal | None:
    """The number a generated answer commits to: after its last `####` if any, else its last number."""
    if ANSWER_MARK in text:
        found = NUMBER.search(text.rsplit(ANSWER_MARK, 1)[1])
        return _value(found.group()) if found else None
    numbers = NUMBER.findall(text)
    return _value(numbers[-1]) if numbers else None


def _normalized(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def is_checkable(reference: str, rule: str = "number") -> bool:
    """Whether a held-out reference can be scored under `rule` (every one under `text`)."""
    return rule == "text" or reference_answer(reference) is not None


def is_correct(generated: str, reference: str, rule: str = "number") -> bool:
    """Under `number`, whether the generated answer's number equals the reference's final number; under `text`,
    whether the whole reply equals the reference (case, surrounding space and a final period aside)."""
    if rule == "text":
        return _normalized(generated) == _normalized(reference)
    expected = reference_answer(reference)
    return expected is not None and predicted_answer(generated) == expected

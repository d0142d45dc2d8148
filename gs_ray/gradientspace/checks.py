"""Per-sample checks of gradient rows before they reach the clustering: NaN, inf and all-zero rows.

A non-finite row would poison every centroid it touches (and then every later assignment),
and a zero row has no direction, so argmax over cosines would put it in cluster 0. Such rows
never reach a feature, a cache or a centroid: the gradient workers mark them, and the driver
stops with the sample ids (`cluster.on_bad_gradient=error`) or leaves them out of the
clustering and of the experts, and reports them (`skip`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from gs_ray.gradientspace.caches import ZERO_NORM
from gs_ray.gradientspace.cluster import ClusterError

logger = logging.getLogger(__name__)

NON_FINITE = "NaN or infinite values"
ZERO = "all zero (no direction)"
EXAMPLES = 5
"""Sample ids named in an error or a warning."""


class BadGradientError(ClusterError):
    """Some samples' gradients cannot be clustered (cluster.on_bad_gradient=error)."""


def gradient_problems(grads: np.ndarray) -> np.ndarray:
    """Per row: "" if the gradient can be clustered, else what is wrong with it (NON_FINITE or ZERO)."""
    grads = np.asarray(grads)
    finite = np.isfinite(grads).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.sum(np.where(np.isfinite(grads), grads, 0).astype(np.float64) ** 2, axis=1))
    problems = np.full(len(grads), "", dtype=object)
    problems[norms <= ZERO_NORM] = ZERO
    problems[~finite] = NON_FINITE
    return problems


def bad_samples(ids: Sequence[str], problems: Sequence[str]) -> list[tuple[str, str]]:
    return [(sample_id, problem) for sample_id, problem in zip(ids, problems) if problem]


def _examples(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{sample_id}: {problem}" for sample_id, problem in bad[:EXAMPLES])
    return shown + (f"; and {len(bad) - EXAMPLES} more" if len(bad) > EXAMPLES else "")


def enforce(bad: list[tuple[str, str]], on_bad: str, where: str) -> None:
    """Raise BadGradientError under `error`; under `skip`, log what is left out. `where`: e.g. "the train split"."""
    if not bad:
        return
    if on_bad == "error":
        raise BadGradientError(
            f"{len(bad)} sample(s) of {where} have gradients that cannot be clustered ({_examples(bad)}); "
            "check those samples and the warm-up adapter (a NaN loss?), or set cluster.on_bad_gradient=skip to "
            "leave them out of the clustering and of the experts")
    logger.warning("[cluster] %d sample(s) of %s left out (cluster.on_bad_gradient=skip): %s",
                   len(bad), where, _examples(bad))


def summary(bad: list[tuple[str, str]]) -> dict:
    """What the stage summary records of the samples left out."""
    return {"count": len(bad), "examples": [f"{sample_id}: {problem}" for sample_id, problem in bad[:EXAMPLES]]}

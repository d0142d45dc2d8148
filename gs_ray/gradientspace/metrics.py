"""How well a clustering agrees with labels the data carries (for evaluation only; never used to cluster)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def label_agreement(clusters: np.ndarray | list[int], labels: list[str | None]) -> dict[str, Any] | None:
    """Purity, NMI and ARI of clusters against source labels, over the labelled samples; None if none are."""
    pairs = [(int(c), str(label)) for c, label in zip(clusters, labels) if label is not None]
    if not pairs:
        return None
    found, truth = zip(*pairs)
    majority = sum(Counter(t for f, t in pairs if f == cluster).most_common(1)[0][1] for cluster in set(found))
    return {
        "purity": majority / len(pairs),
        "nmi": float(normalized_mutual_info_score(truth, found)),
        "ari": float(adjusted_rand_score(truth, found)),
        "labelled_samples": len(pairs),
        "labels": sorted(set(truth)),
    }

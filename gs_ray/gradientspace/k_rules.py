"""Choosing K from the validation features (m rows, seen only through their m x m Gram matrix).

Three rules, each computed for every validation set so that the cluster stage can record what
each would have chosen (spectrum.json) and benchmarks/skills.py can score them all:

- `gap`: the largest relative singular-value gap (s_j - s_{j+1}) / s_j of the (centered)
  features, DESIGN.md's first reading of the paper.
- `silhouette`: spherical k-means for every K in [k_min, k_max] on the isometric coordinates
  of the features, K with the highest mean silhouette (cosine distance).
- `eigengap`: spectral clustering's rule, the largest gap between consecutive eigenvalues of the
  normalized Laplacian of the cosine affinity (negative cosines count as 0).
- `prediction_strength` (Tibshirani and Walther, 2005): split the rows in random halves, cluster
  both; for each cluster of one half, the share of its pairs that the other half's centroids
  also put together; the worst cluster's share, averaged over splits. K with the highest
  strength (the clusters a second sample of the same data finds again). The paper's own
  choice, the largest K above a threshold, took a split cluster (strength 0.81 to 0.86) over
  the planted K (1.0) on tests/gradientspace/test_cluster.py's sets.

Which one runs is cluster.k_rule; benchmarks/RESULTS.md (planted skills) says how often each
found the planted K.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

K_RULES = ("gap", "silhouette", "eigengap", "prediction_strength")
KMEANS_N_INIT = 10
"""k-means restarts per K (best inertia wins)."""
ZERO_NORM = 1e-12
PREDICTION_STRENGTH_SPLITS = 5
"""Random halvings averaged per K."""
PREDICTION_STRENGTH_N_INIT = 3
"""k-means restarts per half (each half is clustered at every K, so fewer than KMEANS_N_INIT)."""


class KRuleError(ValueError):
    """Too few validation rows to choose K in the asked range."""


def k_range(k_min: int, k_max: int, rows: int) -> range:
    """The K values a rule may pick: k_min..k_max, at most rows - 1."""
    high = min(k_max, rows - 1)
    if high < k_min:
        raise KRuleError(f"choosing K in [{k_min}, {k_max}] needs more than {k_min} validation rows, got {rows}")
    return range(k_min, high + 1)


def relative_gap_k(singular_values, k_min: int, k_max: int, centered: bool) -> tuple[int, list[float]]:
    """K at the largest relative gap (s_j - s_{j+1}) / s_j, searched over j (1-based).

    Centered: K clusters span K - 1 directions, so K = j* + 1 with j in [k_min - 1, k_max - 1].
    Uncentered: K = j* with j in [k_min, k_max]. K is clipped to m - 1 (m = len(spectrum)).
    """
    s = np.asarray(singular_values, dtype=np.float64)
    offset = 1 if centered else 0
    ks = k_range(k_min, k_max, len(s))
    js = np.arange(ks.start - offset, ks.stop - offset)
    top, below = s[js - 1], s[js]
    gaps = np.where(top > 0, (top - below) / np.where(top > 0, top, 1.0), 0.0)
    return int(js[int(np.argmax(gaps))] + offset), [float(gap) for gap in gaps]


def unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > ZERO_NORM, rows / np.maximum(norms, ZERO_NORM), 0.0)


def spherical_labels(coordinates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (k-means++, KMEANS_N_INIT restarts) on the unit rows: spherical k-means on the features."""
    return KMeans(n_clusters=k, init="k-means++", n_init=KMEANS_N_INIT, random_state=seed).fit_predict(
        unit_rows(coordinates))


def silhouette_k(coordinates: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float], dict]:
    """(K with the best mean cosine silhouette, the score of each K, the labels found at each K)."""
    units = unit_rows(coordinates)
    scores, labels = {}, {}
    for k in k_range(k_min, k_max, len(units)):
        found = spherical_labels(units, k, seed)
        labels[k] = found
        scores[k] = float(silhouette_score(units, found, metric="cosine")) if len(set(found)) > 1 else -1.0
    return max(scores, key=lambda k: (scores[k], -k)), scores, labels


def eigengap_k(cosines: np.ndarray, k_min: int, k_max: int) -> tuple[int, list[float]]:
    """K at the largest gap lambda_{K+1} - lambda_K of L = I - D^-1/2 A D^-1/2, A = max(cosine, 0), no self loops."""
    affinity = np.clip(np.asarray(cosines, dtype=np.float64), 0.0, None)
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(axis=1)
    scale = np.where(degree > ZERO_NORM, 1.0 / np.sqrt(np.maximum(degree, ZERO_NORM)), 0.0)
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian))
    ks = k_range(k_min, k_max, len(affinity))
    gaps = [float(eigenvalues[k] - eigenvalues[k - 1]) for k in ks]
    return ks.start + int(np.argmax(gaps)), gaps


def _pair_share_kept(test_labels: np.ndarray, predicted: np.ndarray) -> float:
    """Over the test clusters with a pair, the smallest share of their pairs that `predicted` also puts together."""
    shares = []
    for cluster in np.unique(test_labels):
        found = predicted[test_labels == cluster]
        if len(found) < 2:
            continue
        counts = np.bincount(found)
        shares.append(float((counts * (counts - 1)).sum()) / (len(found) * (len(found) - 1)))
    return min(shares) if shares else 0.0


def prediction_strength_k(coordinates: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float]]:
    """(K with the highest prediction strength, the larger on a tie; the strength of each K).

    K is searched up to half the rows less one, since each half must hold K clusters."""
    units = unit_rows(coordinates)
    rows = len(units)
    if rows // 2 - 1 < k_min:
        raise KRuleError(f"prediction strength at K >= {k_min} needs at least {2 * (k_min + 1)} validation rows, "
                         f"got {rows}")
    ks = k_range(k_min, min(k_max, rows // 2 - 1), rows)
    generator = np.random.default_rng(seed)
    halvings = [generator.permutation(rows) for _ in range(PREDICTION_STRENGTH_SPLITS)]
    strengths = {}
    for k in ks:
        kept = []
        for order in halvings:
            train, test = units[order[: rows // 2]], units[order[rows // 2 :]]
            fitted = [KMeans(n_clusters=k, init="k-means++", n_init=PREDICTION_STRENGTH_N_INIT, random_state=seed).fit(half)
                      for half in (train, test)]
            predicted = np.argmax(test @ unit_rows(fitted[0].cluster_centers_).T, axis=1)
            kept.append(_pair_share_kept(fitted[1].labels_, predicted))
        strengths[k] = float(np.mean(kept))
    return max(strengths, key=lambda k: (strengths[k], k)), strengths


def every_rule(singular_values: np.ndarray, coordinates: np.ndarray, cosines: np.ndarray, k_min: int, k_max: int,
               centered: bool, seed: int, needed: str = "") -> dict:
    """What each rule picks on one set of features: {"k": {rule: K}, each rule's scores, "labels" (silhouette's
    clustering at each K)}. Prediction strength needs twice the rows of the others: it is left out where it
    cannot be computed, unless `needed` names it, when its KRuleError is raised like the others'."""
    gap_k, gaps = relative_gap_k(singular_values, k_min, k_max, centered)
    silhouette, silhouettes, labels = silhouette_k(coordinates, k_min, k_max, seed)
    eigengap, eigengaps = eigengap_k(cosines, k_min, k_max)
    chosen = {"gap": gap_k, "silhouette": silhouette, "eigengap": eigengap}
    strengths = {}
    try:
        chosen["prediction_strength"], strengths = prediction_strength_k(coordinates, k_min, k_max, seed)
    except KRuleError:
        if needed == "prediction_strength":
            raise
    return {"k": chosen, "gap": gaps, "silhouette": silhouettes, "eigengap": eigengaps,
            "prediction_strength": strengths, "labels": labels}

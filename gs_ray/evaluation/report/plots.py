"""The evaluation report's plots, written as PNG with matplotlib (headless); the cluster stage's own are in
gs_ray.gradientspace.plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gs_ray.gradientspace.plots import UNLABELLED, save_figure  # noqa: E402

BAR_ZOOM_MARGIN = 0.15
"""Space above and below the values on a zoomed (not zero-based) bar axis, as a share of their range."""


def plot_cluster_distribution(clusterings: dict[str, tuple[np.ndarray, list]], path: str | Path) -> None:
    """Per clustering, each source's samples split across clusters (share of the source): the paper's Fig. 5."""
    figure, axes = plt.subplots(1, len(clusterings), figsize=(4.2 * len(clusterings), 3.8), squeeze=False)
    for axis, (name, (clusters, labels)) in zip(axes[0], clusterings.items()):
        clusters = np.asarray(clusters)
        names = np.asarray([UNLABELLED if label is None else str(label) for label in labels])
        sources = sorted(set(names))
        k = int(clusters.max()) + 1
        shares = np.array([np.bincount(clusters[names == s], minlength=k) / max(1, np.sum(names == s)) for s in sources])
        bottom = np.zeros(len(sources))
        for cluster in range(k):
            axis.bar(sources, shares[:, cluster], bottom=bottom, label=f"cluster {cluster}")
            bottom += shares[:, cluster]
        axis.set(title=name, ylabel="share of the source's samples", ylim=(0, 1))
        axis.legend(fontsize="x-small")
    save_figure(figure, path)


def plot_projection_2d(coordinates: np.ndarray, clusters: np.ndarray, labels: list, path: str | Path) -> None:
    """Unit training gradients (what Stage II clusters) on their top two principal components, by cluster and source."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    clusters = np.asarray(clusters)
    for cluster in np.unique(clusters):
        members = clusters == cluster
        left.scatter(coordinates[members, 0], coordinates[members, 1], s=10, alpha=0.7, label=f"cluster {cluster}")
    names = np.asarray([UNLABELLED if label is None else str(label) for label in labels])
    for name in sorted(set(names)):
        members = names == name
        right.scatter(coordinates[members, 0], coordinates[members, 1], s=10, alpha=0.7, label=name)
    for axis, title in ((left, "by GradientSpace cluster"), (right, "by source")):
        axis.set(xlabel="PC 1", ylabel="PC 2", title=f"Unit training gradients (PCA), {title}")
        axis.legend(fontsize="small")
    save_figure(figure, path)


def plot_method_bars(values: dict[str, dict[str, float]], ylabel: str, title: str, path: str | Path,
                     *, zero_based: bool = True, upper: float | None = None) -> None:
    """Grouped bars: one group per source, one bar per method; zero_based=False zooms on the values' range."""
    sources = sorted({source for per_source in values.values() for source in per_source})
    figure, axis = plt.subplots(figsize=(max(6.0, 1.8 * len(sources) + 3), 4.0))
    width = 0.8 / max(1, len(values))
    positions = np.arange(len(sources))
    for index, (method, per_source) in enumerate(values.items()):
        heights = [per_source.get(source, np.nan) for source in sources]
        bars = axis.bar(positions + (index - (len(values) - 1) / 2) * width, heights, width, label=method)
        if zero_based:  # a bar of height 0 is invisible: its label says it was measured
            axis.bar_label(bars, fmt="%.2f", fontsize="xx-small", rotation=90, padding=2)
    found = np.array([v for per_source in values.values() for v in per_source.values()], dtype=float)
    found = found[np.isfinite(found)]
    if not zero_based and len(found):
        # Losses of trained methods differ by a few percent: a zero-based axis would hide every difference.
        margin = BAR_ZOOM_MARGIN * max(float(np.ptp(found)), float(np.abs(found).max()) * 1e-3)
        axis.set_ylim(found.min() - margin, found.max() + margin)
    elif zero_based:
        axis.set_ylim(0, upper)  # upper None: matplotlib's own top
    axis.set(xticks=positions, xticklabels=sources, ylabel=ylabel, title=title)
    axis.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(figure, path)


def plot_training_curves(curves: dict[str, list[list[float]]], path: str | Path) -> None:
    """Training loss against optimizer step, one line per trained adapter."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        if curve:
            steps, losses = zip(*curve)
            axis.plot(steps, losses, marker="o", markersize=3, label=name)
    axis.set(xlabel="optimizer step", ylabel="training loss (mean over the logging window)", title="Training curves")
    axis.legend(fontsize="x-small", ncol=2)
    save_figure(figure, path)


def plot_cosine_pairs(gradient: list[float], embedding: list[float], same_source: list[bool], path: str | Path) -> None:
    """Gradient cosine against request-embedding cosine for sample pairs (the paper's Fig. 4 analogue)."""
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    same = np.asarray(same_source, dtype=bool)
    gradient, embedding = np.asarray(gradient), np.asarray(embedding)
    axis.scatter(embedding[~same], gradient[~same], s=6, alpha=0.4, label="different sources")
    axis.scatter(embedding[same], gradient[same], s=6, alpha=0.4, label="same source")
    axis.set(xlabel="embedding cosine (all-MiniLM-L6-v2)", ylabel="LoRA gradient cosine", title="Sample pairs")
    axis.legend(fontsize="small")
    save_figure(figure, path)

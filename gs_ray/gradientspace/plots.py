"""The cluster stage's plots (spectrum and K, cluster sizes), written as PNG with matplotlib (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURE_DPI = 120
SPECTRUM_VALUES_SHOWN = 40
"""Leading singular values drawn: the gap rule never looks further than k_max + 1."""
UNLABELLED = "(no label)"


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def plot_spectrum(singular_values: list[float], gaps: dict[int, float], k: int, rule: str, path: str | Path) -> None:
    """Singular values of the validation gradients (log scale) and the relative gaps the K rule compared."""
    values = np.asarray(singular_values[:SPECTRUM_VALUES_SHOWN])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    index = np.arange(1, len(values) + 1)
    left.semilogy(index, values, marker="o", markersize=3)
    left.axvline(k + 0.5, color="tab:red", linestyle="--", label=f"K = {k}")
    left.set(xlabel="index j", ylabel="singular value s_j", title="Validation gradient spectrum")
    left.legend()
    if gaps:
        positions = sorted(gaps)
        right.bar(positions, [gaps[j] for j in positions], color="tab:gray")
        right.set(xlabel="j", ylabel="(s_j - s_{j+1}) / s_j", title="Relative gaps searched")
        right.text(0.98, 0.95, f"rule: {rule}", ha="right", va="top", fontsize="small", wrap=True,
                   transform=right.transAxes)
    else:
        right.text(0.5, 0.5, f"K fixed by config: {k}", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    save_figure(figure, path)


def plot_cluster_sizes(clusters: np.ndarray, labels: list[str | None] | None, k: int, path: str | Path) -> None:
    """Samples per cluster, stacked by source label when the data has one."""
    clusters = np.asarray(clusters)
    figure, axes = plt.subplots(figsize=(max(5, 0.6 * k + 3), 3.8))
    positions = np.arange(k)
    names = [UNLABELLED if label is None else str(label) for label in labels] if labels is not None else None
    if names is None or set(names) == {UNLABELLED}:
        axes.bar(positions, np.bincount(clusters, minlength=k), color="tab:blue")
    else:
        bottom = np.zeros(k)
        for name in sorted(set(names)):
            mask = np.array([n == name for n in names])
            counts = np.bincount(clusters[mask], minlength=k)
            axes.bar(positions, counts, bottom=bottom, label=name)
            bottom += counts
        axes.legend(title="label", fontsize="small")
    axes.set(xlabel="cluster", ylabel="samples", title=f"Cluster sizes ({len(clusters)} samples)", xticks=positions)
    save_figure(figure, path)

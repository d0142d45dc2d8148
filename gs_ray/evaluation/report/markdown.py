"""The report stage: `report/report.md` with the evaluation's tables and PNG plots, from finished stages only.

It states plainly, with the numbers and the interval of each difference, every source and
metric where routed GradientSpace does not clearly beat another method, and whether its
clusters reduce gradient variance more than the baselines'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.layout import EVALUATION_FILE, SINGLE_LORA
from gs_ray.core.rundir import RunDir
from gs_ray.evaluation.analysis import cosine_matrix, load_analysis, pca_2d
from gs_ray.evaluation.baselines import BASELINE_METHODS, BaselineRun
from gs_ray.evaluation.diagnostics import PAIRS_FILE
from gs_ray.evaluation.evaluate import CONFIDENCE
from gs_ray.evaluation.report import plots as report
from gs_ray.gradientspace.plots import plot_spectrum

PLOTS = {
    "spectrum": layout.SPECTRUM_PLOT, "clusters": "cluster_distribution.png", "projection": "gradients_2d.png",
    "loss": "loss_per_source.png", "exact_match": "exact_match_per_source.png", "curves": "training_curves.png",
    "pairs": "cosine_pairs.png",
}
DIGITS = 4


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{DIGITS}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def methods_table(evaluation: dict[str, Any]) -> str:
    """One row per method: loss per token overall and per source, exact match overall and per checkable source."""
    sources = evaluation["sources"]
    checked = sorted({s for result in evaluation["methods"].values() for s in result["exact_match_per_source"]})
    header = ["method", "loss (all)", *[f"loss {s}" for s in sources], "exact match (all)",
              *[f"EM {s}" for s in checked]]
    rows = [[method, result["loss"], *[result["per_source"].get(s) for s in sources], result["exact_match"],
             *[result["exact_match_per_source"].get(s) for s in checked]]
            for method, result in evaluation["methods"].items()]
    return _table(header, rows)


def clusterings_table(evaluation: dict[str, Any]) -> str:
    """One row per clustering: K, sizes, agreement with the sources, router accuracy, variance ratios."""
    rows = []
    for name, found in evaluation["diagnostics"]["clusterings"].items():
        agreement = found.get("agreement") or {}
        rows.append([name, found["k"], str(found.get("sizes", "-")), agreement.get("purity"), agreement.get("nmi"),
                     agreement.get("ari"), evaluation["router_accuracy"].get(name), found["variance_ratio"],
                     found["variance_ratio_normalized"]])
    return _table(["clustering", "K", "sizes", "purity", "NMI", "ARI", "router accuracy (eval)",
                   "variance ratio (raw grads)", "variance ratio (unit grads)"], rows)


def shortfalls(evaluation: dict[str, Any]) -> list[str]:
    """Plain sentences for every comparison routed GradientSpace does not clearly win, with the numbers.

    A clear win is a better point estimate whose interval of the difference clears zero; a better point
    estimate inside the noise is listed too, as level.
    """
    lines = []
    for found in evaluation["comparisons"]:
        sentence = _shortfall(found)
        if sentence:
            lines.append(f"- {found['source']}, {sentence}")
    clusterings = evaluation["diagnostics"]["clusterings"]
    ours = clusterings["gradientspace"]["variance_ratio_normalized"]
    for name in ("embedding", "random_projection"):
        theirs = clusterings[name]["variance_ratio_normalized"]
        if not ours < theirs:
            lines.append(f"- Gradient variance: GradientSpace clusters keep {ours:.{DIGITS}f} of the unit-gradient "
                         f"variance, {name} clusters {theirs:.{DIGITS}f}: no larger variance reduction than {name}.")
    return lines


def _shortfall(found: dict[str, Any]) -> str | None:
    """One comparison as a sentence, or None where routed GradientSpace clearly wins it."""

    interval = found.get("interval")  # absent from evaluations written before the intervals were added
    verdict = found.get("verdict", "better" if found["routed_better"] else "worse")
    if found["routed_better"] and verdict == "better":
        return None
    what = "loss per token (lower is better)" if found["metric"] == "loss" else "exact match (higher is better)"
    outcome = "a tie" if found["routed"] == found["other"] else verdict
    if interval is not None:
        outcome += (f"; routed minus {found['against']} {found['difference']:+.{DIGITS}f}, {CONFIDENCE:.0%} "
                    f"interval [{interval[0]:+.{DIGITS}f}, {interval[1]:+.{DIGITS}f}]")
    return (f"{what}: routed GradientSpace {found['routed']:.{DIGITS}f} vs {found['against']} "
            f"{found['other']:.{DIGITS}f} ({outcome}): GradientSpace does not clearly beat {found['against']}.")


def _assignments(folder: Path) -> tuple[np.ndarray, list]:
    table = pq.read_table(folder / layout.ASSIGNMENTS_FILE, columns=["sample_id", "cluster", "label"])
    return np.asarray(table["cluster"]), table["label"].to_pylist()


def _plot_all(run: RunDir, evaluation: dict[str, Any], out: Path) -> list[str]:
    spectrum = json.loads((run.stage_dir("cluster") / layout.SPECTRUM_FILE).read_text())
    offset = spectrum["gap_index_offset"]
    plot_spectrum(spectrum["singular_values"], {offset + i: g for i, g in enumerate(spectrum["gaps"])},
                  spectrum["k"], spectrum["k_rule"], out / PLOTS["spectrum"])
    runs = {"gradientspace": run} | {name: BaselineRun(run, name) for name in BASELINE_METHODS}
    report.plot_cluster_distribution({name: _assignments(found.stage_dir("cluster")) for name, found in runs.items()},
                                     out / PLOTS["clusters"])
    arrays, rows = load_analysis(run.stage_dir("analysis"))
    train = [i for i, split in enumerate(rows["split"]) if split == "train"]
    table = pq.read_table(run.stage_dir("cluster") / layout.ASSIGNMENTS_FILE, columns=["sample_id", "cluster"])
    cluster_of = dict(zip(table["sample_id"].to_pylist(), table["cluster"].to_pylist()))
    # Unit gradients, as Stage II clusters them: raw norms would let a few long-tailed samples fill the plot.
    report.plot_projection_2d(pca_2d(cosine_matrix(arrays["gram"][np.ix_(train, train)])),
                              np.asarray([cluster_of[rows["sample_id"][i]] for i in train]),
                              [rows["label"][i] for i in train], out / PLOTS["projection"])
    methods = evaluation["methods"]
    report.plot_method_bars({m: r["per_source"] | {"all": r["loss"]} for m, r in methods.items()},
                            "loss per target token", "Held-out loss per source (lower is better; axis not from 0)",
                            out / PLOTS["loss"], zero_based=False)
    plots = ["spectrum", "clusters", "projection", "loss"]
    if any(r["exact_match_per_source"] for r in methods.values()):
        report.plot_method_bars({m: r["exact_match_per_source"] for m, r in methods.items()}, "exact match",
                                "Exact match per source (higher is better)", out / PLOTS["exact_match"],
                                upper=1.0)
        plots.append("exact_match")
    report.plot_training_curves(_curves(runs, run), out / PLOTS["curves"])
    pairs = pq.read_table(run.stage_dir("evaluate") / PAIRS_FILE).to_pydict()
    report.plot_cosine_pairs(pairs["gradient"], pairs["embedding"], pairs["same_source"], out / PLOTS["pairs"])
    return [*plots, "curves", "pairs"]


def _curves(runs: dict[str, RunDir], run: RunDir) -> dict[str, list]:
    """Loss curves of every expert of every clustering, and of the one-LoRA baseline."""

    curves = {}
    for name, found in runs.items():
        for metrics in sorted(found.stage_dir("experts").glob(f"{layout.EXPERT_PREFIX}*/{layout.TRAIN_METRICS_FILE}")):
            curves[f"{name} {metrics.parent.name}"] = json.loads(metrics.read_text()).get("loss_curve", [])
    single = run.stage_dir("single_lora") / layout.TRAIN_METRICS_FILE
    curves[SINGLE_LORA] = json.loads(single.read_text()).get("loss_curve", [])
    return curves


def _structure_lines(structure: dict[str, Any] | None) -> list[str]:
    """Local against global source structure of the training gradients (absent from older evaluations)."""
    if not structure:
        return []
    nearest = structure["nearest_same_source"]
    shares = ", ".join(f"{share:.3f}" for share in structure["top_component_shares"])
    return ["## Where the sources sit in gradient space", "",
            f"Nearest neighbour from the same source: {_fmt(nearest['gradient'])} by gradient cosine, "
            f"{_fmt(nearest['embedding'])} by embedding cosine (chance {_fmt(structure['chance'])}). "
            f"Variance shares of the top principal components of the unit training gradients: {shares}. "
            "Centroid clusterings (GradientSpace, the baselines) can only separate sources that those top "
            "components carry; a high nearest-neighbour figure with flat shares means the sources are "
            "separable locally but not by centroids.", ""]


CHECK_RULES = {
    "number": "reference ends with `#### number`; MBPP code is not executed (no sandbox), so MBPP has loss only",
    "text": "the whole reply against the reference",
}
"""What the report says each evaluate.answer_check rule scores."""


def render(cfg: Config, evaluation: dict[str, Any], plots: list[str]) -> str:
    """The report's Markdown text."""
    pairs = evaluation["diagnostics"]["cosine_pairs"]
    gaps = shortfalls(evaluation)
    lines = [
        "# GradientSpace evaluation", "",
        f"Model `{cfg.model.name}`, LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}; "
        f"{evaluation['eval_samples']} held-out samples ({', '.join(evaluation['sources'])}); exact match on "
        f"{evaluation['exact_match_samples']} checkable samples ({CHECK_RULES[cfg.evaluate.answer_check]}), greedy, "
        f"at most {cfg.evaluate.max_new_tokens} new tokens.",
        f"Optimizer steps: {json.dumps(evaluation['training_steps'])} (the one LoRA gets the experts' total).", "",
        "## Methods on held-out data", "", methods_table(evaluation), "",
        "base: no adapter. single_lora: one LoRA on the whole training split. embedding / random_projection: experts "
        "of MiniLM-embedding / Rademacher-projected-gradient k-means clusters (same K), each routed by its own router. "
        "routed: GradientSpace expert picked by the router. ensemble: all GradientSpace experts mixed by router "
        "probabilities. oracle: each sample's own gradient cluster's expert.", "",
        "## Where GradientSpace does not clearly beat a baseline", "",
        *(gaps or ["- Routed GradientSpace clearly beats every other method on every source and metric "
                   "measured here."]), "",
        "## Clusterings", "", clusterings_table(evaluation), "",
        "Variance ratio: mean within-cluster variance of the training gradients over their whole-set variance "
        "(lower: the clusters explain more of how gradients differ); `source_labels` groups by the true source.", "",
        "## Gradient vs embedding similarity (sample pairs)", "",
        _table(["representation", "same-source mean cosine", "cross-source mean cosine", "separation"],
               [[name, pairs[name]["same_source_mean"], pairs[name]["cross_source_mean"], pairs[name]["separation"]]
                for name in ("gradient", "embedding")]), "",
        f"{pairs['pairs']} pairs ({pairs['same_source_pairs']} same-source); Pearson correlation of the two cosines: "
        f"{_fmt(pairs.get('pearson'))}.", "",
        *_structure_lines(evaluation["diagnostics"].get("source_structure")),
        "## Plots", "",
    ]
    lines += [f"![{name}]({PLOTS[name]})" for name in plots]
    return "\n".join(lines) + "\n"


def build_report(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    """Write report.md and its PNGs into the staging folder."""

    evaluation = json.loads((run.stage_dir("evaluate") / EVALUATION_FILE).read_text())
    plots = _plot_all(run, evaluation, staging)
    (staging / layout.REPORT_FILE).write_text(render(cfg, evaluation, plots), encoding="utf-8")
    return {"report": f"report/{layout.REPORT_FILE}", "plots": [PLOTS[name] for name in plots],
            "shortfalls": len(shortfalls(evaluation))}

"""`gs-ray evaluate`: the stages after the router that compare GradientSpace with its baselines.

In order, each skipped when its manifest is current (so a killed evaluation resumes):

    analysis                          train + eval gradients -> Gram matrix, random projections
    baselines/embedding/{cluster, experts, router}
    baselines/random_projection/{cluster, experts, router}
    evaluate                          one-LoRA baseline; every method on the held-out split
    report                            report/report.md and its PNG plots

The baselines' experts and router are the pipeline's own stages run on a `BaselineRun`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gs_ray.baselines import BASELINE_METHODS, BASELINES_DIRNAME, CLUSTER_STAGES, BaselineRun
from gs_ray.config import Config
from gs_ray.pipeline import EXPERTS, ROUTER, RUN_LAST_STAGE, STAGES, RunDir, Stage, bring_up_to_date, run_stages


def _build_analysis(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    from gs_ray.gradient_analysis import build_analysis

    return build_analysis(cfg, run, staging)


def _describe_analysis(summary: dict[str, Any]) -> str:
    return (f"gradients of {summary['rows']} samples (d = {summary['dim']}) -> Gram matrix and "
            f"{summary['projection_dim']}-dim Rademacher projections")


def _build_evaluate(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    from gs_ray.evaluate import evaluate_run

    return evaluate_run(cfg, run, staging)


def _describe_evaluate(summary: dict[str, Any]) -> str:
    parts = []
    for method, result in summary["methods"].items():
        exact = result.get("exact_match")
        parts.append(f"{method} {result['loss']:.3f}" + (f" (EM {exact:.2f})" if exact is not None else ""))
    return f"held-out loss per token (exact match): {', '.join(parts)}"


def _build_report(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    from gs_ray.report_markdown import build_report

    return build_report(cfg, run, staging)


def _describe_report(summary: dict[str, Any]) -> str:
    return f"{summary['report']} with {len(summary['plots'])} plots"


def baseline_stage_name(method: str, stage: str) -> str:
    """A baseline stage's folder relative to the run dir, which is also its name in manifests and logs."""
    return f"{BASELINES_DIRNAME}/{method}/{stage}"


ANALYSIS = Stage("analysis", ("model", "grads", "baselines"), ("data", "warmup"), _build_analysis, _describe_analysis)
EVALUATE = Stage(
    "evaluate", ("model", "lora", "train", "experts", "evaluate"),
    ("data", "warmup", "cluster", "experts", "router", "analysis",
     *(baseline_stage_name(method, "router") for method in BASELINE_METHODS)),
    _build_evaluate, _describe_evaluate,
)
REPORT = Stage("report", (), ("evaluate",), _build_report, _describe_report)


def describe_stage(name: str, summary: dict[str, Any]) -> str:
    """The one-line description of any stage's summary, pipeline or evaluation, by its name."""
    stages = STAGES | {stage.name: stage for stage in (ANALYSIS, EVALUATE, REPORT)}
    if name in stages:
        return stages[name].describe(summary)
    stage = name.rsplit("/", 1)[-1]
    return (CLUSTER_STAGES[BASELINE_METHODS[0]] if stage == "cluster" else STAGES[stage]).describe(summary)


def _run_baseline(cfg: Config, run: RunDir, method: str) -> dict[str, dict[str, Any]]:
    """One baseline's cluster, experts and router stages, brought up to date in order."""
    baseline, manifests = BaselineRun(run, method), {}
    for stage in (CLUSTER_STAGES[method], EXPERTS, ROUTER):
        name = baseline_stage_name(method, stage.name)
        manifests[name] = bring_up_to_date(cfg, baseline, stage, label=name)
    return manifests


def run_evaluation(cfg: Config, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Bring the pipeline, then every evaluation stage, up to date; `force` rebuilds evaluate and report."""
    manifests = run_stages(cfg, RUN_LAST_STAGE)
    run = RunDir(cfg.run.run_dir)
    manifests["analysis"] = bring_up_to_date(cfg, run, ANALYSIS)
    # The baselines side by side, each in its own thread: their expert jobs then share the cluster's
    # free resources (on a laptop most of an expert job is Ray Train start-up, which overlaps well).
    with ThreadPoolExecutor(max_workers=len(BASELINE_METHODS)) as pool:
        for found in list(pool.map(lambda method: _run_baseline(cfg, run, method), BASELINE_METHODS)):
            manifests |= found
    manifests["evaluate"] = bring_up_to_date(cfg, run, EVALUATE, force=force)
    manifests["report"] = bring_up_to_date(cfg, run, REPORT, force=force)
    return manifests

"""`gs-ray evaluate`: the stages after the router that compare GradientSpace with its baselines.

In order, each skipped when its manifest is current (so a killed evaluation resumes):

    analysis                          train + eval gradients -> Gram matrix, random projections
    baselines/embedding/{cluster, experts, router}
    baselines/random_projection/{cluster, experts, router}
    single_lora                       one LoRA on every training sample, the experts' total steps
    evaluate                          every method on the held-out split
    report                            report/report.md and its PNG plots

The baselines' experts and router are the pipeline's own stages run on a `BaselineRun`. The
baselines (analysis first where a clustering reads it) are built side by side, in threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gs_ray.config import Config
from gs_ray.core.rundir import RunDir, Stage, bring_up_to_date
from gs_ray.evaluation.analysis import build_analysis
from gs_ray.evaluation.baselines import BASELINE_METHODS, BASELINES_DIRNAME, CLUSTER_STAGES, BaselineRun
from gs_ray.evaluation.evaluate import evaluate_run, train_single_lora
from gs_ray.evaluation.report.markdown import build_report
from gs_ray.stages.experts import EXPERTS
from gs_ray.stages.pipeline import RUN_LAST_STAGE, STAGES, run_stages
from gs_ray.stages.router import ROUTER


def _build_analysis(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    return build_analysis(cfg, run, staging)


def _describe_analysis(summary: dict[str, Any]) -> str:
    return (f"gradients of {summary['rows']} samples (d = {summary['dim']}) -> Gram matrix (whole and per block) and "
            f"{summary['projection_dim']}-dim Rademacher projections")


def _build_single_lora(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    return train_single_lora(cfg, run, staging)


def _describe_single_lora(summary: dict[str, Any]) -> str:
    return (f"{summary['step']} steps on {summary['train_samples']} samples; held-out loss "
            f"{summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}")


def _build_evaluate(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    return evaluate_run(cfg, run, staging)


def _describe_evaluate(summary: dict[str, Any]) -> str:
    parts = []
    for method, result in summary["methods"].items():
        exact = result.get("exact_match")
        parts.append(f"{method} {result['loss']:.3f}" + (f" (EM {exact:.2f})" if exact is not None else ""))
    return f"held-out loss per token (exact match): {', '.join(parts)}"


def _build_report(cfg: Config, run: RunDir, staging) -> dict[str, Any]:
    return build_report(cfg, run, staging)


def _describe_report(summary: dict[str, Any]) -> str:
    return f"{summary['report']} with {len(summary['plots'])} plots"


def baseline_stage_name(method: str, stage: str) -> str:
    """A baseline stage's folder relative to the run dir, which is also its name in manifests and logs."""
    return f"{BASELINES_DIRNAME}/{method}/{stage}"


ANALYSIS = Stage("analysis", ("model", "grads", "baselines"), ("data", "warmup"), _build_analysis, _describe_analysis)
SINGLE_LORA_STAGE = Stage("single_lora", ("model", "lora", "train", "experts"), ("data", "warmup", "experts"),
                          _build_single_lora, _describe_single_lora)
EVALUATE = Stage(
    "evaluate", ("model", "lora", "train", "evaluate"),
    ("data", "warmup", "cluster", "experts", "router", "analysis", "single_lora",
     *(baseline_stage_name(method, "router") for method in BASELINE_METHODS)),
    _build_evaluate, _describe_evaluate,
)
REPORT = Stage("report", (), ("evaluate",), _build_report, _describe_report)


def describe_stage(name: str, summary: dict[str, Any]) -> str:
    """The one-line description of any stage's summary, pipeline or evaluation, by its name."""
    stages = STAGES | {stage.name: stage for stage in (ANALYSIS, SINGLE_LORA_STAGE, EVALUATE, REPORT)}
    if name in stages:
        return stages[name].describe(summary)
    stage = name.rsplit("/", 1)[-1]
    return (CLUSTER_STAGES[BASELINE_METHODS[0]] if stage == "cluster" else STAGES[stage]).describe(summary)


def _baseline_chains(run: RunDir) -> list[list[tuple[str, RunDir, Stage]]]:
    """(label, run, stage) lists that are each built in order, and side by side with one another.

    A baseline's clustering that reads the analysis stage builds after it, in the same chain; evaluate
    reads it too, so it is built in any case.
    """
    chains: list[list[tuple[str, RunDir, Stage]]] = [[(SINGLE_LORA_STAGE.name, run, SINGLE_LORA_STAGE)]]
    for method in BASELINE_METHODS:
        baseline = BaselineRun(run, method)
        chain = [(baseline_stage_name(method, stage.name), baseline, stage)
                 for stage in (CLUSTER_STAGES[method], EXPERTS, ROUTER)]
        if ANALYSIS.name in CLUSTER_STAGES[method].upstream:
            chain.insert(0, (ANALYSIS.name, run, ANALYSIS))
        chains.append(chain)
    if not any(label == ANALYSIS.name for chain in chains for label, _, _ in chain):
        chains.append([(ANALYSIS.name, run, ANALYSIS)])
    return chains


def _build_chain(cfg: Config, chain: list[tuple[str, RunDir, Stage]]) -> dict[str, dict[str, Any]]:
    return {label: bring_up_to_date(cfg, owner, stage, label=label) for label, owner, stage in chain}


def run_evaluation(cfg: Config, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Bring the pipeline, then every evaluation stage, up to date; `force` rebuilds evaluate and report."""
    manifests = run_stages(cfg, RUN_LAST_STAGE)
    run = RunDir(cfg.run.run_dir)
    # Side by side, the baselines' Train jobs share the cluster's free resources (on a laptop most of a
    # job is Ray Train start-up, which overlaps well).
    chains = _baseline_chains(run)
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        for found in list(pool.map(lambda chain: _build_chain(cfg, chain), chains)):
            manifests |= found
    manifests["evaluate"] = bring_up_to_date(cfg, run, EVALUATE, force=force)
    manifests["report"] = bring_up_to_date(cfg, run, REPORT, force=force)
    return manifests

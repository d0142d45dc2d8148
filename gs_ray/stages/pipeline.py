"""The pipeline: its stages in order, and bringing them up to date in a run directory."""

from __future__ import annotations

from typing import Any

from gs_ray.config import Config
from gs_ray.core.errors import ConfigError
from gs_ray.core.rundir import RunDir, Stage, bring_up_to_date
from gs_ray.stages.cluster import CLUSTER
from gs_ray.stages.data import DATA
from gs_ray.stages.experts import EXPERTS
from gs_ray.stages.router import ROUTER
from gs_ray.stages.warmup import WARMUP

STAGES: dict[str, Stage] = {stage.name: stage for stage in (DATA, WARMUP, CLUSTER, EXPERTS, ROUTER)}
"""Every pipeline stage, in order. Evaluation's stages (baselines, metrics, report) are gs_ray.evaluation.stages'."""
RUN_LAST_STAGE = "router"
"""Where `gs-ray run` stops: evaluation trains baselines too, so it runs when asked (`gs-ray evaluate`)."""


def run_stages(cfg: Config, last: str, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Bring every stage up to `last` up to date; return their manifests.

    Requires an initialised Ray. Stages that are current are skipped unless `force`
    (which rebuilds only `last`). The evaluation's stages are gs_ray.evaluation.stages.run_evaluation's.
    """
    if last not in STAGES:
        raise ConfigError(f"unknown stage {last!r}; stages: {', '.join(STAGES)}")
    run = RunDir(cfg.run.run_dir)
    run.save_config(cfg)
    names = list(STAGES)
    return {name: bring_up_to_date(cfg, run, STAGES[name], force=force and name == last)
            for name in names[: names.index(last) + 1]}

"""Every file and folder name a stage writes into the run directory, and the ids that name experts.

One place for them: a stage writes with these names and every later stage, the evaluation,
the server and the tests read with the same ones. Files that belong to one saved object
(a router folder's own files, a Ray Train checkpoint's) are named by the code that saves it.
"""

from __future__ import annotations

import re
from pathlib import Path

# Pipeline stages: each is a folder of the run directory.
DATA_STAGE, WARMUP_STAGE, CLUSTER_STAGE, EXPERTS_STAGE, ROUTER_STAGE = "data", "warmup", "cluster", "experts", "router"

ADAPTER_DIRNAME = "adapter"
"""A PEFT adapter folder inside a training job's output (warm-up, each expert, the one LoRA)."""
TRAIN_METRICS_FILE = "train_metrics.json"
"""A training job's metrics next to its adapter."""

ASSIGNMENTS_FILE = "assignments.parquet"
"""Cluster stage: sample_id, cluster, similarity, label of every training sample."""
EVAL_ASSIGNMENTS_FILE = "eval_assignments.parquet"
"""Cluster stage: the same for the held-out split, against the final centroids."""
CENTROIDS_FILE = "centroids.safetensors"
"""Cluster stage: the final centroids (and the feature mean)."""
SPECTRUM_FILE = "spectrum.json"
"""Cluster stage: the validation spectrum, K and the rule that chose it."""
SPECTRUM_PLOT = "spectrum.png"
CLUSTER_SIZES_PLOT = "cluster_sizes.png"

EXPERTS_FILE = "experts.json"
"""Experts stage: the plan (cluster -> expert, steps) and each expert's metrics."""
EXPERT_PREFIX = "expert-"
EXPERT_ID = re.compile(r"expert-(0|[1-9][0-9]{0,5})")
"""An expert's id: its folder in the experts stage and its adapter name when served."""
BASE_ID = "base"
"""The base model without any adapter, wherever a method or a served model is named."""

ROUTER_DIRNAME = "router"
"""Router stage: the saved router folder (its own files are the router's)."""
ROUTER_METRICS_FILE = "router_metrics.json"

EVALUATION_FILE = "evaluation.json"
ANSWERS_FILE = "answers.jsonl"
REPORT_FILE = "report.md"
SINGLE_LORA = "single-lora"
"""The one-LoRA baseline's adapter name in the evaluation."""


def expert_id(k: int) -> str:
    return f"{EXPERT_PREFIX}{k}"


def expert_dir(experts_stage: Path, k: int | str) -> Path:
    """Expert k's folder (k an index or an expert id) inside the experts stage folder."""
    return Path(experts_stage) / (k if isinstance(k, str) else expert_id(k))


def expert_adapter_dir(experts_stage: Path, k: int | str) -> Path:
    return expert_dir(experts_stage, k) / ADAPTER_DIRNAME

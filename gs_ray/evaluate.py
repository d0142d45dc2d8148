"""How well a run's clusters and experts do against what the data says (labels are for evaluation only).

`label_agreement` scores clusters against source labels. The evaluate stage
(`gs-ray evaluate`) trains the one-LoRA baseline with the experts' total optimizer steps
through the same loop, then measures held-out loss per target token, overall and per
source label, for the base model, that baseline, routed experts (the router's pick per
request) and oracle routing (each sample's own cluster's expert).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from gs_ray.config import Config
from gs_ray.errors import DataError


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


# ---------------------------------------------------------------- the evaluate stage

SINGLE_LORA = "single-lora"
"""Folder (and adapter name) of the baseline: one LoRA on the whole train split, the experts' total steps."""
BASE = "base"
"""The base model without any adapter."""
METHODS = ("base", "single_lora", "routed", "oracle")
"""routed: each held-out sample to the expert the router picks from its request text;
oracle: to its own gradient cluster's expert (what a perfect router would give)."""
EVALUATION_FILE = "evaluation.json"


def _train_single_lora(cfg: Config, run: Any, staging: Path, steps: int) -> dict[str, Any]:
    """The baseline through the same loop as warm-up and experts: all training samples, the same total steps."""
    from gs_ray.experts import expert_init_adapter
    from gs_ray.train import TrainJob, run_training

    data_dir = run.stage_dir("data")
    job = TrainJob(
        name=f"{SINGLE_LORA}-{cfg.digest(['experts', 'train'])}-{run.manifest('experts')['digest']}",
        train_split=run.shared(data_dir / "train"),
        eval_split=run.shared(data_dir / "eval"),
        output_dir=str(staging / SINGLE_LORA),
        storage_path=run.ray_train_storage,
        max_steps=steps,
        learning_rate=cfg.experts.learning_rate,
        init_adapter=expert_init_adapter(cfg, run),
        seed=cfg.run.seed,
    )
    return run_training(cfg, job).metrics


def sample_losses(cfg: Config, adapters: dict[str, str], rows_by_adapter: dict[str, list[dict]]) -> dict[str, dict]:
    """{adapter: {sample_id: (summed target-token loss, target tokens)}}; BASE means no adapter.

    One base model holds every adapter (PEFT named adapters), as a serving replica does.
    """
    import torch

    from gs_ray.data import pad_batch
    from gs_ray.models import load_adapter, load_base_model, load_tokenizer
    from gs_ray.train import token_losses

    model = load_base_model(cfg.model)
    for name, path in adapters.items():
        model = load_adapter(model, path, adapter_name=name)
    model.eval()
    pad_id = load_tokenizer(cfg.model).pad_token_id or 0
    batch_size = cfg.train.micro_batch_size
    out: dict[str, dict] = {}
    for name, rows in rows_by_adapter.items():
        found = out.setdefault(name, {})
        context = model.disable_adapter() if name == BASE else contextlib.nullcontext()
        if name != BASE:
            model.set_adapter(name)
        with torch.no_grad(), context:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                losses, mask = token_losses(model, pad_batch(chunk, pad_id))
                for row, loss, count in zip(chunk, losses.sum(1).tolist(), mask.sum(1).tolist()):
                    found[row["sample_id"]] = (loss, count)
    return out


def _per_source(rows: list[dict], choice: list[str], losses: dict[str, dict]) -> dict[str, Any]:
    """Loss per target token over all rows and per source label, each row scored under its chosen adapter."""
    totals: dict[str, list[float]] = {}
    for row, adapter in zip(rows, choice):
        loss, count = losses[adapter][row["sample_id"]]
        for key in ("all", row["label"] or "unlabelled"):
            total = totals.setdefault(key, [0.0, 0])
            total[0] += loss
            total[1] += count
    per_token = {key: loss / max(count, 1) for key, (loss, count) in totals.items()}
    return {"loss": per_token.pop("all"), "per_source": dict(sorted(per_token.items()))}


def _routes(run: Any, rows: list[dict], expert_of_cluster: list[int]) -> tuple[list[int], list[int]]:
    """Expert of every held-out row: the router's pick, and its own cluster's (oracle)."""
    from gs_ray.router import Router, request_text

    assigned = pq.read_table(run.stage_dir("cluster") / "eval_assignments.parquet", columns=["sample_id", "cluster"])
    cluster_of = dict(zip(assigned["sample_id"].to_pylist(), assigned["cluster"].to_pylist()))
    router = Router.load(run.stage_dir("router") / "router")
    routed, _ = router.predict([request_text(json.loads(row["messages"])) for row in rows])
    return [int(e) for e in routed], [expert_of_cluster[cluster_of[row["sample_id"]]] for row in rows]


def evaluate_run(cfg: Config, run: Any, staging: Path) -> dict[str, Any]:
    """Held-out loss per source of base, one LoRA, routed experts and oracle routing; write evaluation.json."""
    import ray

    from gs_ray.data import load_split
    from gs_ray.experts import EXPERTS_FILE

    rows = load_split(str(run.stage_dir("data") / "eval"))
    if not rows:
        raise DataError("the eval split is empty: nothing to evaluate (raise data.eval_fraction)")
    record = json.loads((run.stage_dir("experts") / EXPERTS_FILE).read_text())
    experts = record["experts"]
    steps = sum(expert["steps"] for expert in experts)
    single = _train_single_lora(cfg, run, staging, steps)
    routed, oracle = _routes(run, rows, record["expert_of_cluster"])
    choices = {"base": [BASE] * len(rows), "single_lora": [SINGLE_LORA] * len(rows),
               "routed": [f"expert-{e}" for e in routed], "oracle": [f"expert-{e}" for e in oracle]}
    adapters = {f"expert-{e['expert']}": str(run.stage_dir("experts") / f"expert-{e['expert']}" / "adapter") for e in experts}
    adapters[SINGLE_LORA] = str(staging / SINGLE_LORA / "adapter")
    needed: dict[str, dict[str, dict]] = {}  # adapter -> the rows it must score, by sample_id
    for choice in choices.values():
        for row, adapter in zip(rows, choice):
            needed.setdefault(adapter, {})[row["sample_id"]] = row
    resources = {"num_cpus": cfg.train.cpus_per_worker, "num_gpus": 1 if cfg.train.use_gpu else 0}
    losses = ray.get(ray.remote(sample_losses).options(**resources).remote(
        cfg, adapters, {name: list(found.values()) for name, found in needed.items()}))
    methods = {method: _per_source(rows, choices[method], losses) for method in METHODS}
    single_sources, routed_sources = methods["single_lora"]["per_source"], methods["routed"]["per_source"]
    summary = {
        "methods": methods,
        "router_accuracy": float(np.mean(np.asarray(routed) == np.asarray(oracle))),
        "routed_beats_single_lora_on": [s for s in routed_sources if routed_sources[s] < single_sources[s]],
        "sources": sorted(routed_sources),
        "single_lora_steps": steps,
        "single_lora_eval_loss_end": single.get("eval_loss_end"),
        "eval_samples": len(rows),
    }
    (staging / EVALUATION_FILE).write_text(json.dumps(summary, indent=2))
    return summary

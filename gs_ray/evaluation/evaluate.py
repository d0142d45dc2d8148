"""How well a run's clusters and experts do against what the data says (labels are for evaluation only).

`train_single_lora` trains the
one-LoRA baseline (its own stage) with the experts' total optimizer steps through the same
loop. The evaluate stage (`gs-ray evaluate`) scores every held-out sample under each method (METHODS):
loss per target token and, where the reference is checkable under evaluate.answer_check, exact match of
a greedy answer, overall and per source label. Each comparison of routed GradientSpace with another
method carries a paired bootstrap interval of the difference, so that a win by less than the held-out
split can resolve reads as level rather than as a win. The clustering diagnostics (agreement with
the labels, variance ratios, gradient vs embedding cosines) are `gs_ray.diagnostics`'.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.errors import DataError
from gs_ray.core.layout import ANSWERS_FILE, EVALUATION_FILE, EXPERTS_FILE, SINGLE_LORA
from gs_ray.core.rundir import RunDir
from gs_ray.data.batches import load_split
from gs_ray.evaluation.baselines import BaselineRun
from gs_ray.evaluation.diagnostics import clustering_diagnostics
from gs_ray.evaluation.exact_match import is_checkable, is_correct
from gs_ray.evaluation.scoring import BASE, Route, score_methods
from gs_ray.stages.experts import expert_init_adapter
from gs_ray.train.loop import SUMMARY_KEYS, TrainJob, run_training
from gs_ray.train.router import Router, request_text

METHODS = ("base", "single_lora", "embedding", "random_projection", "routed", "ensemble", "oracle")
"""base: no adapter; single_lora: one LoRA on everything; embedding / random_projection: the baselines'
experts, each picked by the baseline's own router; routed: the GradientSpace expert the router picks (what
serving does); ensemble: every GradientSpace expert, mixed by the router's probabilities; oracle: each
sample's own gradient cluster's expert (a perfect router)."""
CLUSTERINGS = ("gradientspace", "embedding", "random_projection")
CONFIDENCE = 0.95
"""Two-sided level of the interval on each comparison's difference."""
BOOTSTRAP_RESAMPLES = 2000
"""Resamples of a source's held-out rows behind each interval: enough that the interval's ends move by a few
percent of its width between seeds; the cost is a resamples x rows integer matrix per comparison."""
BOOTSTRAP_SEED = 0


def experts_total_steps(experts: dict[str, Any]) -> int:
    """Optimizer steps of all experts together (an experts stage's summary or record): the one-LoRA baseline's budget."""
    return sum(e["steps"] for e in experts["experts"])


def train_single_lora(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    """The baseline through the same loop as warm-up and experts: all training samples, the experts' total steps."""

    data_dir = run.stage_dir("data")
    job = TrainJob(
        name=f"{SINGLE_LORA}-{cfg.digest(['experts', 'train'])}-{run.manifest('experts')['digest']}",
        train_split=run.shared(data_dir / "train"),
        eval_split=run.shared(data_dir / "eval"),
        output_dir=str(staging),
        storage_path=run.ray_train_storage,
        max_steps=experts_total_steps(run.manifest("experts")["summary"]),
        learning_rate=cfg.experts.learning_rate,
        init_adapter=expert_init_adapter(cfg, run),
        seed=cfg.run.seed,
    )
    metrics = run_training(cfg, job).metrics
    return {key: metrics.get(key) for key in SUMMARY_KEYS}


def routing(run: RunDir, rows: list[dict], prefix: str) -> dict[str, Any]:
    """A clustering's experts for held-out rows: adapter paths, the router's pick and probabilities, each row's own expert."""

    record = json.loads((run.stage_dir("experts") / EXPERTS_FILE).read_text())
    assigned = pq.read_table(run.stage_dir("cluster") / layout.EVAL_ASSIGNMENTS_FILE, columns=["sample_id", "cluster"])
    cluster_of = dict(zip(assigned["sample_id"].to_pylist(), assigned["cluster"].to_pylist()))
    picked, probabilities = Router.load(run.stage_dir(layout.ROUTER_STAGE) / layout.ROUTER_DIRNAME).predict(
        [request_text(json.loads(row["messages"])) for row in rows])
    names = [prefix + layout.expert_id(e["expert"]) for e in record["experts"]]
    experts_dir = run.stage_dir(layout.EXPERTS_STAGE)
    # A held-out row left out of the clustering (cluster.on_bad_gradient=skip) has no own cluster: its router pick.
    own = [record["expert_of_cluster"][cluster_of[row["sample_id"]]] if row["sample_id"] in cluster_of else int(pick)
           for row, pick in zip(rows, picked)]
    return {"adapters": {name: str(layout.expert_adapter_dir(experts_dir, name[len(prefix):])) for name in names},
            "names": names, "picked": [int(e) for e in picked], "probabilities": probabilities.tolist(),
            "own": own, "steps": experts_total_steps(record)}


def method_routes(rows: list[dict], routings: dict[str, dict[str, Any]]) -> dict[str, list]:
    """The Route of every held-out row under every method."""

    gs = routings["gradientspace"]
    methods = {"base": [Route((BASE,))] * len(rows), "single_lora": [Route((SINGLE_LORA,))] * len(rows)}
    for name in ("embedding", "random_projection"):
        found = routings[name]
        methods[name] = [Route((found["names"][e],)) for e in found["picked"]]
    methods["routed"] = [Route((gs["names"][e],)) for e in gs["picked"]]
    methods["ensemble"] = [Route(tuple(gs["names"]), tuple(p)) for p in gs["probabilities"]]
    methods["oracle"] = [Route((gs["names"][e],)) for e in gs["own"]]
    return methods


def _source(row: dict) -> str:
    """The source a held-out row is reported under: its label, or "unlabelled"."""
    return row["label"] or "unlabelled"


def _per_source(rows: list[dict], values: list[float], weights: list[float]) -> dict[str, Any]:
    """Weighted mean of values overall ("all") and per source label."""
    totals: dict[str, list[float]] = {}
    for row, value, weight in zip(rows, values, weights):
        for key in ("all", _source(row)):
            total = totals.setdefault(key, [0.0, 0.0])
            total[0] += value
            total[1] += weight
    return {key: value / weight for key, (value, weight) in sorted(totals.items()) if weight > 0}


def _correct(rows: list[dict], answers: dict[int, str], rule: str) -> dict[int, float]:
    """{row index: 1.0 or 0.0} for every answered row: whether the answer matches the reference under `rule`."""
    return {i: float(is_correct(answer, rows[i]["response"], rule)) for i, answer in answers.items()}


def method_metrics(rows: list[dict], scored: dict[str, Any], correct: dict[int, float],
                   generate: list[int]) -> dict[str, Any]:
    """Loss per target token and exact match (`correct`, of the rows in `generate`), overall and per source."""
    loss = _per_source(rows, scored["loss_sums"], scored["token_counts"])
    checked = [rows[i] for i in generate]
    exact = _per_source(checked, [correct[i] for i in generate], [1.0] * len(checked))
    samples = Counter(_source(row) for row in checked)
    return {"loss": loss.pop("all"), "per_source": loss, "exact_match": exact.pop("all", None),
            "exact_match_per_source": exact, "exact_match_samples": dict(sorted(samples.items()))}


def checkable_rows(rows: list[dict], limit: int, rule: str) -> list[int]:
    """Indices of up to `limit` held-out rows whose reference is checkable under `rule`."""
    return [i for i, row in enumerate(rows) if is_checkable(row["response"], rule)][:limit]


def evaluate_run(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    """Every method on the held-out split, the clustering diagnostics; write evaluation.json and answers.jsonl."""
    import ray

    rows = load_split(str(run.stage_dir("data") / "eval"))
    if not rows:
        raise DataError("the eval split is empty: nothing to evaluate (raise data.eval_fraction)")
    routings = {"gradientspace": routing(run, rows, "")}
    for name in ("embedding", "random_projection"):
        routings[name] = routing(BaselineRun(run, name), rows, f"{name}-")
    single = run.manifest("single_lora")["summary"]
    adapters = {SINGLE_LORA: str(run.stage_dir("single_lora") / layout.ADAPTER_DIRNAME)}
    for found in routings.values():
        adapters |= found["adapters"]
    generate = checkable_rows(rows, cfg.evaluate.exact_match_samples, cfg.evaluate.answer_check)
    resources = {"num_cpus": cfg.train.cpus_per_worker, "num_gpus": 1 if cfg.train.use_gpu else 0}
    scored = ray.get(ray.remote(score_methods).options(**resources).remote(
        cfg, adapters, rows, method_routes(rows, routings), generate))
    correct = {method: _correct(rows, found["answers"], cfg.evaluate.answer_check) for method, found in scored.items()}
    _write_answers(staging / ANSWERS_FILE, rows, scored, correct, generate)
    methods = {method: method_metrics(rows, scored[method], correct[method], generate) for method in METHODS}
    summary = {
        "methods": methods,
        "router_accuracy": {name: float(np.mean(np.asarray(found["picked"]) == np.asarray(found["own"])))
                            for name, found in routings.items()},
        "training_steps": {name: found["steps"] for name, found in routings.items()} | {"single_lora": single["step"]},
        "sources": sorted({_source(row) for row in rows}),
        "single_lora_eval_loss_end": single.get("eval_loss_end"),
        "eval_samples": len(rows), "exact_match_samples": len(generate),
        "diagnostics": clustering_diagnostics(cfg, run, staging),
    }
    summary["comparisons"] = comparisons(summary, difference_intervals(rows, scored, correct))
    (staging / EVALUATION_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _write_answers(path: Path, rows: list[dict], scored: dict[str, Any], correct: dict[str, dict[int, float]],
                   generate: list[int]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for method, found in scored.items():
            for i in generate:
                out.write(json.dumps({"method": method, "sample_id": rows[i]["sample_id"], "label": rows[i]["label"],
                                      "answer": found["answers"][i], "correct": bool(correct[method][i])}) + "\n")


def paired_interval(ours: list[float], theirs: list[float], weights: list[float],
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """CONFIDENCE bootstrap interval of sum(ours - theirs) / sum(weights) over rows drawn with replacement.

    ours and theirs are per-row sums (loss over a row's tokens, or 1.0 for a correct answer) of two methods on
    the same rows, and weights the rows' shared denominators (target tokens, or 1.0). Both methods are
    resampled together (paired): which rows are hard cancels, so the interval measures how the methods differ.
    """
    if not len(ours) == len(theirs) == len(weights) or len(weights) == 0:
        raise ValueError(f"paired_interval needs equal, non-empty per-row lists: got {len(ours)}, {len(theirs)} "
                         f"and {len(weights)} rows")
    per_row = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    denominators = np.asarray(weights, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(per_row), size=(BOOTSTRAP_RESAMPLES, len(per_row)))
    differences = per_row[picks].sum(axis=1) / denominators[picks].sum(axis=1)
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return float(low), float(high)


def difference_intervals(rows: list[dict], scored: dict[str, Any],
                         correct: dict[str, dict[int, float]]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(other method, source, metric): interval of routed minus other} for every method, source and metric."""
    sources: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        sources.setdefault(_source(row), []).append(i)
    routed, intervals = scored["routed"], {}
    for other in METHODS:
        if other == "routed":
            continue
        for source, members in sources.items():
            ours, theirs = ([found["loss_sums"][i] for i in members] for found in (routed, scored[other]))
            tokens = [routed["token_counts"][i] for i in members]  # the same target tokens under every method
            intervals[other, source, "loss"] = paired_interval(ours, theirs, tokens)
            checked = [i for i in members if i in correct["routed"]]
            if checked:
                intervals[other, source, "exact_match"] = paired_interval(
                    [correct["routed"][i] for i in checked], [correct[other][i] for i in checked], [1.0] * len(checked))
    return intervals


def _verdict(interval: tuple[float, float], lower_is_better: bool) -> str:
    """better / worse when the whole interval of routed minus other lies on one side of zero, else level."""
    low, high = interval if lower_is_better else (-interval[1], -interval[0])
    return "better" if high < 0 else "worse" if low > 0 else "level"


def comparisons(summary: dict[str, Any],
                intervals: dict[tuple[str, str, str], tuple[float, float]]) -> list[dict[str, Any]]:
    """Routed GradientSpace against every other method, per source and metric: who wins, by how much, how surely.

    routed_better compares the point estimates; verdict says whether the interval of the difference
    (routed minus other) clears zero, and is "level" where the held-out rows cannot tell the two apart.
    """
    methods, found = summary["methods"], []
    routed = methods["routed"]
    for other in METHODS:
        if other == "routed":
            continue
        for source in summary["sources"]:
            for metric, key, lower_is_better in (("loss", "per_source", True),
                                                 ("exact_match", "exact_match_per_source", False)):
                ours, theirs = routed[key].get(source), methods[other][key].get(source)
                if ours is None or theirs is None:
                    continue
                interval = intervals[other, source, metric]
                found.append({"against": other, "source": source, "metric": metric, "routed": ours, "other": theirs,
                              "routed_better": ours < theirs if lower_is_better else ours > theirs,
                              "difference": ours - theirs, "interval": list(interval),
                              "verdict": _verdict(interval, lower_is_better)})
    return found


def routed_loses_to(compared: list[dict[str, Any]]) -> list[str]:
    """The methods that routed GradientSpace is behind on some source and metric by the point estimate.

    `compared` is what `comparisons` returns. A tie is not a loss: on the CPU runs every method's GSM8K
    exact match is 0.0.
    """
    return sorted({c["against"] for c in compared if not c["routed_better"] and c["routed"] != c["other"]})

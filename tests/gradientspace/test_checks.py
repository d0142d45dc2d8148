"""NaN, inf and all-zero gradients: named and refused, or left out on request, never in a centroid."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import load_file, save_file

from gs_ray.config import ClusterConfig, load_config
from gs_ray.core import storage
from gs_ray.data.batches import load_split
from gs_ray.gradientspace import checks
from gs_ray.gradientspace.cluster import ClusterError, OnlineSVDClusterer
from gs_ray.gradientspace.stream import assign_split, fit_on_validation, ordered_execution
from gs_ray.modeling.models import resolve_model_path

from conftest import WARM_RUN_OVERRIDES


def _rows(seed: int = 0, n: int = 60, dim: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, dim))
    return (centers[np.arange(n) % 3] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_each_problem_is_named_per_row():
    rows = _rows(n=5)
    rows[1, 3] = np.nan
    rows[2, 0] = np.inf
    rows[3] = 0.0
    rows[4, :] = -np.inf
    assert checks.gradient_problems(rows).tolist() == ["", checks.NON_FINITE, checks.NON_FINITE, checks.ZERO,
                                                       checks.NON_FINITE]


def test_error_names_the_samples_and_skip_only_warns(caplog):
    bad = checks.bad_samples([f"id{i}" for i in range(8)], ["", "nan", "", *["zero"] * 5])
    with pytest.raises(checks.BadGradientError, match=r"6 sample\(s\) of the train split .*id1: nan; id3: zero.*"
                                                      r"and 1 more.*cluster.on_bad_gradient=skip"):
        checks.enforce(bad, "error", "the train split")
    with caplog.at_level(logging.WARNING, logger="gs_ray.gradientspace.checks"):
        checks.enforce(bad, "skip", "the train split")
    assert "6 sample(s) of the train split left out" in caplog.text
    assert checks.summary(bad) == {"count": 6, "examples": ["id1: nan", "id3: zero", "id4: zero", "id5: zero",
                                                            "id6: zero"]}


def test_the_clusterer_refuses_non_finite_rows_without_touching_its_centroids():
    rows = _rows()
    poisoned = rows.copy()
    poisoned[7, 2] = np.nan
    with pytest.raises(ClusterError, match=r"validation gradients: rows \[7\] \(1 of 60\) have NaN"):
        OnlineSVDClusterer(ClusterConfig(k=3, k_max=4, max_val_samples=60, cache_size=4)).fit_validation(poisoned)
    clusterer = OnlineSVDClusterer(ClusterConfig(k=3, k_max=4, max_val_samples=60, cache_size=4))
    clusterer.fit_validation(rows)
    before = copy.deepcopy(clusterer.centroids)
    with pytest.raises(ClusterError, match=r"streamed gradients: rows \[7\]"):
        clusterer.partial_fit(poisoned)
    np.testing.assert_array_equal(clusterer.centroids, before)
    with pytest.raises(ClusterError, match="the summary of cluster 1"):
        clusterer.apply_summary(1, np.full(rows.shape[1], np.inf, np.float32))
    np.testing.assert_array_equal(clusterer.centroids, before)


# ---------------------------------------------------------------- through the gradient workers


def _token_in_some_samples(rows: list[dict], low: float = 0.15, high: float = 0.5) -> int:
    """A token id that occurs in a minority of the rows (but in some)."""
    counts: dict[int, int] = {}
    for row in rows:
        for token in set(row["input_ids"]):
            counts[token] = counts.get(token, 0) + 1
    share = {token: count / len(rows) for token, count in counts.items()}
    return min((t for t, s in share.items() if low <= s <= high), key=lambda t: abs(share[t] - 0.3))


@pytest.fixture(scope="module")
def poisoned_model(tiny_warm_run, tmp_path_factory):
    """(run dir, config overrides, ids of val and train samples with the poisoned token): the tiny base model
    with one token's embedding row set to NaN, so exactly the samples holding that token get NaN gradients."""
    run_dir = tiny_warm_run("bad-gradients")
    base = Path(resolve_model_path(load_config("tiny").model))
    model_dir = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(base, model_dir)
    weights_file = next(model_dir.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    train = load_split(str(run_dir / "data" / "train"))
    token = _token_in_some_samples(train)
    (name,) = [key for key in weights if key.endswith("embed_tokens.weight")]
    # Untied, so that the output layer keeps the clean row: only inputs holding the token turn NaN.
    weights["lm_head.weight"] = weights[name].copy()
    weights[name][token] = np.nan
    save_file(weights, str(weights_file))
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"tie_word_embeddings": False}))
    poisoned_ids = {row["sample_id"] for split in ("val", "train") for row in load_split(str(run_dir / "data" / split))
                    if token in row["input_ids"]}
    return run_dir, [f"run.run_dir={run_dir}", f"model.name={model_dir}", *WARM_RUN_OVERRIDES], poisoned_ids


def _stream_with(run_dir: Path, overrides: list[str], on_bad: str):
    cfg = load_config("tiny", [*overrides, "cluster.k=2", "cluster.cache_size=8", f"cluster.on_bad_gradient={on_bad}"])
    adapter = str(run_dir / "warmup" / "adapter")
    with ordered_execution():
        clusterer, fit = fit_on_validation(cfg, str(run_dir / "data"), adapter, run_dir)
        import ray

        from gs_ray.gradientspace.actor import ClusterActor

        actor = ray.remote(ClusterActor).options(num_cpus=0).remote(cfg.cluster, clusterer.state_dict())
        try:
            table, bad = assign_split(cfg, storage.join(str(run_dir / "data"), "train"), adapter, actor, "stream")
            centroids = ray.get(actor.state_dict.remote())["centroids"]
        finally:
            ray.kill(actor)
    return fit, table, bad, centroids


@pytest.mark.slow
def test_skip_leaves_out_exactly_the_samples_with_nan_gradients(poisoned_model):
    run_dir, overrides, poisoned_ids = poisoned_model
    fit, table, bad, centroids = _stream_with(run_dir, overrides, "skip")
    train_ids = {row["sample_id"] for row in load_split(str(run_dir / "data" / "train"))}
    assert {sample_id for sample_id, _ in bad} == poisoned_ids & train_ids and bad
    assert {problem for _, problem in bad} == {checks.NON_FINITE}
    assert set(table["sample_id"].to_pylist()) == train_ids - poisoned_ids  # every other sample, once
    assert set(table["cluster"].to_pylist()) <= {0, 1} and np.isfinite(table["similarity"].to_numpy()).all()
    assert np.isfinite(centroids).all()  # no NaN reached a centroid
    assert fit["bad"] and all(problem == checks.NON_FINITE for _, problem in fit["bad"])


@pytest.mark.slow
def test_error_names_a_sample_with_a_nan_gradient(poisoned_model):
    run_dir, overrides, poisoned_ids = poisoned_model
    with pytest.raises(checks.BadGradientError, match="cluster.on_bad_gradient=skip") as caught:
        _stream_with(run_dir, overrides, "error")
    assert any(sample_id in str(caught.value) for sample_id in poisoned_ids)


def test_a_pyarrow_table_of_problems_filters_as_the_stage_does():
    batch = pa.table({"sample_id": ["a", "b", "c"], "problem": ["", checks.ZERO, ""], "cluster": [0, -1, 1]})
    assert checks.bad_samples(batch["sample_id"].to_pylist(), batch["problem"].to_pylist()) == [("b", checks.ZERO)]

"""Router: training on planted wording, metrics, save/load, errors, request_text (real MiniLM, CPU)."""

import json
import random

import numpy as np
import pytest

from gs_ray.config import RouterConfig
from gs_ray.core.errors import ConfigError, DataError, ModelError
from gs_ray.train.router import CONFIG_FILE, Router, request_text, train_router

PER_CLUSTER = 60
K = 3

NAMES = ["Tom", "Ana", "Lee", "Maria", "Sam", "Priya", "Omar", "Julia", "Ken", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "coins", "cards"]
TASKS = ["reverses a string", "returns the largest element of a list", "counts the vowels in a word",
         "checks whether a number is prime", "merges two sorted lists", "removes duplicates from a list",
         "computes the factorial of n", "flattens a nested list"]
SENTENCES = ["the meeting was moved to friday", "our team finished the report early",
             "the weather ruined the picnic", "she forgot her keys at the office",
             "the new policy confused many customers", "he apologized for the late delivery",
             "the museum opens at nine", "prices went up again this month"]
STYLES = ["more formal", "more polite", "shorter", "in the passive voice", "more friendly", "simpler"]


def _math(rng):
    a, b = rng.randint(2, 90), rng.randint(2, 40)
    return rng.choice([
        f"{rng.choice(NAMES)} has {a} {rng.choice(ITEMS)} and buys {b} more. How many does she have now?",
        f"A box holds {a} {rng.choice(ITEMS)}. {rng.choice(NAMES)} gives away {b}. How many are left?",
        f"If one bag has {b} {rng.choice(ITEMS)}, how many are in {a} bags?",
    ])


def _code(rng):
    return rng.choice([
        f"Write a Python function that {rng.choice(TASKS)}.",
        f"Implement a python function which {rng.choice(TASKS)}, with a docstring.",
        f"Please write Python code: a function that {rng.choice(TASKS)}.",
    ])


def _rewrite(rng):
    return rng.choice([
        f"Rewrite this sentence to be {rng.choice(STYLES)}: \"{rng.choice(SENTENCES)}\"",
        f"Rephrase the following sentence {rng.choice(STYLES)}: {rng.choice(SENTENCES)}.",
        f"Make this sentence {rng.choice(STYLES)}: '{rng.choice(SENTENCES)}'",
    ])


def synthetic(per_cluster=PER_CLUSTER, seed=0):
    rng = random.Random(seed)
    pairs = [(make(rng), c) for c, make in enumerate((_math, _code, _rewrite)) for _ in range(per_cluster)]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], np.array([c for _, c in pairs])


@pytest.fixture(scope="module")
def trained():
    texts, y = synthetic()
    cfg = RouterConfig(epochs=30, learning_rate=1e-2, batch_size=32)
    router, metrics = train_router(texts, y, K, cfg, seed=0, labels=["math", "code", "rewrite"])
    return router, metrics


def test_router_learns_planted_clusters(trained):
    router, metrics = trained
    assert metrics["holdout_samples"] >= 0.15 * K * PER_CLUSTER
    assert metrics["train_samples"] + metrics["holdout_samples"] == K * PER_CLUSTER
    assert metrics["accuracy"] >= 0.9 and metrics["accuracy"] > metrics["majority_baseline"] + 0.3
    assert metrics["train_accuracy"] >= 0.9
    assert metrics["warnings"] == []
    # stratified: every cluster is in the holdout with about its share
    assert all(v["support"] >= 10 for v in metrics["per_cluster"].values())
    print("holdout accuracy", metrics["accuracy"], "ece", metrics["calibration"]["ece"])


def test_metrics_are_consistent(trained):
    _, m = trained
    confusion = np.array(m["confusion"])
    assert confusion.shape == (K, K) and confusion.sum() == m["holdout_samples"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(m["accuracy"])
    assert [m["per_cluster"][str(c)]["support"] for c in range(K)] == confusion.sum(axis=1).tolist()
    bins = m["calibration"]["bins"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == m["holdout_samples"]
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / m["holdout_samples"]
    assert m["calibration"]["ece"] == pytest.approx(ece) and 0 <= ece <= 1
    assert json.loads(json.dumps(m)) == m  # JSON-safe as is


def test_predict_shapes_and_save_load_round_trip(trained, tmp_path):
    router, _ = trained
    texts = ["Write a Python function that sorts a dictionary by value.", "Tom has 4 cats and 3 dogs. How many pets?",
             "Make this sentence more formal: 'gonna be late'"]
    clusters, probs = router.predict(texts)
    assert clusters.shape == (3,) and clusters.dtype == np.int64
    assert probs.shape == (3, K) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert clusters.tolist() == [1, 0, 2]
    router.save(tmp_path / "router")
    files = {p.name for p in (tmp_path / "router").rglob("*")}
    assert files == {"router.json", "router.safetensors"}  # frozen encoder: only its source is recorded
    loaded = Router.load(tmp_path / "router")
    assert loaded.k == K and loaded.labels == ["math", "code", "rewrite"]
    np.testing.assert_array_equal(loaded.predict(texts)[1], probs)
    assert router.predict([])[1].shape == (0, K)


def test_mlp_head():
    texts, y = synthetic(per_cluster=8, seed=1)
    router, metrics = train_router(texts, y, K, RouterConfig(hidden_dim=16, epochs=3, batch_size=8), seed=0)
    assert len(router.head) == 3 and router.head[0].out_features == 16
    # Separable clusters: the MLP head must do better than always answering the largest cluster.
    assert metrics["holdout_samples"] == 6 and metrics["accuracy"] > metrics["majority_baseline"]


def test_finetuned_encoder_round_trip(tmp_path):
    texts, y = synthetic(per_cluster=4, seed=1)  # one optimizer step: fine-tuning costs seconds per step on CPU
    cfg = RouterConfig(finetune_encoder=True, epochs=1, batch_size=16, max_length=32)
    router, metrics = train_router(texts, y, K, cfg, seed=0)
    assert metrics["train_samples"] == 9 and metrics["holdout_samples"] == 3
    router.save(tmp_path / "ft")
    names = [p.name for p in (tmp_path / "ft").rglob("*")]
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded = Router.load(tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / CONFIG_FILE).read_text())["encoder_finetuned"] is True
    np.testing.assert_allclose(loaded.predict(texts)[1], router.predict(texts)[1], atol=1e-6)


def test_empty_cluster_warns_and_keeps_k_outputs():
    texts, y = synthetic(per_cluster=4, seed=2)
    keep = y != 2
    router, metrics = train_router([t for t, k in zip(texts, keep) if k], y[keep], K,
                                   RouterConfig(epochs=2, batch_size=8))
    assert any("cluster 2 has no router training samples" in w for w in metrics["warnings"])
    assert metrics["per_cluster"]["2"]["support"] == 0 and metrics["per_cluster"]["2"]["recall"] is None
    assert metrics["train_support"]["2"] == 0
    assert router.predict(["hello"])[1].shape == (1, K)


@pytest.mark.parametrize(("texts", "clusters", "k", "error", "message"), [
    (["a", "b"], [0], 2, DataError, "2 texts but 1 cluster labels"),
    (["a", "b"], [0, 3], 2, DataError, r"in \[0, 2\), got \[3\]"),
    (["a", "b"], [0, -1], 2, DataError, r"got \[-1\]"),
    (["a", "b"], [0.5, 1.0], 2, DataError, "must be integers"),
    (["a", "b"], [0, 0], 1, ConfigError, "k >= 2"),
    ([], [], 2, DataError, "no texts"),
])
def test_bad_training_input(texts, clusters, k, error, message):
    with pytest.raises(error, match=message):
        train_router(texts, clusters, k, RouterConfig())


def test_unknown_encoder(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder 'bert-nope'"):
        train_router(["a", "b"], [0, 1], 2, RouterConfig(encoder="bert-nope"))


def test_load_missing_or_corrupt(tmp_path, trained):
    with pytest.raises(ModelError, match="no router at"):
        Router.load(tmp_path / "absent")
    trained[0].save(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="corrupt router weights"):
        Router.load(tmp_path / "r")
    (tmp_path / "r" / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ModelError, match="corrupt"):
        Router.load(tmp_path / "r")


def test_request_text_excludes_assistant():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "SECRET 5"}, {"role": "user", "content": "Now times 4?"}]
    text = request_text(messages)
    assert text == "Be brief.\nAdd 2 and 3.\nNow times 4?" and "SECRET" not in text
    assert request_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) == "hi"
    with pytest.raises(DataError, match="no non-empty system or user"):
        request_text([{"role": "assistant", "content": "only me"}])
    with pytest.raises(DataError, match="non-empty list"):
        request_text([])

"""The online SVD clustering math on synthetic planted gradients (numpy only: no Ray, no model)."""

import copy
import dataclasses

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import gs_ray.gradientspace.cluster as cluster
from gs_ray.config import ClusterConfig
from gs_ray.gradientspace.actor import ClusterActor
from gs_ray.gradientspace.caches import ClusterCaches, top_singular_vector
from gs_ray.gradientspace.cluster import ClusterError, GradientFeatures, OnlineSVDClusterer, singular_spectrum
from gs_ray.gradientspace.k_rules import KRuleError, prediction_strength_k
from gs_ray.gradientspace.k_rules import relative_gap_k as choose_k

DIM = 3000
"""Feature dimension of the planted data: high enough that noise is nearly orthogonal, as in real gradients."""
SHARED, SEPARATION, NOISE = 2.0, 1.0, 3.0
"""Norms of the direction every sample shares, of its cluster's direction, and of isotropic noise.
Within-cluster cosine is ~0.37 against ~0.29 across: thin margins, like measured LoRA gradients."""
N_VAL, N_STREAM = 300, 2000


def planted(k: int, n: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows = shared direction + one of k cluster directions + noise, at random scales (raw gradients)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim)
    shared /= np.linalg.norm(shared)
    directions = rng.standard_normal((k, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    noise = rng.standard_normal((n, dim)) / np.sqrt(dim)
    rows = SHARED * shared + SEPARATION * directions[labels] + NOISE * noise
    return (rows * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32), labels


@pytest.fixture(scope="module")
def small():
    """A fitted 3-cluster clusterer on d=500 with cache size 4, plus rows to stream."""
    rows, labels = planted(3, 700, dim=500, seed=7)
    clusterer = OnlineSVDClusterer(ClusterConfig(k=3, cache_size=4, max_val_samples=100), seed=0)
    clusterer.fit_validation(rows[:100])
    return clusterer, rows[100:], labels[100:]


@pytest.mark.parametrize("init_coordinates", ["all", "top_k"])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_recovers_planted_clusters_and_k(k, init_coordinates):
    rows, labels = planted(k, N_VAL + N_STREAM, seed=k)
    clusterer = OnlineSVDClusterer(ClusterConfig(k=0, init_coordinates=init_coordinates), seed=0)
    info = clusterer.fit_validation(rows[:N_VAL])
    assert info["k"] == clusterer.k == k
    assert info["k_rule"] == "cluster.k_rule=silhouette"
    # Well-separated planted clusters: every rule finds K (the planted sets of benchmarks/skills.py are harder).
    assert info["k_candidates"] == {"gap": k, "silhouette": k, "eigengap": k, "prediction_strength": k}
    clusters, similarities = clusterer.partial_fit(rows[N_VAL:])
    assert adjusted_rand_score(labels[N_VAL:], clusters) >= 0.95
    assert clusters.dtype == np.int64 and similarities.dtype == np.float32
    assert clusterer.updates.sum() == clusterer.version > 0
    np.testing.assert_allclose(np.linalg.norm(clusterer.centroids, axis=1), 1.0, atol=1e-5)


def test_prediction_strength_needs_two_halves_of_k_clusters_and_says_so():
    rows, _ = planted(2, 5, seed=3)
    chosen = OnlineSVDClusterer(ClusterConfig(k=0, k_max=4), seed=0).fit_validation(rows)
    assert "prediction_strength" not in chosen["k_candidates"] and chosen["k_candidates"]["silhouette"] >= 2
    with pytest.raises(ClusterError, match=r"cluster.k_rule=prediction_strength: .* needs at least 6 validation rows, got 5"):
        OnlineSVDClusterer(ClusterConfig(k=0, k_max=4, k_rule="prediction_strength"), seed=0).fit_validation(rows)


@pytest.mark.parametrize("seed", [5, 6])
def test_prediction_strength_peaks_at_the_planted_k(seed):
    """A split cluster or two merged ones are found differently by the two halves; the planted three are not."""
    rows, _ = planted(3, 240, seed=seed)
    k, strengths = prediction_strength_k(GradientFeatures(None)(rows), 2, 8, seed=0)
    assert k == 3 and strengths[3] >= 0.95
    assert max(strength for j, strength in strengths.items() if j != 3) < 0.9


def test_without_centering_the_shared_direction_dominates():
    """Uncentered, s_1 is the shared direction: the largest gap overall sits after it, and the
    centroids are nearly collinear, so assignment margins are a fraction of the centered ones."""
    rows, labels = planted(4, N_VAL + 500, seed=4)
    fitted = {}
    for center in (True, False):
        clusterer = OnlineSVDClusterer(ClusterConfig(k=0, center=center, k_rule="gap"), seed=0)
        fitted[center] = (clusterer, clusterer.fit_validation(rows[:N_VAL]))
    raw, raw_info = fitted[False]
    s = raw_info["singular_values"]
    all_gaps = (s[:16] - s[1:17]) / s[:16]
    assert int(np.argmax(all_gaps)) == 0  # j = 1: a rule searching from j = 1 would say K = 1 or 2
    assert raw_info["k"] == 4  # the uncentered rule starts at j = k_min and still finds K
    margins, off_diagonal = {}, {}
    for center, (clusterer, _) in fitted.items():
        top2 = np.sort(clusterer.features(rows[N_VAL:]) @ clusterer.centroids.T, axis=1)[:, -2:]
        margins[center] = float(np.median(top2[:, 1] - top2[:, 0]))
        gram = clusterer.centroids @ clusterer.centroids.T
        off_diagonal[center] = gram[~np.eye(clusterer.k, dtype=bool)]
    assert off_diagonal[False].min() > 0.5 and off_diagonal[True].max() < 0.1
    assert margins[False] < 0.5 * margins[True]


def test_choose_k_on_hand_made_spectra():
    spectrum = [10.0, 9.0, 8.0, 2.0, 1.9, 1.8, 1.7, 1.6]
    k, gaps = choose_k(spectrum, 2, 5, centered=False)  # j in [2, 5]
    assert k == 3 and len(gaps) == 4 and gaps[1] == pytest.approx(0.75)
    k, gaps = choose_k(spectrum, 2, 5, centered=True)  # j in [1, 4], K = j + 1
    assert k == 4 and len(gaps) == 4 and gaps[0] == pytest.approx(0.1)
    dominant = [100.0, 10.0, 9.0, 1.0, 0.9]
    assert choose_k(dominant, 2, 4, centered=False)[0] == 3  # j = 1 is outside [k_min, k_max]
    assert choose_k(dominant, 2, 4, centered=True)[0] == 2  # centered, the gap after s_1 means K = 2


def test_choose_k_clips_k_max_to_the_spectrum():
    spectrum = [5.0, 4.0, 3.0, 0.5]
    k, gaps = choose_k(spectrum, 2, 16, centered=False)  # j in [2, 3]
    assert (k, len(gaps)) == (3, 2)
    k, gaps = choose_k(spectrum, 2, 16, centered=True)  # j in [1, 2] so K <= m - 1 = 3:
    assert (k, len(gaps)) == (3, 2)  # the largest gap, after s_3 (K = 4 = m), is not searched
    assert choose_k([1.0, 0.0, 0.0], 2, 4, centered=False) == (2, [0.0])  # s_2 = 0: gap 0, not NaN
    with pytest.raises(KRuleError, match="validation rows"):
        choose_k([3.0, 1.0], 2, 4, centered=False)


def test_top_singular_vector_matches_numpy_svd():
    rows = np.random.default_rng(0).standard_normal((32, 1000)).astype(np.float32)
    rows[:, :10] += 3.0
    vector = top_singular_vector(rows)
    expected = np.linalg.svd(rows.astype(np.float64), full_matrices=False)[2][0]
    assert vector.dtype == np.float32 and vector.shape == (1000,)
    assert abs(float(vector @ expected)) == pytest.approx(1.0, abs=1e-5)
    assert not top_singular_vector(np.zeros((4, 10), np.float32)).any()


def test_singular_spectrum_through_the_gram_matrix(monkeypatch):
    monkeypatch.setattr(cluster, "COLUMN_BLOCK", 128)  # several column blocks
    matrix = np.random.default_rng(1).standard_normal((20, 1000)).astype(np.float32)
    values, vectors = singular_spectrum(matrix)
    u, s, _ = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(values, s, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(vectors * u, axis=0)), 1.0, atol=1e-5)


def test_features_are_unit_rows_and_zero_rows_stay_zero():
    rows = np.random.default_rng(2).standard_normal((5, 50)).astype(np.float32)
    rows[2] = 0
    mean = np.full(50, 0.1, np.float32)
    for features in (GradientFeatures(None)(rows), GradientFeatures(mean)(rows)):
        assert features.dtype == np.float32 and np.isfinite(features).all()
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), [1, 1, 0, 1, 1], atol=1e-6)
    units = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    expected = (units - mean) / np.linalg.norm(units - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(GradientFeatures(mean)(rows)[[0, 1, 3, 4]], expected[[0, 1, 3, 4]], atol=1e-6)


def test_fit_validation_on_a_memmap_equals_direct_features(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "COLUMN_BLOCK", 700)
    rows, _ = planted(3, 120, dim=2000, seed=3)
    rows[5] = 0  # a sample with no gradient
    stored = np.lib.format.open_memmap(tmp_path / "val.npy", mode="w+", dtype=np.float32, shape=rows.shape)
    stored[:] = rows
    from_memmap = OnlineSVDClusterer(ClusterConfig(), seed=0)
    info = from_memmap.fit_validation(np.load(tmp_path / "val.npy", mmap_mode="r"))
    in_memory = OnlineSVDClusterer(ClusterConfig(), seed=0)
    in_memory.fit_validation(rows)
    np.testing.assert_allclose(from_memmap.centroids, in_memory.centroids, atol=1e-6)
    units = GradientFeatures(None)(rows)
    np.testing.assert_allclose(from_memmap.features.mean, units[np.arange(120) != 5].mean(axis=0), atol=1e-6)
    direct = singular_spectrum(from_memmap.features(rows))[0]
    np.testing.assert_allclose(info["singular_values"][:20], direct[:20], rtol=1e-4, atol=1e-5)


def test_caches_emit_one_summary_per_full_cache_in_order():
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 3, 50)
    rows = rng.standard_normal((50, 20)).astype(np.float32)
    caches = ClusterCaches(3, 4, 20)
    emitted = caches.add(clusters[:17], rows[:17]) + caches.add(clusters[17:], rows[17:])
    expected = []
    for k in range(3):
        members = np.flatnonzero(clusters == k)
        for start in range(0, len(members) - 3, 4):
            expected.append((members[start + 3], k, top_singular_vector(rows[members[start : start + 4]])))
    expected.sort(key=lambda item: item[0])  # emitted when the row filling the cache arrives
    assert [k for k, _ in emitted] == [k for _, k, _ in expected]
    for (_, vector), (_, _, want) in zip(emitted, expected):
        np.testing.assert_array_equal(vector, want)
    for k in range(3):
        assert len([1 for c, _ in emitted if c == k]) == np.sum(clusters == k) // 4
        assert caches.counts[k] == np.sum(clusters == k) % 4


@pytest.mark.parametrize("update", ["ema", "mean"])
def test_remote_worker_reduces_to_partial_fit(small, update):
    fitted, rows, _ = small
    fitted = copy.deepcopy(fitted)
    fitted.cfg = dataclasses.replace(fitted.cfg, update=update)
    fitted.load_state_dict(fitted.state_dict())  # caches that summarize the way `update` needs
    reference = copy.deepcopy(fitted)
    expected_clusters, expected_similarities = reference.partial_fit(rows)
    central = copy.deepcopy(fitted)
    worker = OnlineSVDClusterer(central.cfg)
    worker.load_state_dict(central.state_dict())  # the worker's own copy of centroids and mean
    caches = ClusterCaches(central.k, central.cfg.cache_size, central.dim, update)
    clusters, similarities = [], []
    for i in range(len(rows)):
        features = worker.features(rows[i : i + 1])
        assigned, similarity = worker.assign_features(features)
        for k, vector in caches.add(assigned, features):
            central.apply_summary(k, vector)  # what the actor receives
        worker.centroids = central.centroids.copy()  # fresh broadcast before the next row
        clusters.append(assigned[0])
        similarities.append(similarity[0])
    np.testing.assert_array_equal(clusters, expected_clusters)
    np.testing.assert_array_equal(similarities, expected_similarities)
    np.testing.assert_array_equal(central.centroids, reference.centroids)
    assert central.version == reference.version and (central.updates == reference.updates).all()


def test_mean_caches_emit_each_full_caches_sum_and_keep_one_row_per_cluster():
    rng = np.random.default_rng(4)
    clusters = rng.integers(0, 3, 50)
    rows = rng.standard_normal((50, 20)).astype(np.float32)
    caches = ClusterCaches(3, 4, 20, "mean")
    emitted = caches.add(clusters[:17], rows[:17]) + caches.add(clusters[17:], rows[17:])
    for k in range(3):
        members = np.flatnonzero(clusters == k)
        sums = [rows[members[start : start + 4]].sum(axis=0) for start in range(0, len(members) - 3, 4)]
        np.testing.assert_allclose([vector for c, vector in emitted if c == k], sums, rtol=1e-5, atol=1e-5)
        assert caches.buffers[k].shape == (1, 20)
    leftover = caches.filled_rows()
    assert len(leftover) == int((caches.counts > 0).sum())
    again = ClusterCaches(3, 4, 20, "mean")
    again.restore(leftover, caches.counts)
    tail = rng.standard_normal((12, 20)).astype(np.float32)
    more = rng.integers(0, 3, 12)
    for (k1, v1), (k2, v2) in zip(caches.add(more, tail), again.add(more, tail), strict=True):
        assert k1 == k2
        np.testing.assert_array_equal(v1, v2)


@pytest.mark.parametrize("update", ["mean", "ema"])
def test_state_round_trip_through_npz_resumes_identically(small, tmp_path, update):
    fitted, rows, _ = small
    fitted = copy.deepcopy(fitted)
    fitted.cfg = dataclasses.replace(fitted.cfg, update=update)
    fitted.caches = ClusterCaches(fitted.k, fitted.cfg.cache_size, fitted.dim, update)
    uninterrupted = copy.deepcopy(fitted)
    first = copy.deepcopy(fitted)
    first.partial_fit(rows[:301])  # leaves caches part-full
    np.savez(tmp_path / "state.npz", **first.state_dict())
    restored = OnlineSVDClusterer(fitted.cfg)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
        restored.load_state_dict(dict(saved))
    assert restored.caches.counts.sum() > 0
    expected = uninterrupted.partial_fit(rows)
    resumed = restored.partial_fit(rows[301:])
    np.testing.assert_array_equal(resumed[0], expected[0][301:])
    np.testing.assert_array_equal(resumed[1], expected[1][301:])
    np.testing.assert_array_equal(restored.centroids, uninterrupted.centroids)
    assert restored.version == uninterrupted.version
    np.testing.assert_array_equal(restored.singular_values, uninterrupted.singular_values)


def test_ema_update_moves_towards_v_keeps_unit_norm_and_handles_sign(small):
    clusterer = copy.deepcopy(small[0])
    clusterer.cfg = dataclasses.replace(clusterer.cfg, update="ema")
    old = clusterer.centroids[1].copy()
    v = np.random.default_rng(4).standard_normal(clusterer.dim).astype(np.float32)
    v /= np.linalg.norm(v)
    v = v if v @ old >= 0 else -v
    flipped = copy.deepcopy(clusterer)
    clusterer.apply_summary(1, v)
    flipped.apply_summary(1, -v)
    new = clusterer.centroids[1]
    assert float(new @ v) > float(old @ v)
    assert np.linalg.norm(new) == pytest.approx(1.0, abs=1e-6)
    expected = 0.9 * old + 0.1 * v
    np.testing.assert_allclose(new, expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_array_equal(flipped.centroids, clusterer.centroids)
    np.testing.assert_array_equal(clusterer.centroids[[0, 2]], small[0].centroids[[0, 2]])
    assert clusterer.version == small[0].version + 1 and clusterer.updates[1] == small[0].updates[1] + 1


def test_bad_input_is_a_clear_error(small):
    rows, _ = planted(3, 20, dim=100, seed=5)
    with pytest.raises(ClusterError, match="fit_validation"):
        OnlineSVDClusterer(ClusterConfig()).assign(rows)
    with pytest.raises(ClusterError, match="100.*500"):
        small[0].assign(rows)
    with pytest.raises(ClusterError, match="500"):
        small[0].apply_summary(0, np.ones(100, np.float32))
    with pytest.raises(ClusterError, match="at least 5 validation rows"):
        OnlineSVDClusterer(ClusterConfig(k=4)).fit_validation(rows[:4])
    with pytest.raises(ClusterError, match="cluster.k=10"):
        OnlineSVDClusterer(ClusterConfig(k=10, k_max=12)).fit_validation(rows[:6])
    with pytest.raises(ClusterError, match="validation rows"):
        OnlineSVDClusterer(ClusterConfig(k=0)).fit_validation(rows[:2])
    with pytest.raises(ValueError, match="shape"):
        small[0].assign(rows[0])


@pytest.mark.parametrize("update", ["mean", "ema"])
def test_streaming_ten_times_more_rows_keeps_state_size(small, update):
    """Memory is O(K d) (ema: O(K C d)) whatever the stream's length: the fixed state never grows, and the caches
    hold one running sum per cluster (ema: under K x C rows)."""
    fitted, rows, _ = small
    clusterer = copy.deepcopy(fitted)
    clusterer.cfg = dataclasses.replace(clusterer.cfg, update=update)
    k, cache, dim = fitted.k, fitted.cfg.cache_size, fitted.dim
    clusterer.caches = ClusterCaches(k, cache, dim, update)
    kept = cache if update == "ema" else 1
    fixed = {key for key in clusterer.state_dict() if not key.startswith("cache_")}
    sizes = {key: np.asarray(clusterer.state_dict()[key]).nbytes for key in fixed}
    # Chunks of odd sizes: the caches are caught at many different fill levels, never only full or empty.
    for chunk in (7, 13, 29, 60, 3, 41, 17, 60, 11, 23):
        clusterer.partial_fit(rows[:chunk])
        state = clusterer.state_dict()
        assert {key: np.asarray(state[key]).nbytes for key in fixed} == sizes
        counts = state["cache_counts"]
        assert len(state["cache_rows"]) == int(np.minimum(counts, kept).sum()) and (counts < cache).all()
        assert sum(buffer.nbytes for buffer in clusterer.caches.buffers.values()) <= k * kept * dim * 4
    assert clusterer.version >= (7 + 13 + 29 + 60 + 3 + 41 + 17 + 60 + 11 + 23) // (k * cache)


def test_mean_update_keeps_the_running_sum_of_every_filled_cache(small):
    """update=mean: each centroid is the direction of its validation members' sum plus every filled cache's sum."""
    fitted, rows, _ = small
    clusterer = OnlineSVDClusterer(ClusterConfig(k=3, cache_size=4, max_val_samples=100, update="mean"), seed=0)
    clusterer.load_state_dict(fitted.state_dict() | {"sums": fitted.sums})
    start = clusterer.sums.copy()
    clusters, _ = clusterer.partial_fit(rows[:200])
    features = clusterer.features(rows[:200])
    for k in range(3):
        members = features[clusters == k]
        filled = (len(members) // 4) * 4  # rows still in the cache have not moved the centroid yet
        expected = start[k] + members[:filled].astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(clusterer.centroids[k], expected / np.linalg.norm(expected), atol=1e-5)
        assert clusterer.updates[k] == filled // 4


def test_update_none_leaves_the_validation_centroids(small):
    fitted, rows, labels = small
    clusterer = OnlineSVDClusterer(ClusterConfig(k=3, cache_size=4, max_val_samples=100, update="none"), seed=0)
    clusterer.load_state_dict(fitted.state_dict())
    before = clusterer.centroids.copy()
    clusters, _ = clusterer.partial_fit(rows)
    np.testing.assert_array_equal(clusterer.centroids, before)
    assert clusterer.version == 0 and adjusted_rand_score(labels, clusters) >= 0.95


def _stream_through_actor(actor: ClusterActor, rows_of: dict[int, np.ndarray], order: list[int]) -> dict[int, list]:
    """Workers that each own one stream, their batches of 5 rows taken in `order` (stream ids); as GradientWorker."""
    tokens, replicas, features_of, caches = {}, {}, {}, {}
    positions, clusters = dict.fromkeys(rows_of, 0), {j: [] for j in rows_of}
    for j in order:
        tokens[j], changed, mean = actor.changed_since(tokens.get(j), j)
        if j not in replicas:
            replicas[j] = np.stack([changed[k] for k in sorted(changed)])
            features_of[j] = GradientFeatures(mean)
            caches[j] = ClusterCaches(len(changed), actor.cfg.cache_size, replicas[j].shape[1], actor.cfg.update)
        for k, row in changed.items():
            replicas[j][k] = row
        batch = features_of[j](rows_of[j][positions[j] : positions[j] + 5])
        positions[j] += 5
        assigned, _ = cluster.nearest_centroids(batch, replicas[j])
        clusters[j].extend(assigned.tolist())
        summaries = caches[j].add(assigned, batch)
        if summaries:
            actor.apply_summaries(summaries, j)
    return clusters


@pytest.mark.parametrize("update", ["mean", "ema"])
def test_two_streams_give_the_same_result_however_their_batches_interleave(small, update):
    """grads.concurrency = 2: each worker owns a stream, so scheduling cannot change an assignment or a centroid."""
    fitted, rows, _ = small
    cfg = dataclasses.replace(fitted.cfg, update=update)
    rows_of = {0: rows[:300], 1: rows[300:600]}
    one_then_other = [0] * 60 + [1] * 60
    alternating = [j for pair in zip([1] * 60, [0] * 60) for j in pair]
    results = []
    for order in (one_then_other, alternating):
        actor = ClusterActor(cfg, fitted.state_dict(), streams=2)
        clusters = _stream_through_actor(actor, rows_of, order)
        assert actor.clusterer.version == 0  # the streams moved only their own copies
        actor.finish_stream()
        results.append((clusters, actor.state_dict()))
    (first, first_state), (second, second_state) = results
    assert first == second
    np.testing.assert_array_equal(first_state["centroids"], second_state["centroids"])
    assert first_state["updates"].sum() > 0 and (first_state["updates"] == second_state["updates"]).all()
    if update == "mean":  # the merged centroid is the direction of the validation sum plus every filled cache's sum
        merged = fitted.sums.copy()
        for j, stream_rows in rows_of.items():
            features, assigned = fitted.features(stream_rows), np.asarray(first[j])
            for k in range(fitted.k):
                members = features[assigned == k]
                merged[k] += members[: len(members) // 4 * 4].astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(first_state["centroids"], merged / np.linalg.norm(merged, axis=1, keepdims=True),
                                   atol=1e-5)


def test_an_actor_with_two_streams_resumes_both_from_its_checkpoint(small, tmp_path):
    fitted, rows, _ = small
    cfg = dataclasses.replace(fitted.cfg, update="mean", checkpoint_every=1)
    checkpoint = str(tmp_path / "actor.npz")
    actor = ClusterActor(cfg, fitted.state_dict(), checkpoint, streams=2)
    _stream_through_actor(actor, {0: rows[:100], 1: rows[100:200]}, [0, 1] * 20)
    restarted = ClusterActor(cfg, fitted.state_dict(), checkpoint, streams=2)  # as Ray re-runs the constructor
    assert restarted.resumed_from() == max(c.version for c in actor.clusterers) > 0
    for before, after in zip(actor.clusterers, restarted.clusterers):
        np.testing.assert_array_equal(before.centroids, after.centroids)
    with pytest.raises(ValueError, match="stream 2 is not one of this actor's 2"):
        restarted.apply_summaries([], 2)

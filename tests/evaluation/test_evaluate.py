"""Evaluation: exact match, the random projection, the diagnostics, the baselines and quality.py end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow.parquet as pq
import pytest

from gs_ray.config import load_config
from gs_ray.core.errors import ConfigError
from gs_ray.core.rundir import RunDir
from gs_ray.evaluation.analysis import (
    BLOCK_GRAM_PREFIX,
    PROJECTION_BLOCK,
    block_grams,
    cosine_matrix,
    load_analysis,
    pca_2d,
    rademacher_project,
    variance_ratio,
)
from gs_ray.evaluation.baselines import BASELINE_METHODS, BaselineRun, spherical_kmeans
from gs_ray.evaluation.diagnostics import component_shares, cosine_pairs, nearest_neighbour_agreement, pair_summary
from gs_ray.evaluation.evaluate import CONFIDENCE, METHODS, checkable_rows, comparisons, paired_interval, routed_loses_to
from gs_ray.evaluation.exact_match import is_checkable, is_correct, predicted_answer, reference_answer
from gs_ray.evaluation.report.markdown import render, shortfalls
from gs_ray.evaluation.scoring import Route, answers_by_method, mixed_token_losses

from conftest import REPO

QUALITY_TIMEOUT_S = 1800
"""The first test to use quality_quick may also build the shared finished tiny run: on 2 busy cores that
plus every evaluation stage took over the suite's default 900 s."""


@pytest.mark.parametrize("generated, correct", [
    ("Half of 84 is 42.\n#### 42", True),
    ("#### 42.0", True),
    ("####42", True),
    ("The answer is 42.", True),          # no marker: the last number counts
    ("42 apples, and then 43", False),    # ... so a later number wins
    ("#### 41\nor maybe 42", False),      # the marked number wins over a later one
    ("#### -42", False),
    ("no number at all", False),
    ("", False),
])
def test_gsm8k_exact_match_variants(generated, correct):
    assert is_correct(generated, "She has 40 + 2 = 42.\n#### 42") is correct


def test_exact_match_compares_values_and_needs_a_checkable_reference():
    assert is_correct("#### 1,000", "#### 1000") and is_correct("$1000.00", "so\n#### 1,000")
    assert reference_answer("def f(): return 42") is None  # MBPP-style: not checkable
    assert not is_correct("42", "def f(): return 42")
    assert predicted_answer("#### 12 apples") == predicted_answer("12")


@pytest.mark.parametrize("generated, reference, correct", [
    ("42", "42", True), (" Even.\n", "even", True), ("ODD", "odd", True), ("rekcor", "rekcor", True),
    ("42 apples", "42", False),          # the whole reply counts, not its last number
    ("The answer is 42", "42", False),
    ("#### 42", "42", False),
    ("", "odd", False),
])
def test_text_exact_match_compares_whole_replies(generated, reference, correct):
    assert is_correct(generated, reference, "text") is correct


def test_text_rule_makes_every_reference_checkable():
    references = ["def f(): return 42", "odd", "So 42.\n#### 42"]
    assert [is_checkable(r, "text") for r in references] == [True, True, True]
    assert [is_checkable(r, "number") for r in references] == [False, False, True]
    assert checkable_rows([{"response": r} for r in references], 2, "text") == [0, 1]
    with pytest.raises(ConfigError, match="evaluate.answer_check"):
        load_config("tiny", ["evaluate.answer_check=words"])


def test_rademacher_projection_is_seeded_deterministic_and_preserves_norms():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(12, PROJECTION_BLOCK + 900)).astype(np.float32)  # two blocks, the second partial
    first, again = rademacher_project(grads, 4096, seed=7), rademacher_project(grads, 4096, seed=7)
    other = rademacher_project(grads, 4096, seed=8)
    assert first.shape == (12, 4096) and np.array_equal(first, again) and not np.allclose(first, other)
    ratio = np.linalg.norm(first, axis=1) / np.linalg.norm(grads, axis=1)
    assert np.all(np.abs(ratio - 1) < 0.1), ratio  # Johnson-Lindenstrauss: ~ sqrt(2 / 4096) relative error
    # A memmap-like row slice projects the same as the whole (blocks are seeded by index, not by caller).
    assert np.allclose(rademacher_project(grads[:3], 4096, seed=7), first[:3], atol=1e-4)


def test_variance_ratio_is_below_one_on_planted_clusters_and_matches_the_direct_formula():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 40)) * 3
    planted = np.repeat(np.arange(3), 20)
    rows = centres[planted] + rng.normal(size=(60, 40))
    gram = rows @ rows.T
    direct = sum(((rows[planted == c] - rows[planted == c].mean(0)) ** 2).sum() for c in range(3))
    total = ((rows - rows.mean(0)) ** 2).sum()
    assert variance_ratio(gram, planted) == pytest.approx(direct / total, rel=1e-9)
    assert variance_ratio(gram, planted) < 0.2
    assert variance_ratio(gram, rng.permutation(planted)) > 0.8  # clusters unrelated to the gradients explain little
    assert variance_ratio(gram, np.zeros(60)) == pytest.approx(1.0)
    assert np.allclose(np.diag(cosine_matrix(gram)), 1.0)
    coordinates = pca_2d(gram)  # the planted clusters separate on the first two components
    assert coordinates.shape == (60, 2)
    assert variance_ratio(coordinates @ coordinates.T, planted) < 0.1


def test_block_grams_sum_to_the_whole_gram_and_refuse_a_layout_with_gaps():
    matrix = np.random.default_rng(3).normal(size=(6, 10)).astype(np.float32)
    blocks = {"q_proj.lora_A": [(0, 2), (5, 7)], "q_proj.lora_B": [(2, 5), (7, 10)]}
    grams = block_grams(matrix, blocks)
    columns = matrix[:, [0, 1, 5, 6]].astype(np.float64)
    np.testing.assert_allclose(grams["q_proj.lora_A"], columns @ columns.T, rtol=1e-6)
    whole = matrix.astype(np.float64)
    np.testing.assert_allclose(grams["q_proj.lora_A"] + grams["q_proj.lora_B"], whole @ whole.T, rtol=1e-6)
    with pytest.raises(ValueError, match="gaps or overlaps"):
        block_grams(matrix, {"q_proj.lora_A": [(0, 2)], "q_proj.lora_B": [(3, 10)]})
    with pytest.raises(ValueError, match="10 columns"):
        block_grams(matrix, {"q_proj.lora_A": [(0, 4)], "q_proj.lora_B": [(4, 8)]})


def test_mixture_loss_is_the_mixed_distributions_loss():
    first, second = np.array([0.5, 2.0]), np.array([1.5, 0.1])
    assert np.allclose(mixed_token_losses([first, second], (1.0, 0.0)), first)
    mixed = mixed_token_losses([first, second], (0.3, 0.7))
    assert np.allclose(mixed, -np.log(0.3 * np.exp(-first) + 0.7 * np.exp(-second)))
    assert np.all(mixed <= np.maximum(first, second)) and np.all(mixed >= np.minimum(first, second))


def test_paired_interval_is_exact_for_a_constant_difference_and_pairing_cancels_shared_difficulty():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 200, size=40).astype(float)
    shared = rng.normal(2.0, 0.5, size=40) * tokens  # loss sums: rows differ far more than the methods do
    low, high = paired_interval(shared - 0.01 * tokens, shared, tokens)
    assert low == pytest.approx(-0.01) and high == pytest.approx(-0.01)
    ours = shared - 0.01 * tokens + rng.normal(0.0, 0.002, size=40) * tokens
    low, high = paired_interval(ours, shared, tokens)
    assert -0.02 < low < high < 0.0  # resolved, though the per-row spread between rows is 50x the difference
    low, high = paired_interval(shared, ours, tokens)  # and the mirror image
    assert 0.0 < low < high < 0.02


def test_paired_interval_has_the_normal_approximations_width_and_holds_zero_for_noise():
    rng = np.random.default_rng(1)
    differences = rng.normal(0.0, 1.0, size=400)
    low, high = paired_interval(differences, np.zeros(400), np.ones(400))
    mean, standard_error = differences.mean(), differences.std(ddof=1) / np.sqrt(400)
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    assert low == pytest.approx(mean - z * standard_error, abs=0.2 * standard_error)
    assert high == pytest.approx(mean + z * standard_error, abs=0.2 * standard_error)
    assert low < 0.0 < high
    with pytest.raises(ValueError, match="equal, non-empty per-row lists: got 3, 2 and 3 rows"):
        paired_interval([1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="got 0, 0 and 0 rows"):
        paired_interval([], [], [])


class _RecordingScorer:
    """Stands in for AdapterScorer.answers: an answer names its row and route, and every decode is recorded."""

    def __init__(self):
        self.decoded = []

    def answers(self, rows, routes, max_new_tokens, batch_size):
        self.decoded.extend(zip((row["sample_id"] for row in rows), routes))
        return [f"{row['sample_id']} via {route.adapters}" for row, route in zip(rows, routes)]


def test_methods_that_route_a_row_the_same_way_share_one_decoded_answer():
    rows = [{"sample_id": f"s{i}"} for i in range(4)]
    expert = [Route(("expert-0",)), Route(("expert-1",))]
    methods = {"routed": [expert[0], expert[1], expert[0], expert[1]],
               "oracle": [expert[0], expert[1], expert[1], expert[1]],  # differs from routed on row 2 only
               "ensemble": [Route(("expert-0", "expert-1"), (0.5, 0.5))] * 4}
    scorer = _RecordingScorer()
    answers = answers_by_method(scorer, rows, methods, [0, 2, 3], max_new_tokens=8, batch_size=2)
    # routed and oracle agree on rows 0 and 3: 3 rows x 3 methods, less those two shared decodes.
    assert len(scorer.decoded) == len(set(scorer.decoded)) == 7
    for method, routes in methods.items():
        assert answers[method] == {i: f"s{i} via {routes[i].adapters}" for i in (0, 2, 3)}
    assert answers_by_method(scorer, rows, methods, [], max_new_tokens=8, batch_size=2) == {m: {} for m in methods}


def test_spherical_kmeans_finds_k_clusters_deterministically():
    rng = np.random.default_rng(2)
    rows = np.vstack([rng.normal(size=(15, 8)) + 6 * np.eye(8)[i] for i in range(3)])
    clusters, centroids = spherical_kmeans(rows, 3, restarts=3, seed=0)
    again, _ = spherical_kmeans(rows, 3, restarts=3, seed=0)
    assert np.array_equal(clusters, again) and sorted(np.bincount(clusters)) == [15, 15, 15]
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0)


def test_a_baseline_run_owns_clusters_experts_router_and_shares_the_rest(tmp_path):
    run = RunDir(tmp_path / "run")
    baseline = BaselineRun(run, "embedding")
    assert baseline.stage_dir("experts") == tmp_path / "run" / "baselines" / "embedding" / "experts"
    assert baseline.stage_dir("data") == run.stage_dir("data") and baseline.stage_dir("analysis") == run.stage_dir("analysis")
    assert baseline.ray_train_storage == run.ray_train_storage
    with pytest.raises(ValueError, match="unknown baseline"):
        BaselineRun(run, "nearest")


def test_cosine_pairs_separate_sources_where_the_representation_does():
    labels = ["a"] * 5 + ["b"] * 5
    gradients = np.repeat(np.eye(2), 5, axis=0)  # two orthogonal directions, one per source
    pairs = cosine_pairs(gradients @ gradients.T, np.ones((10, 3)), labels, count=1000, seed=0)
    assert len(pairs["i"]) == 45 and all(i < j for i, j in zip(pairs["i"], pairs["j"]))  # every pair once
    summary = pair_summary(pairs)
    assert summary["gradient"]["separation"] == pytest.approx(1.0)
    assert summary["embedding"]["separation"] == pytest.approx(0.0)


def test_nearest_neighbours_and_component_shares_tell_local_from_global_structure():
    rng = np.random.default_rng(0)
    labels = ["a"] * 20 + ["b"] * 20
    # Each source is 10 tight pairs in its own random directions: locally pure, globally flat.
    directions = rng.standard_normal((20, 400))
    rows = np.repeat(directions, 2, axis=0) + 0.05 * rng.standard_normal((40, 400))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert nearest_neighbour_agreement(rows @ rows.T, labels) == 1.0
    flat = component_shares(rows @ rows.T, 5)
    assert len(flat) == 5 and flat == sorted(flat, reverse=True) and flat[0] < 0.1
    # Two sources along two opposite directions: the top component holds almost all the variance.
    planted = np.repeat(np.array([[1.0, 0.0], [-1.0, 0.0]]), 20, axis=0) + 0.01 * rng.standard_normal((40, 2))
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    assert component_shares(planted @ planted.T, 2)[0] > 0.99
    shuffled = ["a", "b"] * 20  # each tight pair split between the sources: the neighbour is the other one
    assert nearest_neighbour_agreement(rows @ rows.T, shuffled) == 0.0
    assert nearest_neighbour_agreement(np.ones((1, 1)), ["a"]) is None


def _synthetic_evaluation() -> dict:
    def method(loss, em):
        return {"loss": loss, "per_source": {"math": loss, "code": loss + 0.1}, "exact_match": em,
                "exact_match_per_source": {"math": em}, "exact_match_samples": {"math": 4}}

    methods = {name: method(1.0, 0.5) for name in METHODS}
    methods["routed"] = method(0.9, 0.25)  # better loss than everyone, worse exact match
    clusterings = {name: {"k": 2, "sizes": [3, 3], "agreement": {"purity": 1.0, "nmi": 1.0, "ari": 1.0},
                          "variance_ratio": 0.5, "variance_ratio_normalized": 0.6}
                   for name in ("gradientspace", "embedding", "random_projection")}
    clusterings["embedding"]["variance_ratio_normalized"] = 0.4  # embedding reduces variance more
    clusterings["source_labels"] = {"k": 2, "variance_ratio": 0.5, "variance_ratio_normalized": 0.5}
    pair = {"same_source_mean": 0.5, "cross_source_mean": 0.1, "separation": 0.4}
    evaluation = {"methods": methods, "sources": ["code", "math"], "eval_samples": 10, "exact_match_samples": 4,
                  "router_accuracy": {"gradientspace": 1.0, "embedding": 0.9, "random_projection": 0.8},
                  "training_steps": {"gradientspace": 16, "single_lora": 16},
                  "diagnostics": {"clusterings": clusterings,
                                  "cosine_pairs": {"pairs": 45, "same_source_pairs": 20, "pearson": 0.3,
                                                   "gradient": pair, "embedding": pair},
                                  "source_structure": {"nearest_same_source": {"gradient": 0.9, "embedding": 0.8},
                                                       "chance": 0.5, "top_component_shares": [0.04, 0.03]}}}
    intervals = {(other, source, "loss"): (-0.15, -0.05) for other in METHODS for source in ("code", "math")}
    intervals["single_lora", "code", "loss"] = (-0.2, 0.02)  # a better point estimate inside the noise
    intervals |= {(other, "math", "exact_match"): (-0.4, -0.1) for other in METHODS}
    return evaluation | {"comparisons": comparisons(evaluation, intervals)}


def test_the_report_says_plainly_where_gradientspace_does_not_win(tiny_config):
    evaluation = _synthetic_evaluation()
    verdicts = {(c["against"], c["source"], c["metric"]): c["verdict"] for c in evaluation["comparisons"]}
    assert verdicts["base", "math", "loss"] == "better" and verdicts["single_lora", "code", "loss"] == "level"
    assert verdicts["base", "math", "exact_match"] == "worse"  # higher is better there: the interval's sign flips
    lines = shortfalls(evaluation)
    assert sum("exact match" in line for line in lines) == len(METHODS) - 1  # lost on exact match to every method
    loss_lines = [line for line in lines if "loss per token" in line]      # ... and clearly won every loss
    assert loss_lines == [                                                 # comparison but one, which is level
        "- code, loss per token (lower is better): routed GradientSpace 1.0000 vs single_lora 1.1000 (level; routed "
        "minus single_lora -0.1000, 95% interval [-0.2000, +0.0200]): GradientSpace does not clearly beat single_lora."]
    assert any("embedding clusters 0.4000" in line for line in lines)        # and on variance reduction
    text = render(tiny_config(), evaluation, ["spectrum"])
    for name in METHODS:
        assert f"| {name} |" in text
    assert "same source: 0.9000 by gradient cosine, 0.8000 by embedding cosine (chance 0.5000)" in text
    assert "principal components of the unit training gradients: 0.040, 0.030." in text
    assert ("0.2500 vs base 0.5000 (worse; routed minus base -0.2500, 95% interval [-0.4000, -0.1000]): "
            "GradientSpace does not clearly beat base") in text and "![spectrum](spectrum.png)" in text


def test_quality_summary_counts_a_tie_as_no_loss():
    evaluation = _synthetic_evaluation()
    evaluation["methods"]["base"]["exact_match_per_source"]["math"] = 0.25  # routed's own exact match
    intervals = {(c["against"], c["source"], c["metric"]): tuple(c["interval"]) for c in evaluation["comparisons"]}
    # Routed wins every loss and is behind every method but base on exact match, where it ties with base.
    assert routed_loses_to(comparisons(evaluation, intervals)) == sorted(set(METHODS) - {"routed", "base"})


# ---------------------------------------------------------------- end to end, on the shared finished tiny run


@pytest.fixture(scope="session")
def quality_quick(tiny_finished_run):
    """benchmarks/quality.py --quick on the finished tiny run (the built-in mix, its config): the evaluation stages.

    Run as users run it, a script of its own, joined to the session's Ray cluster (RAY_ADDRESS).
    """
    import ray

    from conftest import FINISHED_RUN_OVERRIDES

    cfg, manifests = tiny_finished_run
    argv = ["--quick", "--config", "tiny", "--mix", "builtin", "--run-dir", cfg.run.run_dir, *FINISHED_RUN_OVERRIDES]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=QUALITY_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = figures[-1]
    # The config quality.py ran with (its smoke settings on top), so that a rerun with it must skip every stage.
    (config,) = [figure for figure in figures if figure.get("figure") == "config"]
    quality_cfg = load_config(config["preset"], config["overrides"])
    return quality_cfg, manifests, summary, argv


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT_S)
def test_quality_quick_scores_every_method_and_writes_the_report(quality_quick):
    from gs_ray.data.batches import load_split
    from gs_ray.evaluation.evaluate import EVALUATION_FILE

    cfg, manifests, summary, _ = quality_quick
    run = RunDir(cfg.run.run_dir)
    assert set(summary["methods"]) == set(METHODS)
    evaluation = json.loads((run.stage_dir("evaluate") / EVALUATION_FILE).read_text())
    eval_rows = load_split(str(run.stage_dir("data") / "eval"))
    assert evaluation["eval_samples"] == len(eval_rows) and evaluation["sources"] == sorted({r["label"] for r in eval_rows})
    for method in METHODS:
        result = evaluation["methods"][method]
        assert set(result["per_source"]) == set(evaluation["sources"]) and result["loss"] > 0
        assert set(result["exact_match_per_source"]) == {"math"}  # only GSM8K references are checkable
    # The one LoRA trained through the same loop on every training sample, for the experts' total steps.
    baseline = json.loads((run.stage_dir("single_lora") / "train_metrics.json").read_text())
    experts = manifests["experts"]["summary"]["experts"]
    assert baseline["step"] == evaluation["training_steps"]["gradientspace"] == sum(e["steps"] for e in experts)
    assert evaluation["methods"]["single_lora"]["loss"] < evaluation["methods"]["base"]["loss"]
    assert evaluation["methods"]["single_lora"]["loss"] == pytest.approx(baseline["eval_loss_end"], rel=1e-4)
    if evaluation["router_accuracy"]["gradientspace"] == 1.0:
        assert evaluation["methods"]["routed"]["loss"] == pytest.approx(evaluation["methods"]["oracle"]["loss"])
        assert all(c["interval"] == [0.0, 0.0] and c["verdict"] == "level"
                   for c in evaluation["comparisons"] if c["against"] == "oracle")
    for found in evaluation["comparisons"]:
        low, high = found["interval"]
        better, worse = (high < 0, low > 0) if found["metric"] == "loss" else (low > 0, high < 0)
        assert low <= high and found["verdict"] == ("better" if better else "worse" if worse else "level")
    assert set(summary["routed_vs_single_lora"]) == set(evaluation["sources"])

    report = (run.stage_dir("report") / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in report
    for plot in manifests_report_plots(run):
        assert (run.stage_dir("report") / plot).stat().st_size > 0 and f"]({plot})" in report
    assert json.loads((Path(cfg.run.run_dir) / "quality.json").read_text()) == summary


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT_S)
def test_analysis_keeps_one_gram_matrix_per_gradient_block(quality_quick):
    cfg, _, _, _ = quality_quick
    run = RunDir(cfg.run.run_dir)
    arrays, rows = load_analysis(run.stage_dir("analysis"))
    blocks = {key[len(BLOCK_GRAM_PREFIX):]: gram for key, gram in arrays.items() if key.startswith(BLOCK_GRAM_PREFIX)}
    assert set(blocks) == {f"{module}.lora_{matrix}" for module in cfg.lora.target_modules for matrix in "AB"}
    assert all(gram.shape == (len(rows["sample_id"]),) * 2 for gram in blocks.values())
    np.testing.assert_allclose(sum(blocks.values()), arrays["gram"], rtol=1e-9)
    shares = run.manifest("analysis")["summary"]["block_norm_share"]
    assert set(shares) == set(blocks) and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert shares[f"{cfg.lora.target_modules[0]}.lora_A"] > 0  # A has gradients only once the warm-up moved B off zero


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT_S)
def test_cluster_options_replays_on_chosen_gradient_blocks(quality_quick):
    cfg, _, _, _ = quality_quick
    samples = len(load_analysis(RunDir(cfg.run.run_dir).stage_dir("analysis"))[1]["sample_id"])
    command = [sys.executable, str(REPO / "benchmarks" / "cluster_options.py"), "--run-dir", cfg.run.run_dir,
               "--quick", "--k", "2", "--val-samples", str(samples // 2)]
    done = subprocess.run([*command, "--blocks", "lora_B"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["summary"] and summary["blocks"] == ["lora_B"] and summary["samples"] == samples
    assert 0 < summary[f"purity_k2_m{samples // 2}_all"] <= 1
    missing = subprocess.run([*command, "--blocks", "no_such_proj"], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no gradient block matches ['no_such_proj']" in missing.stderr


def manifests_report_plots(run: RunDir) -> list[str]:
    return run.manifest("report")["summary"]["plots"]


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT_S)
def test_baselines_use_the_same_k_and_budget_and_a_rerun_skips_every_stage(quality_quick):
    from gs_ray.evaluation.stages import run_evaluation

    cfg, manifests, _, _ = quality_quick
    run = RunDir(cfg.run.run_dir)
    k = manifests["cluster"]["summary"]["k"]
    gs_steps = [e["steps"] for e in manifests["experts"]["summary"]["experts"]]
    for method in BASELINE_METHODS:
        baseline = BaselineRun(run, method)
        clusters = pq.read_table(baseline.stage_dir("cluster") / "assignments.parquet")["cluster"].to_numpy()
        assert baseline.manifest("cluster")["summary"]["k"] == k and len(np.unique(clusters)) == k
        assert [e["steps"] for e in baseline.manifest("experts")["summary"]["experts"]] == gs_steps
        assert (baseline.stage_dir("router") / "router" / "router.json").is_file()
    rerun_started = time.time()
    rerun = run_evaluation(cfg)
    rebuilt = sorted(name for name, manifest in rerun.items() if manifest["started_at"] >= rerun_started)
    assert not rebuilt, f"a rerun with the same config rebuilt {rebuilt}"
    assert rerun["evaluate"]["digest"] == run.manifest("evaluate")["digest"]

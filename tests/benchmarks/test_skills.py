"""benchmarks/skills.py --quick end to end, as users run it: a script of its own, joined to the session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gs_ray.data.planted import FAMILIES, true_k

from conftest import REPO

SKILLS_TIMEOUT_S = 1500
METHODS = {"gradientspace", "offline", "offline_true_k", "minilm", "random_projection"}


@pytest.mark.slow
@pytest.mark.timeout(SKILLS_TIMEOUT_S)
def test_skills_quick_scores_every_method_against_skill_and_topic(ray_start_4_cpus, tmp_path):
    import ray

    families = ["shared_surface"]  # one of the four keeps the suite's time down; the script runs each the same way
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "skills.py"), "--quick", "--families", *families,
                           "--run-root", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=SKILLS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    sets = [f for f in figures if f["figure"] == "set"]
    assert [s["family"] for s in sets] == families
    for found in sets:
        assert found["k_true"] == true_k(found["family"]) and set(found["methods"]) == METHODS
        assert set(found["k_candidates"]) == {"gap", "silhouette", "eigengap", "prediction_strength"}
        assert found["k_chosen"] == found["k_candidates"]["silhouette"]  # the default rule decided
        for scores in found["methods"].values():
            assert all(0.0 <= scores[against]["nmi"] <= 1.0 for against in ("skill", "topic"))
        # The planted mix went through the data stage whole, labelled by skill.
        rows = (tmp_path / f"{found['family']}-s0" / "mix.jsonl").read_text().splitlines()
        assert len(rows) == 20 * len({json.loads(r)["skill"] for r in rows}) == 20 * found["k_true"]
    summary = figures[-1]
    assert summary["figure"] == "summary" and summary["sets"] == len(families)
    assert set(summary["k_hits_per_rule"]) == {"gap", "silhouette", "eigengap", "prediction_strength"}
    assert set(FAMILIES) >= set(families)
    _check_offline_tools_read_the_saved_features(tmp_path, [f"{family}-s0" for family in families])


def _check_offline_tools_read_the_saved_features(run_root, set_names: list[str]) -> None:
    """k_rules.py and online_pass.py run on the folders skills.py left, with no Ray and no gradients."""
    for script, extra in (("k_rules.py", []), ("online_pass.py", ["--val-fractions", "0.5", "--repeats", "2"])):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--run-root", str(run_root), *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [line["set"] for line in lines if "set" in line] == set_names
        summary = [line for line in lines if line.get("summary")]
        assert summary and all(s["sets"] == len(set_names) for s in summary)

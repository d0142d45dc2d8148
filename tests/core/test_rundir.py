"""Run directory, manifests, skip/rebuild decisions and the `gs-ray` CLI."""

import json

import pytest

from gs_ray.cli import EXIT_USER_ERROR, main
from gs_ray.core.rundir import MANIFEST, RunDir
from gs_ray.stages.data import DATA
from gs_ray.stages.pipeline import run_stages
from gs_ray.stages.warmup import WARMUP, warmup_epochs, warn_if_warmup_overfits


def test_cli_warmup_runs_stages_then_skips_them(ray_start_4_cpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["warmup", "--config", "tiny", "--run-dir", str(run_dir), "warmup.max_steps=6"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "[data] done" in first and "[warmup] done" in first and "== gs-ray summary ==" in first

    manifest = json.loads((run_dir / "warmup" / MANIFEST).read_text())
    summary = manifest["summary"]
    assert summary["step"] == 6
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    assert manifest["versions"]["ray"] == "2.60.0"
    assert "adapter/adapter_model.safetensors" in manifest["files"]
    assert not list(run_dir.glob(".*staging"))

    assert main(args) == 0
    second = capsys.readouterr().out
    assert "[data] up to date" in second and "[warmup] up to date" in second

    # A changed training setting rebuilds warm-up only; the data stage stays.
    assert main([*args[:-1], "warmup.max_steps=7"]) == 0
    third = capsys.readouterr().out
    assert "[data] up to date" in third and "[warmup] done" in third


def test_truncated_artifact_is_detected_and_rebuilt(ray_start_4_cpus, tiny_config):
    cfg = tiny_config()
    run_stages(cfg, "data")
    run = RunDir(cfg.run.run_dir)
    assert run.is_current(cfg, DATA)
    victim = next(run.stage_dir("data").glob("train/*.parquet"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert not run.is_current(cfg, DATA)
    run_stages(cfg, "data")
    assert run.is_current(cfg, DATA)


def test_upstream_change_makes_downstream_stale(ray_start_4_cpus, tiny_config):
    cfg = tiny_config("warmup.max_steps=2")
    run_stages(cfg, "warmup")
    run = RunDir(cfg.run.run_dir)
    assert run.is_current(cfg, WARMUP)
    changed = tiny_config("warmup.max_steps=2", "data.eval_fraction=0.15")
    assert not run.is_current(changed, DATA)
    run_stages(changed, "data")
    assert not run.is_current(changed, WARMUP)  # its recorded data digest no longer matches


def test_warmup_warns_when_it_passes_over_its_split_too_often(caplog):
    from gs_ray.config import load_config

    cfg = load_config("demo", ["warmup.max_steps=300", "train.micro_batch_size=4", "train.grad_accum_steps=2",
                               "train.num_workers=2"])
    assert warmup_epochs(cfg.train, 300, 480) == pytest.approx(10.0)  # 300 x 4 x 2 x 2 samples over 480
    with caplog.at_level("WARNING", logger="gs_ray.stages.warmup"):
        warn_if_warmup_overfits(cfg, warmup_epochs(cfg.train, 20, 480), 480)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="gs_ray.stages.warmup"):
        warn_if_warmup_overfits(cfg, warmup_epochs(cfg.train, 300, 480), 480)
    assert "300 steps make 10.0 passes over 480 warm-up samples" in caplog.text
    assert "lower warmup.max_steps or raise data.warmup_fraction" in caplog.text


def test_corrupt_manifest_counts_as_missing(tmp_path):
    stage = tmp_path / "data"
    stage.mkdir()
    (stage / MANIFEST).write_text("{not json")
    assert RunDir(tmp_path).manifest("data") is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["warmup", "--config", "tiny", "train.num_worker=2"], "did you mean 'train.num_workers'"),
        (["data", "--config", "tiny", "data.paths=[/no/such/file.jsonl]"], "/no/such/file.jsonl"),
        (["run", "--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(ray_start_4_cpus, tmp_path, capsys, argv, message):
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("gs-ray: error:") and message in err
    assert "Traceback" not in err


def test_config_command_prints_documented_yaml(capsys):
    assert main(["config", "--config", "demo", "train.num_workers=3"]) == 0
    out = capsys.readouterr().out
    assert "num_workers: 3  # Ray Train workers" in out
    assert 'name: "smollm2-135m"' in out

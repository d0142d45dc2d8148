"""Run dirs on object storage (an S3 server on loopback, the `s3_endpoint` fixture).

Jobs submitted to a Ray cluster with the run dir on S3 are tested on three nodes in tests/deploy/test_multinode.py.
"""

import threading
import uuid

import pyarrow.fs as pafs
import pytest
from conftest import S3_BUCKET

from gs_ray.cli import main
from gs_ray.core import storage


def _run_uri() -> str:
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}/run"


def test_locations_join_and_resolve(tmp_path):
    assert storage.join("s3://bucket/runs/", "data", "/train") == "s3://bucket/runs/data/train"
    assert storage.join(tmp_path, "data") == str(tmp_path / "data")
    assert not storage.is_uri(tmp_path) and not storage.is_uri(f"file://{tmp_path}") and storage.is_uri("gs://b/x")
    fs, path = storage.resolve(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


def test_data_stage_on_s3_is_mirrored_checked_and_rebuilt(ray_start_4_cpus, s3_endpoint, tmp_path, monkeypatch,
                                                          capsys):
    from gs_ray.core.rundir import RunDir
    from gs_ray.data.batches import load_split

    uri = _run_uri()
    # The converted tiny model stays where the other tests keep it; each mirror is a fresh cache.
    argv = ["data", "--config", "tiny", "--run-dir", uri, f"model.cache_dir={storage.cache_root()}"]
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "first"))
    assert main(argv) == 0
    assert "[data] running" in capsys.readouterr().out

    written = storage.file_sizes(storage.join(uri, "data"))
    assert "manifest.json" in written and any(name.startswith("train/") for name in written)
    assert storage.read_text(storage.join(uri, "config.yaml")).startswith("model:")
    first_mirror = RunDir(uri).stage_dir("data")
    train_from_s3 = load_split(storage.join(uri, "data", "train"))
    assert train_from_s3 and train_from_s3 == load_split(str(first_mirror / "train"))

    # Another machine (a fresh mirror) finds the stage done on storage and pulls it.
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "second"))
    assert main(argv) == 0
    assert "[data] up to date" in capsys.readouterr().out
    second_mirror = RunDir(uri).stage_dir("data")
    assert second_mirror != first_mirror and (second_mirror / "manifest.json").is_file()

    # A truncated object on storage is caught by the manifest and the stage is rebuilt.
    train_file = next(name for name in written if name.startswith("train/"))
    fs, root = storage.resolve(storage.join(uri, "data"))
    with fs.open_output_stream(f"{root}/{train_file}") as stream:
        stream.write(b"PAR1")
    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path / "third"))
    assert main(argv) == 0
    assert "[data] running" in capsys.readouterr().out
    assert load_split(storage.join(uri, "data", "train")) == train_from_s3


def test_a_folder_shared_while_its_stage_builds_is_readable_on_s3_until_the_stage_lands(s3_endpoint, tmp_path,
                                                                                       monkeypatch):
    """What the experts stage does with each expert's data subset: Train workers on other nodes read it from storage."""
    from gs_ray.config import load_config
    from gs_ray.core.rundir import RunDir, Stage, bring_up_to_date

    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path))
    uri = _run_uri()
    seen = {}

    def build(cfg, run, staging):
        subset = staging / "expert-0" / "train"
        subset.mkdir(parents=True)
        (subset / "part-0.parquet").write_bytes(b"rows of expert 0")
        seen["location"] = location = run.shared(subset)
        seen["while_building"] = storage.file_sizes(location)
        (staging / "experts.json").write_text("{}")
        return {}

    stage = Stage("experts_probe", (), (), build, lambda summary: "probe")
    bring_up_to_date(load_config("tiny", [f"run.run_dir={uri}"]), RunDir(uri), stage)
    assert seen["location"] == storage.join(uri, ".experts_probe.staging", "expert-0", "train")
    assert seen["while_building"] == {"part-0.parquet": len(b"rows of expert 0")}
    # Once the stage lands, its copy on storage holds the subset and the staging upload is gone.
    assert storage.file_sizes(storage.join(uri, ".experts_probe.staging")) == {}
    landed = storage.file_sizes(storage.join(uri, "experts_probe"))
    assert landed["expert-0/train/part-0.parquet"] == len(b"rows of expert 0") and "manifest.json" in landed


OUTAGE_S = 8.0
"""Longer than pyarrow's own retries of a refused connection ride out, so gs_ray's retries are what save the stage."""
PROBE_FILES = {"train/part-0.parquet": b"rows 0", "train/part-1.parquet": b"rows 1", "summary.json": b"{}"}


def _probe_stage(name: str):
    from gs_ray.core.rundir import Stage

    def build(cfg, run, staging):
        for relative, content in PROBE_FILES.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(content)
        return {}

    return Stage(name, (), (), build, lambda summary: "probe")


def _storage_down_from_first_upload(monkeypatch, server, back_after_s: float | None) -> threading.Event:
    """Stop the S3 server as the first file upload begins; start it again after back_after_s (None: when told)."""
    real_copy, back = storage.copy_file, threading.Event()

    def copy_file(*args, **kwargs):
        if not back.is_set() and not getattr(copy_file, "stopped", False):
            copy_file.stopped = True
            server.stop()
            if back_after_s is not None:
                threading.Timer(back_after_s, lambda: (server.start(), back.set())).start()
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(storage, "copy_file", copy_file)
    return back


def test_a_stage_upload_rides_out_a_short_storage_outage(s3_endpoint, tmp_path, monkeypatch, caplog):
    from gs_ray.config import load_config
    from gs_ray.core.rundir import RunDir, bring_up_to_date

    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path))
    uri = _run_uri()
    back = _storage_down_from_first_upload(monkeypatch, s3_endpoint, OUTAGE_S)
    bring_up_to_date(load_config("tiny", [f"run.run_dir={uri}"]), RunDir(uri), _probe_stage("outage_probe"))
    assert back.is_set()
    assert "retrying in" in caplog.text  # the outage happened under the upload, and was retried
    landed = storage.file_sizes(storage.join(uri, "outage_probe"))
    assert {name: size for name, size in landed.items() if name != "manifest.json"} == {
        name: len(content) for name, content in PROBE_FILES.items()}
    assert RunDir(uri).manifest("outage_probe") is not None


def test_a_long_storage_outage_fails_clearly_leaves_no_manifest_and_a_rerun_completes(s3_endpoint, tmp_path,
                                                                                      monkeypatch):
    from gs_ray.config import load_config
    from gs_ray.core.errors import StorageError
    from gs_ray.core.rundir import RunDir, bring_up_to_date

    monkeypatch.setenv("GS_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(storage, "WRITE_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "WRITE_RETRY_FIRST_WAIT_S", 0.1)
    uri, stage = _run_uri(), _probe_stage("long_outage_probe")
    cfg = load_config("tiny", [f"run.run_dir={uri}"])
    real_copy = storage.copy_file
    _storage_down_from_first_upload(monkeypatch, s3_endpoint, None)
    try:
        with pytest.raises(StorageError, match=r"storage: uploading .* failed 2 times .*running the same command "
                                               r"again resumes it"):
            bring_up_to_date(cfg, RunDir(uri), stage)
    finally:
        s3_endpoint.start()
    assert RunDir(uri).manifest("long_outage_probe") is None  # what was uploaded is never read as a finished stage
    monkeypatch.setattr(storage, "copy_file", real_copy)
    bring_up_to_date(cfg, RunDir(uri), stage)
    assert RunDir(uri).manifest("long_outage_probe") is not None


def test_submit_refuses_a_bad_config_before_reaching_a_cluster(capsys):
    # The address is never contacted: the typo is caught first.
    argv = ["submit", "run", "--address", "http://127.0.0.1:9", "--config", "tiny", "train.num_worker=2"]
    assert main(argv) == 2
    assert "did you mean 'train.num_workers'" in capsys.readouterr().err

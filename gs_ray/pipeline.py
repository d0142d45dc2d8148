"""Stage order, the run directory, manifests and resume.

A run directory holds one folder per finished stage, each with a `manifest.json` that
records what the stage was computed from (the config sections it reads, the seed, the
digests of upstream stages or of the input files), the package versions, and the size
and SHA-256 of every file it wrote. A stage is built in a hidden staging folder and
renamed into place only once complete, so a stage folder either is whole or does not
exist. Re-running skips every stage whose manifest still matches and whose files still
verify; anything else (changed config, changed input, a truncated file) is rebuilt, and
stages downstream of it follow because their manifests name its digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gs_ray import storage
from gs_ray.config import Config, TrainConfig
from gs_ray.errors import ConfigError, ModelError
from gs_ray.inputs import input_fingerprint

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
STAGING_SUFFIX = ".staging"
MIRROR_DIRNAME = "runs"
"""Folder under the cache root holding local mirrors of runs on object storage."""
RAY_TRAIN_DIRNAME = "ray_train"
"""Ray Train storage inside the run dir: checkpoints outlive a killed driver."""
VERSIONED_PACKAGES = ("gs_ray", "ray", "torch", "transformers", "peft", "deepspeed", "pyarrow")
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what it depends on and the function that builds it."""

    name: str
    sections: tuple[str, ...]
    """Config sections whose change makes the stage stale."""
    upstream: tuple[str, ...]
    """Stages whose outputs it reads."""
    build: Callable[[Config, "RunDir", Path], dict[str, Any]]
    """(config, run dir, staging folder) -> summary; writes outputs into the staging folder."""
    describe: Callable[[dict[str, Any]], str]
    """Summary -> the one-line report printed when the stage finishes."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under folder (except the manifest), by relative path."""
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


class RunDir:
    """The run directory: stage folders, their manifests, and Ray Train storage.

    A run dir given as a URI (s3://, gs://) lives on object storage. Stages are built in a
    local mirror (`root`) and pushed when complete, manifest last, so a stage on storage
    either has a manifest and all its files or counts as missing. A stage that is current
    on storage is pulled into the mirror, and its files checked against the manifest, before
    a later stage reads it; Ray Train checkpoints go to storage directly.
    """

    def __init__(self, location: str | Path):
        self.remote = str(location).rstrip("/") if storage.is_uri(location) else None
        if self.remote:
            key = hashlib.sha256(self.remote.encode()).hexdigest()[:16]
            self.root = storage.cache_root() / MIRROR_DIRNAME / key
        else:
            self.root = Path(location).absolute()

    @property
    def location(self) -> str:
        """Where the run lives: the URI, or the local folder."""
        return self.remote or str(self.root)

    def stage_dir(self, stage: str) -> Path:
        """The stage's local folder (the mirror's, for a run on object storage)."""
        return self.root / stage

    @property
    def ray_train_storage(self) -> str:
        return storage.join(self.location, RAY_TRAIN_DIRNAME)

    def shared(self, path: Path) -> str:
        """A location of `path` (a folder in this run) that every node of the cluster can read.

        Finished stages are on storage already; a folder still being built (in a staging
        folder) is uploaded next to where the stage will land, and removed when it lands.
        """
        if not self.remote:
            return str(path)
        relative = path.relative_to(self.root).as_posix()
        location = storage.join(self.remote, relative)
        if relative.split("/", 1)[0].endswith(STAGING_SUFFIX):
            storage.upload_tree(path, location)
        return location

    def manifest(self, stage: str) -> dict[str, Any] | None:
        location = storage.join(self.location, stage, MANIFEST)
        text = storage.read_text(location)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            logger.warning("%s is corrupt; the stage will be rebuilt", location)
            return None

    def expected_inputs(self, cfg: Config, stage: Stage) -> dict[str, Any]:
        """What a manifest must record for the stage to count as up to date."""
        inputs: dict[str, Any] = {"config": cfg.digest(list(stage.sections)), "seed": cfg.run.seed}
        for name in stage.upstream:
            upstream = self.manifest(name)
            inputs[name] = upstream["digest"] if upstream else None
        if stage.name == "data":
            inputs["files"] = input_fingerprint(cfg.data)
        return inputs

    def is_current(self, cfg: Config, stage: Stage) -> bool:
        manifest = self.manifest(stage.name)
        if manifest is None or manifest.get("inputs") != self.expected_inputs(cfg, stage):
            return False
        if self.remote and not self._pull(stage.name, manifest):
            return False
        actual = file_table(self.stage_dir(stage.name))
        if actual != manifest.get("files"):
            logger.warning("[%s] files differ from the manifest (truncated or edited); rebuilding", stage.name)
            return False
        return True

    def build(self, cfg: Config, stage: Stage) -> dict[str, Any]:
        """Build a stage in a staging folder, write its manifest, and swap it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{stage.name}{STAGING_SUFFIX}"
        if staging.exists():
            shutil.rmtree(staging)  # left by a killed run; never read
        staging.mkdir()
        inputs = self.expected_inputs(cfg, stage)
        started = time.time()
        summary = stage.build(cfg, self, staging)
        files = file_table(staging)
        manifest = {
            "stage": stage.name,
            "inputs": inputs,
            "files": files,
            "digest": hashlib.sha256(json.dumps([inputs, files], sort_keys=True).encode()).hexdigest()[:16],
            "versions": versions(),
            "started_at": started,
            "seconds": round(time.time() - started, 1),
            "summary": summary,
        }
        _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
        final = self.stage_dir(stage.name)
        if final.exists():
            retired = self.root / f".{stage.name}.retired"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            shutil.rmtree(retired)
        os.replace(staging, final)
        if self.remote:
            self._push(stage.name)
        return manifest

    def _push(self, stage: str) -> None:
        """Upload a finished stage: old copy (manifest included) out first, new manifest last."""
        location = storage.join(self.remote, stage)
        storage.delete_tree(location)
        storage.upload_tree(self.stage_dir(stage), location, exclude=(MANIFEST,))
        storage.write_text(storage.join(location, MANIFEST), (self.stage_dir(stage) / MANIFEST).read_text())
        storage.delete_tree(storage.join(self.remote, f".{stage}{STAGING_SUFFIX}"))

    def _pull(self, stage: str, manifest: dict[str, Any]) -> bool:
        """Bring the mirror's copy of a stage up to the one on storage; False if storage's copy is incomplete."""
        location = storage.join(self.remote, stage)
        expected_sizes = {name: entry["size"] for name, entry in manifest.get("files", {}).items()}
        if {k: v for k, v in storage.file_sizes(location).items() if k != MANIFEST} != expected_sizes:
            logger.warning("[%s] files on %s differ from its manifest; rebuilding", stage, location)
            return False
        mirrored = self.stage_dir(stage) / MANIFEST
        if mirrored.is_file() and json.loads(mirrored.read_text()).get("digest") == manifest["digest"]:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        # Unique per process: serving replicas on one node may pull the same stage at once.
        pulling = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.pulling-"))
        storage.download_tree(location, pulling)
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        try:
            os.replace(pulling, self.stage_dir(stage))
        except OSError:  # another process placed the same stage first
            shutil.rmtree(pulling, ignore_errors=True)
        return True

    def pull_finished(self, stages: tuple[str, ...]) -> Path:
        """This run's local root with its config and `stages` present and checked; a run on storage is mirrored first."""
        if not self.remote:
            return self.root
        for stage in stages:
            manifest = self.manifest(stage)
            if manifest is None or not self._pull(stage, manifest):
                raise ModelError(f"{storage.join(self.remote, stage)} is not a finished stage (no manifest, or files "
                                 f"missing); run `gs-ray run --run-dir {self.remote}` first")
            if file_table(self.stage_dir(stage)) != manifest.get("files"):
                raise ModelError(f"the copy of {storage.join(self.remote, stage)} does not match its manifest")
        config = storage.read_text(storage.join(self.remote, CONFIG_FILE))
        if config is None:
            raise ModelError(f"{self.remote} has no {CONFIG_FILE}: not a gs-ray run directory")
        _write_atomic(self.root / CONFIG_FILE, config)
        return self.root

    def save_config(self, cfg: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = cfg.to_yaml()
        _write_atomic(self.root / CONFIG_FILE, text)
        if self.remote:
            storage.write_text(storage.join(self.remote, CONFIG_FILE), text)


def _build_data(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    from gs_ray.data import prepare_data
    from gs_ray.models import resolve_model_path

    # Convert a built-in or GGUF model once here, not in whichever tokenizer actor comes first.
    resolve_model_path(cfg.model)
    return prepare_data(cfg, str(staging))


def _describe_data(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {count}" for name, count in summary["rows"].items())
    if summary.get("held_out_rows"):
        splits += f" ({summary['held_out_rows']} of them from data.eval_paths)"
    skipped = summary.get("bad_rows", {}).get("count", 0)
    return f"samples: {splits}" + (f"; {skipped} bad rows skipped" if skipped else "")


WARMUP_EPOCHS_WARNING = 4.0
"""Passes over the warm-up split above which the warm-up stage warns. Measured on the real mix (SmolLM2-135M,
LoRA on q/k/v/o, 71 warm-up samples): after 30 steps (1.7 passes) k-means at K = 3 (centered) split the gradients
by source with purity 0.75; after 300 steps (17 passes, held-out loss no better) 0.61 (benchmarks/RESULTS.md)."""


def warmup_epochs(train: TrainConfig, steps: int, samples: int) -> float:
    """Passes over `samples` warm-up samples that `steps` optimizer steps make."""
    return steps * train.micro_batch_size * train.grad_accum_steps * train.num_workers / max(samples, 1)


def warn_if_warmup_overfits(cfg: Config, epochs: float, samples: int) -> None:
    if epochs > WARMUP_EPOCHS_WARNING:
        logger.warning(
            "[warmup] %d steps make %.1f passes over %d warm-up samples (more than %.0f): gradients of an adapter "
            "fitted this closely to a small split separate sources worse; lower warmup.max_steps or raise "
            "data.warmup_fraction", cfg.warmup.max_steps, epochs, samples, WARMUP_EPOCHS_WARNING)


def _build_warmup(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    from gs_ray.train import SUMMARY_KEYS, TrainJob, run_training

    data_dir = run.stage_dir("data")
    job = TrainJob(
        # The digest in the name keeps a changed config from resuming an old run's checkpoints.
        name=f"warmup-{cfg.digest(list(WARMUP.sections))}-{run.manifest('data')['digest']}",
        train_split=run.shared(data_dir / "warmup"),
        eval_split=run.shared(data_dir / "eval"),
        output_dir=str(staging),
        storage_path=run.ray_train_storage,
        max_steps=cfg.warmup.max_steps,
        learning_rate=cfg.warmup.learning_rate,
        seed=cfg.run.seed,
    )
    metrics = run_training(cfg, job).metrics
    summary = {key: metrics.get(key) for key in SUMMARY_KEYS}
    summary["epochs"] = round(warmup_epochs(cfg.train, summary["step"], summary["train_samples"]), 2)
    warn_if_warmup_overfits(cfg, summary["epochs"], summary["train_samples"])
    return summary


def _describe_warmup(summary: dict[str, Any]) -> str:
    return (
        f"{summary['step']} steps on {summary['train_samples']} samples ({summary.get('epochs', 0):.1f} passes); "
        f"held-out loss "
        f"{summary['eval_loss_start']:.4f} (base) -> {summary['eval_loss_end']:.4f}"
    )


def _build_cluster(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    from gs_ray.gradient_stream import cluster_training_split

    adapter = run.shared(run.stage_dir("warmup") / "adapter")
    return cluster_training_split(cfg, run.shared(run.stage_dir("data")), adapter, staging)


def _describe_cluster(summary: dict[str, Any]) -> str:
    agreement = summary.get("agreement")
    against_labels = f"; vs labels: purity {agreement['purity']:.2f}, NMI {agreement['nmi']:.2f}" if agreement else ""
    return f"K={summary['k']} ({summary['k_rule']}); cluster sizes {summary['sizes']}{against_labels}"


def _build_experts(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    from gs_ray.experts import train_experts

    return train_experts(cfg, run, staging)


def _describe_experts(summary: dict[str, Any]) -> str:
    losses = ", ".join(
        f"{e['expert']}: {e['eval_loss_end']:.3f}" if e.get("eval_loss_end") is not None else f"{e['expert']}: -"
        for e in summary["experts"]
    )
    return (f"{len(summary['experts'])} experts, steps {[e['steps'] for e in summary['experts']]}; "
            f"held-out loss per expert {{{losses}}}; {summary['parallel_seconds']:.0f} s with jobs overlapping")


def _build_router(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    from gs_ray.router import train_run_router

    return train_run_router(cfg, run, staging)


def _describe_router(summary: dict[str, Any]) -> str:
    held_out = f", held-out split {summary['eval_accuracy']:.3f}" if summary.get("eval_accuracy") is not None else ""
    accuracy = summary["accuracy"]
    return (f"accuracy {accuracy:.3f} (holdout{held_out}; majority {summary['majority_baseline']:.3f})"
            if accuracy is not None else "trained (no holdout)")


DATA = Stage("data", ("model", "data"), (), _build_data, _describe_data)
WARMUP = Stage("warmup", ("model", "lora", "train", "warmup"), ("data",), _build_warmup, _describe_warmup)
CLUSTER = Stage("cluster", ("model", "grads", "cluster"), ("data", "warmup"), _build_cluster, _describe_cluster)
EXPERTS = Stage("experts", ("model", "lora", "train", "experts"), ("data", "warmup", "cluster"), _build_experts, _describe_experts)
ROUTER = Stage("router", ("router",), ("data", "cluster", "experts"), _build_router, _describe_router)
STAGES: dict[str, Stage] = {stage.name: stage for stage in (DATA, WARMUP, CLUSTER, EXPERTS, ROUTER)}
"""Every pipeline stage, in order. Evaluation's stages (baselines, metrics, report) are gs_ray.evaluation_stages'."""
RUN_LAST_STAGE = "router"
"""Where `gs-ray run` stops: evaluation trains baselines too, so it runs when asked (`gs-ray evaluate`)."""
EVALUATE_COMMAND = "evaluate"


def say(line: str) -> None:
    """Print one progress line in a single write: stages built side by side (threads) must not splice lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def bring_up_to_date(cfg: Config, run: RunDir, stage: Stage, *, force: bool = False, label: str = "") -> dict[str, Any]:
    """The stage's manifest: the existing one if current (and not forced), else a fresh build; one line printed."""
    label = label or stage.name
    if run.is_current(cfg, stage) and not force:
        say(f"[{label}] up to date ({run.stage_dir(stage.name)})")
        return run.manifest(stage.name)
    say(f"[{label}] running ...")
    manifest = run.build(cfg, stage)
    say(f"[{label}] done in {manifest['seconds']:.0f} s: {stage.describe(manifest['summary'])}")
    return manifest


def run_stages(cfg: Config, last: str, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Bring every stage up to `last` up to date; return their manifests.

    Requires an initialised Ray. Stages that are current are skipped unless `force`
    (which rebuilds only `last`). `last="evaluate"` continues through the evaluation stages.
    """
    if last == EVALUATE_COMMAND:
        from gs_ray.evaluation_stages import run_evaluation  # built on this module, so imported late

        return run_evaluation(cfg, force=force)
    if last not in STAGES:
        raise ConfigError(f"unknown stage {last!r}; stages: {', '.join([*STAGES, EVALUATE_COMMAND])}")
    run = RunDir(cfg.run.run_dir)
    run.save_config(cfg)
    names = list(STAGES)
    return {name: bring_up_to_date(cfg, run, STAGES[name], force=force and name == last)
            for name in names[: names.index(last) + 1]}

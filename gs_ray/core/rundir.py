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
from typing import TYPE_CHECKING, Any

from gs_ray.core import storage
from gs_ray.core.errors import ModelError

if TYPE_CHECKING:  # the config layer sits above core; a run dir only reads a config's digest, seed and YAML
    from gs_ray.config import Config

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
    fingerprint: Callable[["Config"], dict[str, Any]] | None = None
    """Config -> what outside the run the stage reads (input files' sizes and times), recorded in its manifest."""


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
        if stage.fingerprint is not None:
            inputs["files"] = stage.fingerprint(cfg)
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
        storage.write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
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
        storage.write_atomic(self.root / CONFIG_FILE, config)
        return self.root

    def save_config(self, cfg: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = cfg.to_yaml()
        storage.write_atomic(self.root / CONFIG_FILE, text)
        if self.remote:
            storage.write_text(storage.join(self.remote, CONFIG_FILE), text)


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

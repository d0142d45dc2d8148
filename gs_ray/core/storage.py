"""Locations that may be local paths or URIs (s3://, gs://, hdfs://), through pyarrow filesystems.

A run directory on object storage is what lets a multi-node cluster share one run: every
node reads the same stage folders and Ray Train keeps its checkpoints there, so they
outlive the node that wrote them. Credentials and endpoints come from the environment as
pyarrow reads them (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
instance roles). A shared filesystem path (NFS, a mounted volume) is a plain local path.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from gs_ray.core.errors import StorageError

logger = logging.getLogger(__name__)

LOCAL_SCHEME = "file://"
UPLOAD_THREADS = 8
"""Files of one tree uploaded at once."""
WRITE_ATTEMPTS = 6
"""Tries of each write to object storage (an upload, the manifest, a delete) before the stage fails."""
WRITE_RETRY_FIRST_WAIT_S = 0.5
"""The wait after the first failed try, doubled after each: 0.5 + 1 + ... + 8 s, about 15 s of outage ridden out
(a throttled bucket, a restarted endpoint; tests/core/test_storage.py stops the server under an upload)."""


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write a local file through a temporary file renamed over it: a reader, or a run killed mid-write, sees
    the old file or the new one, never half of one. `content` is text, bytes, or a function writing to a handle."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(target: Path, build: Callable[[Path], object]) -> None:
    """Build a folder beside `target`, then rename it into place: readers never see half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    """gs_ray's local cache (converted models, mirrors of remote runs): $GS_RAY_CACHE, else ~/.cache/gs_ray."""
    return Path(os.environ.get("GS_RAY_CACHE") or Path.home() / ".cache" / "gs_ray").expanduser()


def is_uri(location: str | Path) -> bool:
    """True for a remote location (scheme://...); local paths and file:// URIs are local."""
    text = str(location)
    return "://" in text and not text.startswith(LOCAL_SCHEME)


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a URI or a local path."""
    if not is_uri(location):
        return str(Path(location, *parts))
    return "/".join([str(location).rstrip("/"), *(part.strip("/") for part in parts)])


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path within it."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(str(location).removeprefix(LOCAL_SCHEME)).absolute())


def read_text(location: str) -> str | None:
    """A small file's text, or None if it does not exist."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def retrying_writes(what: str, write: Callable[[], object]) -> None:
    """Run `write` (one write to storage), again after a backoff when storage fails, WRITE_ATTEMPTS times at most.

    A write that still fails raises StorageError naming what and where. Nothing half-written is read meanwhile:
    an object appears only once its upload completes, and a stage counts as finished only with its manifest,
    which is written last.
    """
    wait = WRITE_RETRY_FIRST_WAIT_S
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            write()
            return
        except OSError as exc:  # pyarrow raises OSError for every filesystem failure
            if attempt == WRITE_ATTEMPTS:
                raise StorageError(
                    f"storage: {what} failed {WRITE_ATTEMPTS} times over {wait - WRITE_RETRY_FIRST_WAIT_S:.0f} s "
                    f"({exc}); the stage was not published (no manifest), so running the same command again "
                    "resumes it") from exc
            logger.warning("storage: %s failed (%s); retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
            wait *= 2


def write_text(location: str, text: str) -> None:
    """Write a small file whole. Object stores publish an object only when its upload completes."""
    fs, path = resolve(location)

    def write() -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    retrying_writes(f"writing {location}", write)


def file_sizes(location: str) -> dict[str, int]:
    """Size of every file under a folder, by path relative to it; empty if there is no folder."""
    fs, root = resolve(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {info.path[len(root) :].lstrip("/"): info.size for info in infos if info.type == pafs.FileType.File}


def delete_tree(location: str) -> None:
    fs, path = resolve(location)

    def delete() -> None:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    retrying_writes(f"deleting {location}", delete)


def upload_tree(local_dir: Path, location: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Copy every file under local_dir to location, except the relative paths in exclude.

    Files go up UPLOAD_THREADS at a time: a stage holds many small files (Parquet parts, adapter
    shards), and each is a round trip to the object store.
    """
    fs, root = resolve(location)
    local = pafs.LocalFileSystem()
    relative_paths = (path.relative_to(local_dir).as_posix() for path in sorted(local_dir.rglob("*")) if path.is_file())
    pairs = [(str(local_dir / relative), f"{root}/{relative}") for relative in relative_paths if relative not in exclude]
    for folder in sorted({target.rsplit("/", 1)[0] for _, target in pairs}):
        retrying_writes(f"creating {folder}", functools.partial(fs.create_dir, folder, recursive=True))

    def copy(pair: tuple[str, str]) -> None:
        retrying_writes(f"uploading {pair[0]} to {pair[1]}", functools.partial(
            copy_file, pair[0], pair[1], source_filesystem=local, destination_filesystem=fs))

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(copy, pairs))


def copy_file(source: str, target: str, *, source_filesystem: pafs.FileSystem,
              destination_filesystem: pafs.FileSystem) -> None:
    """One file's copy (the seam tests cut storage off at)."""
    pafs.copy_files(source, target, source_filesystem=source_filesystem, destination_filesystem=destination_filesystem)


def download_tree(location: str, local_dir: Path) -> None:
    """Copy every file under location into local_dir (created)."""
    fs, root = resolve(location)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(root, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    use_threads=True)


def local_copy(location: str | Path) -> Path:
    """A local folder with location's files: location itself if local, else a copy made once per process.

    Workers call this for inputs they load by path (an adapter folder): a URI is fetched
    to this process's cache, so a node never needs the driver's disk.
    """
    if not is_uri(location):
        return Path(location)
    target = _process_cache() / hashlib.sha256(str(location).encode()).hexdigest()[:16]
    if not target.exists():
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        download_tree(str(location), partial)
        os.replace(partial, target)
    return target


@functools.cache
def _process_cache() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gs-ray-remote-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder

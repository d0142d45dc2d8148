"""Which files a run reads: `data.paths` (the built-in mix when empty) and `data.eval_paths`, folders searched.

Listing needs only pyarrow's filesystems, so the pipeline checks whether its inputs changed
(`input_fingerprint`) without starting Ray Data; `gs_ray.data` reads what `resolve_files` names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from gs_ray.config import DataConfig
from gs_ray.core.errors import DataError
from gs_ray.data import schemas

BUILTIN_MIX: str = str(Path(__file__).parent.parent / "resources" / "builtin_mix.jsonl")


def _file_infos(paths: list[str], key: str) -> list[tuple[str, pafs.FileInfo]]:
    """Every data file named by `paths` (folders searched recursively) as (path or URI, info); `key` names them in errors."""
    found: dict[str, pafs.FileInfo] = {}
    for given in paths:
        uri = given if "://" in given else os.path.abspath(os.path.expanduser(given))
        scheme = uri.split("://")[0] + "://" if "://" in given else ""
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                selector = pafs.FileSelector(root, recursive=True)
                listed = sorted((i for i in fs.get_file_info(selector) if _is_data_file(i, root)), key=lambda i: i.path)
                if not listed:
                    raise DataError(f"{key}: folder {given} holds no {', '.join(schemas.DATA_SUFFIXES)} files")
                found.update((scheme + i.path, i) for i in listed)
                continue
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{key}: cannot access {given}: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{key}: no such file or directory: {given}")
        if not info.path.lower().endswith(schemas.DATA_SUFFIXES):
            raise DataError(f"{key}: {given} is not a {', '.join(schemas.DATA_SUFFIXES)} file")
        found[scheme + info.path] = info
    return list(found.items())


def _is_data_file(info: pafs.FileInfo, root: str) -> bool:
    """A data file inside a searched folder; hidden and underscore names (_SUCCESS, .ipynb_checkpoints) are not."""
    relative = info.path[len(root):].strip("/").split("/")
    hidden = any(part.startswith((".", "_")) for part in relative)
    return info.type == pafs.FileType.File and not hidden and info.path.lower().endswith(schemas.DATA_SUFFIXES)


def _input_files(cfg: DataConfig) -> tuple[list[tuple[str, pafs.FileInfo]], list[tuple[str, pafs.FileInfo]]]:
    """(files to split, held-out files) as (path or URI, info); DataError if one is missing or named by both."""
    training = _file_infos(cfg.paths or [BUILTIN_MIX], "data.paths")
    held_out = _file_infos(cfg.eval_paths, "data.eval_paths")
    both = sorted({path for path, _ in held_out} & {path for path, _ in training})
    if both:
        raise DataError(f"data.eval_paths: {', '.join(both)} is in data.paths too; a held-out file must not be trained on")
    return training, held_out


def resolve_files(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(the files to split: the built-in mix when cfg.paths is empty, data.eval_paths' files: every row is eval)."""
    training, held_out = _input_files(cfg)
    return [path for path, _ in training], [path for path, _ in held_out]


def input_fingerprint(cfg: DataConfig) -> list[dict]:
    """Path, size and modification time of every input file: the data stage reruns when one changes."""
    training, held_out = _input_files(cfg)
    found = [{"path": path, "size": info.size, "mtime_ns": info.mtime_ns} for path, info in training]
    return found + [{"path": path, "size": info.size, "mtime_ns": info.mtime_ns, "split": "eval"} for path, info in held_out]

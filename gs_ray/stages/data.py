"""The data stage: read, validate, template, tokenize and split the inputs (gs_ray.data.prepare does the work)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from gs_ray.config import Config
from gs_ray.core import layout
from gs_ray.core.rundir import RunDir, Stage
from gs_ray.data.inputs import input_fingerprint
from gs_ray.data.prepare import prepare_data
from gs_ray.modeling.models import load_tokenizer, resolve_model_path


def _build(cfg: Config, run: RunDir, staging: Path) -> dict[str, Any]:
    # Convert a built-in or GGUF model once here, not in whichever tokenizer actor comes first.
    resolve_model_path(cfg.model)
    return prepare_data(cfg, str(staging), functools.partial(load_tokenizer, cfg.model))


def describe(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {count}" for name, count in summary["rows"].items())
    if summary.get("held_out_rows"):
        splits += f" ({summary['held_out_rows']} of them from data.eval_paths)"
    skipped = summary.get("bad_rows", {}).get("count", 0)
    return f"samples: {splits}" + (f"; {skipped} bad rows skipped" if skipped else "")


def _input_files(cfg: Config) -> dict[str, Any]:
    return input_fingerprint(cfg.data)


DATA = Stage(layout.DATA_STAGE, ("model", "data"), (), _build, describe, fingerprint=_input_files)

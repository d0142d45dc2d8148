"""A split as the training side reads it: rows of a split folder, padded into tensors.

Kept apart from the data stage (`prepare`) so that training jobs and gradient actors load
rows without Ray Data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from gs_ray.core import storage

if TYPE_CHECKING:
    import torch

SPLITS = ("warmup", "val", "train", "eval")
"""The data stage's splits, each a folder of Parquet files."""
IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding); what torch's cross-entropy skips."""


def load_split(split_dir: str) -> list[dict]:
    """Rows of one split written by prepare_data (a path or URI), sorted by sample_id (a stable order); no Ray needed."""
    fs, root = storage.resolve(split_dir)
    files = sorted(f"{root}/{name}" for name in storage.file_sizes(split_dir) if name.endswith(".parquet"))
    if not files:
        return []
    rows = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files], promote_options="default").to_pylist()
    return sorted(rows, key=lambda row: row["sample_id"])


def pad_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) as int64 tensors."""
    import torch  # only the training side needs torch: keep the data stage light

    if not rows:
        raise ValueError("pad_batch needs at least one row")
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

"""The data stage: read, validate, format, tokenize and split instruction data with Ray Data.

Files (JSONL or Parquet; local paths, folders searched recursively, or pyarrow URIs such
as s3://) are read as bytes by Ray Data and parsed in a flat_map, so every sample keeps
its `<file>:<line>` (or `<file>:row <n>`) location; `gs_ray.schemas` documents the
formats and schemas. Validation runs inside Ray tasks but never raises there: a bad row
carries an `error` column and the driver applies `data.on_bad_row`, so the user gets one
clear `DataError` naming files and lines, or (with skip) a count and first examples.
Nothing is dropped silently; blank JSONL lines hold no sample and are not reported.

Normalized rows: sample_id, source, messages (JSON list of prompt turns), response (the
final assistant reply), label ("" without a label column), split. Tokenized rows add
input_ids, labels (-100 on prompt tokens), num_tokens, num_target_tokens, truncated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import Expr, col

from gs_ray.config import Config, DataConfig
from gs_ray.core.errors import DataError
from gs_ray.data import schemas
from gs_ray.data.batches import IGNORE_INDEX, SPLITS
from gs_ray.data.inputs import resolve_files

logger = logging.getLogger(__name__)

UNUSED = "unused"
"""Split of the samples that data.sample_fraction leaves out: counted, never written."""
ERROR_EXAMPLES = 5
"""Bad rows quoted in errors, warnings and the summary."""
TOKENIZE_BATCH_SIZE = 256
TOKENIZE_MAX_ACTORS = 4
HASH_BYTES = 8
"""Bytes of the split hash turned into a number in [0, 1)."""
TOKEN_PERCENTILES = (50, 95)
FALLBACK_TURN = "### {role}:\n{content}\n\n"
FALLBACK_GENERATION_PROMPT = "### Assistant:\n"
NORMALIZED_COLUMNS = ("sample_id", "source", "messages", "response", "label", "split")
_CHECK_COLUMNS = ["sample_id", "source", "error", "fatal"]
_STATS_COLUMNS = ["source", "error", "split", "label", "num_tokens", "num_target_tokens", "truncated"]
TokenizerLoader = Callable[[], Any]
"""Returns the model's tokenizer; called once in each tokenizing actor (the data layer knows no model)."""
_TOKEN_COLUMNS = {
    "input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()), "num_tokens": pa.int64(),
    "num_target_tokens": pa.int64(), "truncated": pa.bool_(), "error": pa.string(),
}


# ---------------------------------------------------------------- prompt formatting


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt the model answers: its chat template with the generation prompt appended.

    Tokenizers without a chat template get a plain `### Role:` format. Training and
    serving both call this, so prompts are formatted in exactly one place.
    """
    return _render(tokenizer, messages, add_generation_prompt=True)


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    text = "".join(
        FALLBACK_TURN.format(role=m["role"].capitalize(), content=m["content"] + (eos if m["role"] == "assistant" else ""))
        for m in messages
    )
    return text + (FALLBACK_GENERATION_PROMPT if add_generation_prompt else "")


def _reply_text(tokenizer: Any, messages: list[dict], response: str, prompt: str) -> str:
    """What follows the rendered prompt in the full rendered conversation: the reply and its end-of-turn text.

    Falls back to response + eos for templates whose full rendering does not start with
    the rendered prompt (some rewrite earlier turns once a reply is present).
    """
    full = _render(tokenizer, messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if full.startswith(prompt) and len(full) > len(prompt):
        return full[len(prompt):]
    return response + (tokenizer.eos_token or "")


END_OF_TURN_PROBE = "0"
"""A one-character reply rendered to find the text the chat template puts after every reply."""


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids the chat template puts after every assistant reply (ChatML: "<|im_end|>" and a newline).

    They end every training target, so their loss has the same target for every sample: its
    gradient carries what the context is about rather than which answer tokens it has.
    """
    messages = [{"role": "user", "content": "?"}]
    reply = _reply_text(tokenizer, messages, END_OF_TURN_PROBE, render_prompt(tokenizer, messages))
    end = reply[reply.index(END_OF_TURN_PROBE) + len(END_OF_TURN_PROBE):] if END_OF_TURN_PROBE in reply else ""
    return tokenizer(end, add_special_tokens=False)["input_ids"] if end else []


def encode_batch(tokenizer: Any, messages: list[list[dict]], responses: list[str], cfg: DataConfig) -> list[dict]:
    """Token ids and loss labels for samples; over-long samples follow cfg.overlong.

    Prompt and reply are tokenized separately (no special tokens added: the template
    has them) so the label mask is exact: -100 on every prompt token.
    """
    prompts = [render_prompt(tokenizer, m) for m in messages]
    replies = [_reply_text(tokenizer, m, r, p) for m, r, p in zip(messages, responses, prompts)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(replies, add_special_tokens=False)["input_ids"]
    return [_assemble(p, r, cfg) for p, r in zip(prompt_ids, reply_ids)]


def _assemble(prompt_ids: list[int], reply_ids: list[int], cfg: DataConfig) -> dict:
    room, total = cfg.max_seq_len - len(prompt_ids), len(prompt_ids) + len(reply_ids)
    error = ""
    if len(reply_ids) > room and cfg.overlong == "error":
        error = (f"sample has {total} tokens (prompt {len(prompt_ids)} + response {len(reply_ids)}), more than "
                 f"data.max_seq_len={cfg.max_seq_len}; raise it or set data.overlong=truncate")
    elif room <= 0:
        error = (f"prompt alone has {len(prompt_ids)} tokens, data.max_seq_len={cfg.max_seq_len}: "
                 "no response token would remain after truncation")
    if error:  # kept as a row (empty ids) so the driver can report it with its location
        return {"input_ids": [], "labels": [], "num_tokens": total, "num_target_tokens": len(reply_ids), "truncated": False, "error": error}
    kept = reply_ids[:room]
    return {"input_ids": prompt_ids + kept, "labels": [IGNORE_INDEX] * len(prompt_ids) + kept,
            "num_tokens": len(prompt_ids) + len(kept), "num_target_tokens": len(kept),
            "truncated": len(kept) < len(reply_ids), "error": ""}


# ---------------------------------------------------------------- splits


def _unit_hash(seed: int, salt: str, sample_id: str) -> float:
    """A number in [0, 1) from a hash of (seed, salt, sample_id): stable across reads and file order."""
    digest = hashlib.sha256(f"{seed}\x00{salt}{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:HASH_BYTES], "big") / 2 ** (8 * HASH_BYTES)


def split_of(sample_id: str, cfg: DataConfig, seed: int) -> str:
    """warmup | val | eval | train (or unused, outside data.sample_fraction) from hashes of (seed, sample_id)."""
    # An independent draw, so the splits of the samples kept keep their configured shares.
    if cfg.sample_fraction < 1 and _unit_hash(seed, "sample\x00", sample_id) >= cfg.sample_fraction:
        return UNUSED
    u = _unit_hash(seed, "", sample_id)
    for name, bound in (("warmup", cfg.warmup_fraction), ("val", cfg.val_fraction), ("eval", cfg.eval_fraction)):
        if u < bound:
            return name
        u -= bound
    return "train"


# ---------------------------------------------------------------- reading


def _bad_row(source: str, reason: str, fatal: bool = False) -> dict:
    # A reason may quote the input (a field name), and Arrow strings cannot hold what UTF-8 cannot encode.
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"sample_id": "", "source": source, "messages": "", "response": "", "label": "", "split": "", "error": reason, "fatal": fatal}


def _parse_file(row: dict, cfg: DataConfig, seed: int, held_out: bool) -> list[dict]:
    """flat_map body: one file's bytes -> one normalized (or bad) row per sample; held_out puts every row in eval."""
    path, out = row["path"], []
    try:
        for source, record, problem in schemas.iter_records(path, row["bytes"], cfg.schema):
            if problem:
                out.append(_bad_row(source, problem))
                continue
            try:
                sample = schemas.normalize(record, cfg.schema, cfg.id_column, cfg.label_column)
            except schemas.RowError as exc:
                out.append(_bad_row(source, str(exc)))
                continue
            out.append({
                "sample_id": sample["sample_id"], "source": source,
                "messages": json.dumps(sample["messages"], ensure_ascii=False), "response": sample["response"],
                "label": sample["label"], "split": "eval" if held_out else split_of(sample["sample_id"], cfg, seed),
                "error": "", "fatal": False,
            })
    except schemas.FileError as exc:
        return [_bad_row(path, str(exc), fatal=True)]
    return out


def _location_key(source: str) -> tuple[str, int]:
    """Sort key of `<file>:<line>`, `<file>:row <n>` or `<file>`: by file, then numerically."""
    file, _, tail = source.rpartition(":")
    number = tail.removeprefix("row ")
    return (file, int(number)) if number.isdigit() else (source, 0)


def _fetch(ds: ray.data.Dataset, columns: list[str]) -> pa.Table:
    """A few small columns of every row, on the driver."""
    batches = list(ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(batches) if batches else pa.table({c: [] for c in columns})


def _duplicates(table: pa.Table) -> list[tuple[str, str]]:
    """(source, reason) for every repeat of a sample_id; the first occurrence (by location) is kept."""
    counts = pc.value_counts(table["sample_id"])
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return []
    rows = table.filter(pc.is_in(table["sample_id"], value_set=repeated)).to_pylist()
    first: dict[str, str] = {}
    found = []
    for row in sorted(rows, key=lambda r: _location_key(r["source"])):
        if row["sample_id"] in first:
            found.append((row["source"], f"duplicate sample_id {row['sample_id']!r}, first at {first[row['sample_id']]}"))
        else:
            first[row["sample_id"]] = row["source"]
    return found


def _enforce(bad: list[tuple[str, str]], fatal: list[tuple[str, str]], cfg: DataConfig) -> None:
    """Raise DataError for fatal problems, or for bad rows under on_bad_row=error; else warn."""
    if fatal:
        lines = "\n".join(f"  {source}: {reason}" for source, reason in fatal)
        raise DataError(f"{len(fatal)} unusable input file(s) (an error even with data.on_bad_row=skip):\n{lines}")
    if not bad:
        return
    if cfg.on_bad_row == "error":
        more = f"\n  ... and {len(bad) - ERROR_EXAMPLES} more" if len(bad) > ERROR_EXAMPLES else ""
        raise DataError(f"{len(bad)} bad row(s) in the input data:\n{_examples_text(bad)}{more}\n"
                        "Fix them, or set data.on_bad_row=skip to drop them (the count is reported).")
    logger.warning("skipped %d bad row(s) (data.on_bad_row=skip), first:\n%s", len(bad), _examples_text(bad))


def _examples(bad: list[tuple[str, str]]) -> list[str]:
    return [f"{source}: {reason}" for source, reason in sorted(bad, key=lambda b: _location_key(b[0]))[:ERROR_EXAMPLES]]


def _examples_text(bad: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {line}" for line in _examples(bad))


def _good_rows(drop: list[str]) -> Expr:
    """Rows without an error and not among the `drop` sources (repeated ids)."""
    ok = col("error") == ""
    return ok & col("source").not_in(drop) if drop else ok


def _parsed(files: list[str], cfg: DataConfig, seed: int, held_out: bool) -> ray.data.Dataset:
    return ray.data.read_binary_files(files, include_paths=True).flat_map(
        functools.partial(_parse_file, cfg=cfg, seed=seed, held_out=held_out))


def _read_checked(cfg: DataConfig, seed: int) -> tuple[ray.data.Dataset, list[tuple[str, str]], tuple[list[str], list[str]]]:
    """Normalized good rows, the (source, reason) of every bad row skipped, and the files read (to split, held out).

    Raises per data.on_bad_row.
    """
    files, held_out_files = resolve_files(cfg)
    parsed = _parsed(files, cfg, seed, held_out=False)
    if held_out_files:
        # One dataset, so that a held-out sample repeated in a training file is caught as a duplicate.
        parsed = parsed.union(_parsed(held_out_files, cfg, seed, held_out=True))
    parsed = parsed.materialize()
    checks = _fetch(parsed, _CHECK_COLUMNS)
    errors = checks.filter(pc.not_equal(checks["error"], "")).to_pylist()
    fatal = [(r["source"], r["error"]) for r in errors if r["fatal"]]
    duplicates = _duplicates(checks.filter(pc.equal(checks["error"], "")))
    bad = [(r["source"], r["error"]) for r in errors if not r["fatal"]] + duplicates
    _enforce(bad, fatal, cfg)
    if len(bad) == len(checks):
        raise DataError(f"no usable samples in {', '.join(files + held_out_files)}: all {len(bad)} rows are bad, "
                        f"first:\n{_examples_text(bad)}")
    good = parsed.filter(expr=_good_rows([source for source, _ in duplicates])) if bad else parsed
    return good.select_columns(list(NORMALIZED_COLUMNS)), bad, (files, held_out_files)


def read_samples(cfg: DataConfig, seed: int) -> ray.data.Dataset:
    """Normalized rows of every input file, split assigned, bad-row policy applied (not tokenized)."""
    return _read_checked(cfg, seed)[0]


# ---------------------------------------------------------------- tokenization


class _Tokenize:
    """map_batches actor: loads the tokenizer once, then encodes batches of normalized rows."""

    def __init__(self, load_tokenizer: TokenizerLoader, cfg: DataConfig):
        self.tokenizer = load_tokenizer()
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        messages = [json.loads(m) for m in batch["messages"].to_pylist()]
        encoded = encode_batch(self.tokenizer, messages, batch["response"].to_pylist(), self.cfg)
        for name, kind in _TOKEN_COLUMNS.items():
            batch = batch.append_column(name, pa.array([e[name] for e in encoded], type=kind))
        return batch


def tokenize_samples(ds: ray.data.Dataset, load_tokenizer: TokenizerLoader, cfg: DataConfig) -> ray.data.Dataset:
    """Add input_ids, labels, num_tokens, num_target_tokens, truncated and error to normalized rows.

    A non-empty `error` marks an over-long sample that cfg.overlong cannot keep (its
    input_ids are empty); prepare_data applies data.on_bad_row to those rows.
    """
    return ds.map_batches(
        _Tokenize, fn_constructor_args=(load_tokenizer, cfg), batch_format="pyarrow",
        batch_size=TOKENIZE_BATCH_SIZE, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=TOKENIZE_MAX_ACTORS),
    )


# ---------------------------------------------------------------- the stage


def _token_stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    stats = {"min": int(values.min()), "mean": round(float(values.mean()), 1), "max": int(values.max()), "total": int(values.sum())}
    stats.update({f"p{q}": float(np.percentile(values, q)) for q in TOKEN_PERCENTILES})
    return stats


def _summary(stats: pa.Table, files: tuple[list[str], list[str]], bad: list[tuple[str, str]]) -> dict:
    rows = stats.to_pydict()
    labels: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for split, label in zip(rows["split"], rows["label"]):
        labels[split][label] = labels[split].get(label, 0) + 1
    training, held_out = files
    held_out_files = {path.split("://", 1)[-1] for path in held_out}  # sources name files as read: no URI scheme
    return {
        "files": len(training) + len(held_out),  # the manifest's input fingerprint lists them
        "rows": {split: sum(labels[split].values()) for split in SPLITS},
        "held_out_rows": sum(_location_key(source)[0] in held_out_files for source in rows["source"]),
        "labels": {split: dict(sorted(counts.items())) for split, counts in labels.items()},
        "bad_rows": {"count": len(bad), "examples": _examples(bad)},
        "tokens": {
            "num_tokens": _token_stats(np.asarray(rows["num_tokens"])),
            "num_target_tokens": _token_stats(np.asarray(rows["num_target_tokens"])),
            "truncated": int(sum(rows["truncated"])),
        },
    }


def prepare_data(cfg: Config, out_dir: str, load_tokenizer: TokenizerLoader) -> dict:
    """Read, validate, tokenize and split; write out_dir/<split>/ Parquet; return a summary.

    The summary holds the number of input files, rows per split and per label per split, the eval rows that
    came from data.eval_paths, bad rows (count and first examples as `<file>:<line>: <reason>`) and token
    statistics.
    """
    samples, bad, files = _read_checked(cfg.data, cfg.run.seed)
    left_out = 0
    if cfg.data.sample_fraction < 1:
        left_out = samples.filter(expr=col("split") == UNUSED).count()
        samples = samples.filter(expr=col("split") != UNUSED)
    tokenized = tokenize_samples(samples, load_tokenizer, cfg.data).materialize()
    stats = _fetch(tokenized, _STATS_COLUMNS)
    overlong = [(r["source"], r["error"]) for r in stats.filter(pc.not_equal(stats["error"], "")).to_pylist()]
    _enforce(overlong, [], cfg.data)
    if overlong:
        tokenized = tokenized.filter(expr=_good_rows([]))
        stats = stats.filter(pc.equal(stats["error"], ""))
        if len(stats) == 0:
            raise DataError(f"no usable samples: all {len(overlong)} are longer than data.max_seq_len="
                            f"{cfg.data.max_seq_len}, first:\n{_examples_text(overlong)}")
    tokenized = tokenized.drop_columns(["error"])
    summary = _summary(stats, files, bad + overlong) | {"left_out_by_sample_fraction": left_out}
    for split in SPLITS:
        target = Path(out_dir) / split
        target.mkdir(parents=True, exist_ok=True)
        if summary["rows"][split]:
            tokenized.filter(expr=col("split") == split).write_parquet(str(target.resolve()))
        else:
            logger.warning("the %s split is empty (%d samples in all)", split, len(stats))
    return summary

"""Pure parsing of input files into normalized samples: no Ray, no tokenizer.

`iter_records` turns one file's bytes into (location, record, problem) triples and
`normalize` turns one record into a sample (prompt messages, final reply, label, id).
Both report a problem instead of crashing on it, because they run inside Ray tasks,
where an exception would surface as an unreadable nested traceback; the driver decides.

Formats:
- JSONL (`.jsonl`, `.json`): one JSON object a line; locations are `<file>:<line>`
  (1-based). Blank lines hold no sample and are skipped without a report. A `.json`
  file whose first non-blank character is `[` is read as one JSON array instead.
- Parquet (`.parquet`): locations are `<file>:row <n>` (1-based).

Schemas (detected per record with `auto`):
- alpaca: {instruction, input (optional), output}; user turn = instruction, plus
  "\\n\\n" + input when input is non-empty.
- chat: {messages: [{role, content}, ...]} ending with the assistant's reply; earlier
  turns (system, user, assistant) are the prompt, the final reply is the target.
- prompt_completion: {prompt, completion}; the prompt becomes one user turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
"""Required fields of each schema; auto-detection looks for them."""
ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
MAX_LINE_BYTES = 4 * 1024 * 1024
"""Largest JSONL line accepted: ~1M tokens, far past any max_seq_len; bigger lines are bad rows."""
SAMPLE_ID_HEX_CHARS = 16
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_BATCH_ROWS = 4096
"""Parquet rows converted to Python objects at a time (bounds the temporary copy)."""
Record = dict[str, Any]


class RowError(ValueError):
    """Why one record is not a usable sample."""


class FileError(ValueError):
    """Why a whole file cannot be used (an error even with on_bad_row=skip)."""


class _DuplicateKey(ValueError):
    """A JSON object names one key twice; json keeps only the last value, which would drop data silently."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> Record:
    record = dict(pairs)
    if len(record) != len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _DuplicateKey(f"key {repeated!r} appears twice in one object")
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_LENIENT_DECODER = json.JSONDecoder()
"""Finds where an element with a repeated key ends, so that a JSON array can be read past it."""


def json_problem(exc: ValueError | RecursionError) -> str:
    """Why a JSON text cannot become a value, whatever json raised (data files and request bodies alike)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "invalid JSON: values nested too deeply to read"
    if isinstance(exc, _DuplicateKey):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):  # json.loads of bytes that are not UTF-8, -16 or -32
        return f"invalid JSON: not valid UTF-8 at byte {exc.start}"
    # The only other ValueError json raises: an integer over Python's conversion limit.
    return f"invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits"


# ---------------------------------------------------------------- files -> records


def iter_records(path: str, data: bytes, schema: str) -> Iterator[tuple[str, Record | None, str]]:
    """Yield (location, record, problem) for each sample in a file; problem is "" when fine.

    Raises FileError for problems of the file as a whole (empty, unreadable Parquet,
    a broken JSON array, a Parquet file without the schema's columns).
    """
    if path.lower().endswith(PARQUET_SUFFIXES):
        rows: Iterator[tuple[str, Record | None, str]] = _parquet_records(path, data, schema)
    elif path.lower().endswith(".json") and data.removeprefix(UTF8_BOM).lstrip().startswith(b"["):
        rows = _json_array_records(path, data)
    else:
        rows = _jsonl_records(path, data)
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise FileError("empty file: it holds no samples")


def _jsonl_records(path: str, data: bytes) -> Iterator[tuple[str, Record | None, str]]:
    for number, line in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), start=1):
        location = f"{path}:{number}"
        if not line.strip():
            continue  # a blank line holds no sample: nothing is dropped
        if len(line) > MAX_LINE_BYTES:
            yield location, None, f"line of {len(line):,} bytes exceeds the {MAX_LINE_BYTES // 2**20} MiB limit for one sample"
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield location, None, f"invalid UTF-8 at byte {exc.start} of the line"
            continue
        try:
            value = _DECODER.decode(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            yield location, None, json_problem(exc)
            continue
        yield location, *_as_record(value)


def _json_array_records(path: str, data: bytes) -> Iterator[tuple[str, Record | None, str]]:
    """Walk a JSON array element by element so each sample keeps its line number."""
    try:
        text = data.removeprefix(UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FileError(f"invalid UTF-8 on line {line}") from None
    position = text.index("[") + 1
    line, counted = 1, 0  # lines counted incrementally: recounting from 0 is quadratic in big files
    while True:
        position = _skip_space(text, position)
        line, counted = line + text.count("\n", counted, position), position
        if text.startswith("]", position):
            after = _skip_space(text, position + 1)
            if after < len(text):
                where = line + text.count("\n", position, after)
                raise FileError(f"unexpected text after the JSON array, line {where}")
            return
        try:
            value, end = _DECODER.raw_decode(text, position)
            record, problem = _as_record(value)
        except _DuplicateKey as exc:  # the element itself is well-formed: report it and read on
            (_, end), record, problem = _LENIENT_DECODER.raw_decode(text, position), None, json_problem(exc)
        except json.JSONDecodeError as exc:
            raise FileError(f"invalid JSON array at line {exc.lineno}: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # where the element ends is unknown: the rest is unreadable
            raise FileError(f"JSON array element at line {line}: {json_problem(exc)}") from None
        yield f"{path}:{line}", record, problem
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            line += text.count("\n", counted, position)
            raise FileError(f"invalid JSON array at line {line}: expected ',' or ']'")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _as_record(value: Any) -> tuple[Record | None, str]:
    if isinstance(value, dict):
        return value, ""
    return None, f"expected a JSON object, got {_type_name(value)}"


def _parquet_records(path: str, data: bytes, schema: str) -> Iterator[tuple[str, Record | None, str]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise FileError(f"not a readable Parquet file: {exc}") from None
    _check_parquet_columns(table.column_names, schema)
    number = 0
    for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", record, ""


def _check_parquet_columns(columns: list[str], schema: str) -> None:
    """A Parquet file must have the columns of the configured schema (or of some schema, for auto)."""
    wanted = SCHEMA_FIELDS.items() if schema == "auto" else [(schema, SCHEMA_FIELDS[schema])]
    if any(all(name in columns for name in fields) for _, fields in wanted):
        return
    expected = " or ".join(f"{name} ({', '.join(fields)})" for name, fields in wanted)
    raise FileError(f"missing required columns: expected {expected}; the file has {', '.join(columns) or 'no columns'}")


# ---------------------------------------------------------------- record -> sample


def normalize(record: Record, schema: str, id_column: str, label_column: str) -> Record:
    """One record -> {sample_id, messages, response, label}; raises RowError with the reason."""
    schema = detect_schema(record) if schema == "auto" else schema
    messages, response = _PARSERS[schema](record)
    return {
        "sample_id": _sample_id(record, id_column) if id_column else content_id(messages, response),
        "messages": messages,
        "response": response,
        "label": _label(record, label_column),
    }


def detect_schema(record: Record) -> str:
    """The one schema whose required fields are all present (non-null)."""
    matches = [name for name, fields in SCHEMA_FIELDS.items() if all(record.get(f) is not None for f in fields)]
    if len(matches) == 1:
        return matches[0]
    fields = ", ".join(sorted(str(key) for key in record)) or "none"
    if matches:
        raise RowError(f"ambiguous schema: the record has the fields of {' and '.join(matches)}; set data.schema")
    raise RowError(
        "unknown schema: expected alpaca (instruction, output), chat (messages) or "
        f"prompt_completion (prompt, completion) fields; found: {fields}"
    )


def content_id(messages: list[dict], response: str) -> str:
    """Stable id from the content: sha1 of the canonical JSON of messages and response."""
    canonical = json.dumps({"messages": messages, "response": response}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:SAMPLE_ID_HEX_CHARS]


def _alpaca(record: Record) -> tuple[list[dict], str]:
    instruction = _text_field(record, "instruction")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f"field 'input' must be a string, got {_type_name(extra)}")
    _check_unicode(extra or "", "field 'input'")
    content = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": content}], _text_field(record, "output")


def _prompt_completion(record: Record) -> tuple[list[dict], str]:
    return [{"role": "user", "content": _text_field(record, "prompt")}], _text_field(record, "completion")


def _chat(record: Record) -> tuple[list[dict], str]:
    turns = record.get("messages")
    if turns is None:
        raise RowError("missing field 'messages'")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field 'messages' must be a non-empty list, got {_type_name(turns)}")
    messages = [_message(turn, index) for index, turn in enumerate(turns)]
    *prompt, final = messages
    if final["role"] != "assistant":
        raise RowError(f"messages: the last message must be the assistant's reply, got role {final['role']!r}")
    if not final["content"].strip():
        raise RowError("messages: the final assistant reply is empty")
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RowError("messages: no non-empty user message before the final assistant reply")
    return prompt, final["content"]


def _message(turn: Any, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(turn, dict):
        raise RowError(f"{where} must be an object with role and content, got {_type_name(turn)}")
    role, content = turn.get("role"), turn.get("content")
    if role not in ROLES:
        raise RowError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise RowError(f"{where}.content must be a string, got {_type_name(content)}")
    _check_unicode(content, f"{where}.content")
    return {"role": role, "content": content}


_PARSERS = {"alpaca": _alpaca, "chat": _chat, "prompt_completion": _prompt_completion}


def _text_field(record: Record, name: str) -> str:
    value = record.get(name)
    if value is None:
        raise RowError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise RowError(f"field {name!r} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise RowError(f"field {name!r} is empty")
    return _check_unicode(value, f"field {name!r}")


def _sample_id(record: Record, id_column: str) -> str:
    value = record.get(id_column)
    if value is None:
        raise RowError(f"missing id column {id_column!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"id column {id_column!r} must be a string or an integer, got {_type_name(value)}")
    if isinstance(value, str) and not value.strip():
        raise RowError(f"id column {id_column!r} is empty")
    return _check_unicode(str(value), f"id column {id_column!r}")


def _label(record: Record, label_column: str) -> str:
    """The evaluation label; "" when the column is absent or null."""
    value = record.get(label_column) if label_column else None
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"label column {label_column!r} must be a string or an integer, got {_type_name(value)}")
    return _check_unicode(str(value), f"label column {label_column!r}")


def _check_unicode(value: str, what: str) -> str:
    """`value` unchanged, or a RowError if it holds a lone surrogate (a JSON escape like `\\ud800`): UTF-8 cannot encode one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"{what} holds an unpaired surrogate \\u{ord(value[exc.start]):04x}, not valid Unicode") from None
    return value


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)

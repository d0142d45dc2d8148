"""Bad input through the real command line: refused with one clear error, never a traceback.

Every file under tests/fixtures/bad/ (and a few generated here because they are big or
binary) goes through `gs-ray data` in-process: the data stage only, on the tiny model.
Each must exit with status 2 and print exactly one `gs-ray: error:` line whose message
names the file and line (or, for a config, the file or the field), and the reason.
Files that name no line are problems of the whole file (empty, unreadable, no usable
columns). Config files are refused before Ray is touched; one of them also goes through
the installed `gs-ray` executable, to see what a user sees on a real stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gs_ray.cli import EXIT_USER_ERROR, main

from conftest import REPO

BAD = REPO / "tests" / "fixtures" / "bad"
ERROR_PREFIX = "gs-ray: error:"
HUGE_LINE_BYTES = 10 * 2**20
NESTING_DEPTH = 100_000
"""Far deeper than any interpreter's recursion limit."""
SUBPROCESS_TIMEOUT_S = 120
FIRST = json.dumps({"instruction": "Say a.", "output": "a"})
"""A good row ahead of the bad one, so that the error must point past line 1."""

FILE_CASES = {  # file under tests/fixtures/bad -> (config overrides, what the error must say; {path} is the file)
    "invalid_json.jsonl": ((), "{path}:2: invalid JSON: Expecting value"),
    "not_object.jsonl": ((), "{path}:1: expected a JSON object, got array"),
    "missing_field.jsonl": (("data.schema=alpaca",), "{path}:2: missing field 'output'"),
    "wrong_type.jsonl": ((), "{path}:1: field 'output' must be a string, got integer"),
    "empty_instruction.jsonl": ((), "{path}:1: field 'instruction' is empty"),
    "empty_response.jsonl": ((), "{path}:2: field 'completion' is empty"),
    "unknown_schema.jsonl": ((), "{path}:1: unknown schema"),
    "chat_no_assistant.jsonl": ((), "{path}:1: messages: the last message must be the assistant's reply, got role 'user'"),
    "chat_bad_role.jsonl": ((), "{path}:1: messages[1].role must be one of system, user, assistant, got 'bot'"),
    "chat_not_list.jsonl": ((), "{path}:1: field 'messages' must be a non-empty list, got string"),
    "duplicate_ids.jsonl": (("data.id_column=id",), "{path}:3: duplicate sample_id '7', first at {path}:1"),
    "duplicate_content.jsonl": ((), "{path}:2: duplicate sample_id"),
    "bad_id.jsonl": (("data.id_column=id",), "{path}:1: id column 'id' must be a string or an integer, got boolean"),
    "missing_id.jsonl": (("data.id_column=id",), "{path}:2: missing id column 'id'"),
    "ambiguous.jsonl": ((), "{path}:1: ambiguous schema"),
    "bad_label.jsonl": ((), "{path}:1: label column 'domain' must be a string or an integer, got array"),
    "some_bad.jsonl": ((), "{path}:2: invalid JSON: Expecting value (column 1)\n  {path}:5: unknown schema"),
    "mixed_schemas.jsonl": (("data.schema=chat",), "{path}:2: missing field 'messages'\n  {path}:3: missing field"),
    "latin1.jsonl": ((), "{path}:2: invalid UTF-8 at byte 20 of the line"),
    "control_char.jsonl": ((), "{path}:2: invalid JSON: Invalid control character at"),
    "surrogate.jsonl": ((), "{path}:2: field 'instruction' holds an unpaired surrogate \\ud800"),
    "duplicate_key.jsonl": ((), "{path}:2: key 'output' appears twice in one object"),
    "huge_number.jsonl": ((), "{path}:2: invalid JSON: a number with more than 4300 digits"),
    "array_element.json": ((), "{path}:3: expected a JSON object, got string"),
    "trailing_text.json": ((), "{path}: unexpected text after the JSON array, line 4"),
    "broken_array.json": (("data.on_bad_row=skip",), "{path}: invalid JSON array at line 4"),
    "empty.jsonl": (("data.on_bad_row=skip",), "{path}: empty file"),
    "blank_lines.jsonl": ((), "{path}: empty file"),
    "not_parquet.parquet": ((), "{path}: not a readable Parquet file"),
    "notes.txt": ((), "data.paths: {path} is not a .jsonl, .json, .parquet file"),
    "overlong.jsonl": (("data.overlong=error", "data.max_seq_len=32"),
                       "{path}:2: sample has 71 tokens (prompt 19 + response 52), more than data.max_seq_len=32"),
}

CONFIG_CASES = {  # config file under tests/fixtures/bad -> what the error must say
    "config_typo_key.yaml": "{path}: unknown key 'data.on_bad_rows'; did you mean 'data.on_bad_row'?",
    "config_unknown_section.yaml": "{path}: unknown section 'datta'; did you mean 'data'?",
    "config_wrong_type.yaml": "{path}: train.num_workers expects int, got 'two'",
    "config_impossible_value.yaml": "data.max_seq_len: must be >= 8, got 4",
    "config_fractions.yaml": "data.*_fraction: warmup + val + eval must leave a train split, sum is 1.000",
    "config_not_mapping.yaml": "{path}: top level must be a mapping of sections, got list",
    "config_section_not_mapping.yaml": "{path}: section 'data' must be a mapping, got 256",
    "config_invalid_yaml.yaml": "{path}: invalid YAML at line 3, column 14: expected ',' or ']', but got ':'",
    "config_duplicate_key.yaml": "{path}: invalid YAML at line 3, column 3: duplicate key 'max_seq_len'",
    "config_latin1.yaml": "{path}: line 2: not UTF-8 text (byte 0xe9)",
}


def _huge_line(path: Path) -> None:
    path.write_text(json.dumps({"instruction": "Echo.", "output": "x" * HUGE_LINE_BYTES}) + "\n")


def _deep_nesting(path: Path) -> None:
    path.write_text(f'{FIRST}\n{{"instruction": "Nest.", "output": {"[" * NESTING_DEPTH}{"]" * NESTING_DEPTH}}}\n')


def _wrong_columns(path: Path) -> None:
    pq.write_table(pa.table({"question": ["What is 1 + 1?"], "answer": ["2"]}), path)


def _wrong_types(path: Path) -> None:
    pq.write_table(pa.table({"instruction": ["Add 40 and 2."], "output": [42]}), path)


def _no_rows(path: Path) -> None:
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)


def _empty_folder(path: Path) -> None:
    path.mkdir()
    (path / "README.md").write_text("no data here\n")


GENERATED_CASES = {  # name in tmp_path -> (writer, config overrides, what the error must say)
    "huge_line.jsonl": (_huge_line, (), "{path}:1: line of 10,485,798 bytes exceeds the 4 MiB limit for one sample"),
    "deep_nesting.jsonl": (_deep_nesting, (), "{path}:2: invalid JSON: values nested too deeply to read"),
    "wrong_columns.parquet": (_wrong_columns, ("data.on_bad_row=skip",),
                              "{path}: missing required columns: expected alpaca (instruction, output) or chat "
                              "(messages) or prompt_completion (prompt, completion); the file has question, answer"),
    "wrong_types.parquet": (_wrong_types, (), "{path}:row 1: field 'output' must be a string, got integer"),
    "no_rows.parquet": (_no_rows, (), "{path}: empty file"),
    "empty_folder": (_empty_folder, (), "data.paths: folder {path} holds no .jsonl, .json, .parquet files"),
}


def _data_argv(paths: list[Path], run_dir: Path, overrides=()) -> list[str]:
    return ["data", "--config", "tiny", "--run-dir", str(run_dir), f"data.paths={json.dumps([str(p) for p in paths])}",
            *overrides]


def _check_refusal(err: str, expected: str) -> None:
    """One `gs-ray: error:` line, no traceback, and the expected location and reason in the message."""
    assert sum(line.startswith(ERROR_PREFIX) for line in err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expected in err, err


def _refused_in_process(argv: list[str], capsys) -> str:
    assert main(argv) == EXIT_USER_ERROR
    return capsys.readouterr().err


def test_every_file_in_the_corpus_has_a_case():
    assert sorted(p.name for p in BAD.iterdir()) == sorted([*FILE_CASES, *CONFIG_CASES])


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_bad_data_file_is_refused(ray_start_4_cpus, tmp_path, capsys, name):
    path = (BAD / name).resolve()
    overrides, expected = FILE_CASES[name]
    err = _refused_in_process(_data_argv([path], tmp_path / "run", overrides), capsys)
    _check_refusal(err, expected.format(path=path))


@pytest.mark.parametrize("name", sorted(GENERATED_CASES))
def test_generated_bad_input_is_refused(ray_start_4_cpus, tmp_path, capsys, name):
    write, overrides, expected = GENERATED_CASES[name]
    path = tmp_path / name
    write(path)
    err = _refused_in_process(_data_argv([path], tmp_path / "run", overrides), capsys)
    _check_refusal(err, expected.format(path=path))


def test_skipping_every_row_is_still_an_error_that_names_them(ray_start_4_cpus, tmp_path, capsys):
    path = (BAD / "not_object.jsonl").resolve()
    err = _refused_in_process(_data_argv([path], tmp_path / "run", ["data.on_bad_row=skip"]), capsys)
    _check_refusal(err, f"no usable samples in {path}: all 1 rows are bad, first:\n  {path}:1: expected a JSON object")


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_file_is_refused(tmp_path, capsys, name):
    path = BAD / name
    err = _refused_in_process(["data", "--config", str(path), "--run-dir", str(tmp_path / "run")], capsys)
    _check_refusal(err, CONFIG_CASES[name].format(path=path))


def _refused_by_the_executable(argv: list[str]) -> str:
    executable = Path(sys.executable).with_name("gs-ray")
    done = subprocess.run([str(executable), *argv], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    return done.stderr


def test_the_executable_refuses_a_bad_config(tmp_path):
    path = BAD / "config_typo_key.yaml"
    err = _refused_by_the_executable(["data", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    _check_refusal(err, CONFIG_CASES[path.name].format(path=path))


def test_held_out_files_are_checked_like_the_training_files(ray_start_4_cpus, tmp_path, capsys):
    training, bad = tmp_path / "training.jsonl", (BAD / "invalid_json.jsonl").resolve()
    training.write_text(FIRST + "\n")
    err = _refused_in_process(_data_argv([training], tmp_path / "run", [f"data.eval_paths={json.dumps([str(bad)])}"]),
                              capsys)
    _check_refusal(err, f"{bad}:2: invalid JSON: Expecting value")
    err = _refused_in_process(
        _data_argv([training], tmp_path / "run", [f"data.eval_paths={json.dumps([str(training)])}"]), capsys)
    _check_refusal(err, f"data.eval_paths: {training} is in data.paths too; a held-out file must not be trained on")

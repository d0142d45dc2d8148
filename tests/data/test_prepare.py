"""Tests of the data layer: schemas, bad-row policy, splits, label masking, the built-in mix.

One local Ray instance serves the whole module; most inputs are a few lines under
tests/data/, and Parquet files are generated into tmp_path. Each malformed file's error
message is checked through the command line in test_bad_inputs.py; here only what the
bad-row policy does with them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gs_ray.config import Config, DataConfig, ModelConfig, RunConfig
from gs_ray.core.errors import ConfigError, DataError
from gs_ray.data import batches, inputs, mixes, schemas
from gs_ray.data import prepare as data
from gs_ray.modeling.models import load_tokenizer

from conftest import REPO

DATA = REPO / "tests" / "fixtures"
BAD = DATA / "bad"
GOOD = DATA / "good"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "What is 2 + 2? The answer is 4.", "def f(x):\n    return x"] * 5
LONG_MAX_SEQ_LEN = 8192  # fits every built-in row with the tiny test tokenizer


def _prepare(cfg: Config, out_dir: str) -> dict:
    """The data stage's work, with the model's tokenizer as the stage hands it over."""
    return data.prepare_data(cfg, out_dir, functools.partial(load_tokenizer, cfg.model))


def _tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (every string round-trips), like the real models' ones."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> str:
    """The test tokenizer as an HF folder, loadable by gs_ray.models.load_tokenizer in Ray actors."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


def _read(*paths, **overrides) -> list[dict]:
    cfg = DataConfig(paths=[str(p) for p in paths], **overrides)
    return sorted(data.read_samples(cfg, seed=0).take_all(), key=lambda r: data._location_key(r["source"]))


def _where(path: Path, line: int | None = None) -> str:
    return f"{path.resolve()}:{line}" if line else str(path.resolve())


# ---------------------------------------------------------------- schemas


def test_mixed_file_is_auto_detected_and_normalized(ray_start_4_cpus):
    rows = _read(GOOD / "mixed.jsonl")
    path = _where(GOOD / "mixed.jsonl")
    assert [r["source"] for r in rows] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6)]  # line 4 is blank
    prompts = [json.loads(r["messages"]) for r in rows]
    assert prompts[0] == [{"role": "user", "content": "Name the capital of France."}]
    assert prompts[1] == [{"role": "user", "content": "Translate to German.\n\ngood morning"}]
    assert prompts[2] == [{"role": "user", "content": "Add the numbers."}]  # empty input adds nothing
    assert prompts[3] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times 3?"},
    ]
    assert prompts[4] == [{"role": "user", "content": "Complete the phrase: once upon a"}]
    assert [r["response"] for r in rows] == ["Paris", "guten Morgen", "5", "12", "time"]
    assert [r["label"] for r in rows] == ["geo", "lang", "math", "math", "7"]
    assert set(rows[0]) == set(data.NORMALIZED_COLUMNS)
    assert all(r["split"] in batches.SPLITS for r in rows)


def test_json_array_and_parquet_inputs(ray_start_4_cpus, tmp_path):
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.table({
        "messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]],
        "topic": ["greeting"],
    }), parquet)
    rows = {r["source"]: r for r in _read(GOOD / "array.json", parquet, label_column="topic")}
    expected = {_where(GOOD / "array.json", 2): ("tac", ""), _where(GOOD / "array.json", 3): ("yes", ""),
                f"{parquet}:row 1": ("Hello", "greeting")}
    assert {source: (r["response"], r["label"]) for source, r in rows.items()} == expected


def test_sample_id_is_a_content_hash_or_the_id_column(ray_start_4_cpus, tmp_path):
    record = {"instruction": "Say a.", "output": "a"}
    messages = [{"role": "user", "content": "Say a."}]
    canonical = json.dumps({"messages": messages, "response": "a"}, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha1(canonical.encode()).hexdigest()[:16]
    assert schemas.normalize(record, "auto", "", "domain")["sample_id"] == expected
    # Key order, the label and the file it sits in do not change the id.
    reordered = tmp_path / "other.jsonl"
    reordered.write_text(json.dumps({"domain": "x", "output": "a", "instruction": "Say a."}) + "\n")
    assert [r["sample_id"] for r in _read(reordered)] == [expected]
    assert schemas.normalize({**record, "id": 12}, "auto", "id", "domain")["sample_id"] == "12"


# ---------------------------------------------------------------- splits


def test_split_fractions_and_seed():
    cfg = DataConfig(warmup_fraction=0.1, val_fraction=0.2, eval_fraction=0.1)
    ids = [f"sample-{i}" for i in range(2000)]
    splits = [data.split_of(i, cfg, seed=3) for i in ids]
    for name, share in (("warmup", 0.1), ("val", 0.2), ("eval", 0.1), ("train", 0.6)):
        assert abs(splits.count(name) / len(ids) - share) < 0.035, name
    assert splits == [data.split_of(i, cfg, seed=3) for i in ids]
    changed = sum(a != b for a, b in zip(splits, (data.split_of(i, cfg, seed=4) for i in ids)))
    assert changed > len(ids) // 4


def test_sample_fraction_keeps_a_seeded_share_and_their_splits():
    ids = [f"sample-{i}" for i in range(2000)]
    full = [data.split_of(i, DataConfig(), seed=3) for i in ids]
    half = [data.split_of(i, DataConfig(sample_fraction=0.5), seed=3) for i in ids]
    kept = [i for i, split in enumerate(half) if split != data.UNUSED]
    assert abs(len(kept) / len(ids) - 0.5) < 0.035
    assert all(half[i] == full[i] for i in kept)  # a kept sample lands in the split it always had
    with pytest.raises(ConfigError, match="data.sample_fraction"):
        DataConfig(sample_fraction=0)


def test_splits_do_not_depend_on_file_order(ray_start_4_cpus, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(40)]
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    forward = {r["sample_id"]: r["split"] for r in _read(first, second, warmup_fraction=0.3)}
    backward = {r["sample_id"]: r["split"] for r in _read(second, first, warmup_fraction=0.3)}
    assert forward == backward and len(forward) == len(rows)
    assert len(set(forward.values())) > 1


# ---------------------------------------------------------------- prompts and labels


def _labelled(encoded: dict) -> list[int]:
    return [t for t in encoded["labels"] if t != batches.IGNORE_INDEX]


def test_labels_mask_exactly_the_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    (encoded,) = data.encode_batch(tokenizer, [messages], ["4, of course"], DataConfig())
    prompt = data.render_prompt(tokenizer, messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded["labels"][: len(prompt_ids)] == [batches.IGNORE_INDEX] * len(prompt_ids)
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["labels"][len(prompt_ids):] == encoded["input_ids"][len(prompt_ids):]
    assert tokenizer.decode(_labelled(encoded)) == "4, of course<|im_end|>\n"
    assert encoded["num_tokens"] == len(encoded["input_ids"]) and encoded["num_target_tokens"] == len(_labelled(encoded))


def test_fallback_template_without_chat_template():
    plain = _tokenizer(chat_template=None)
    messages = [{"role": "user", "content": "Hi"}]
    assert data.render_prompt(plain, messages) == "### User:\nHi\n\n### Assistant:\n"
    (encoded,) = data.encode_batch(plain, [messages], ["Hello"], DataConfig())
    assert plain.decode(_labelled(encoded)) == "Hello<|im_end|>\n\n"
    assert plain.decode(encoded["input_ids"]) == "### User:\nHi\n\n### Assistant:\nHello<|im_end|>\n\n"


def test_template_breaking_the_prefix_falls_back_to_response_and_eos():
    # Renders the message count first, so the full conversation does not start with the prompt.
    odd = _tokenizer(chat_template="{{ messages | length }}" + CHATML)
    (encoded,) = data.encode_batch(odd, [[{"role": "user", "content": "Hi"}]], ["Hello"], DataConfig())
    assert odd.decode(_labelled(encoded)) == "Hello<|im_end|>"


def test_overlong_samples_error_or_truncate(tokenizer):
    messages, long_reply = [{"role": "user", "content": "Count."}], " ".join(str(i) for i in range(200))
    (error,) = data.encode_batch(tokenizer, [messages], [long_reply], DataConfig(max_seq_len=32))
    assert "more than data.max_seq_len=32" in error["error"] and error["num_tokens"] > 32
    (cut,) = data.encode_batch(tokenizer, [messages], [long_reply], DataConfig(max_seq_len=32, overlong="truncate"))
    assert cut["error"] == "" and cut["truncated"] and len(cut["input_ids"]) == 32 and cut["num_target_tokens"] > 0
    assert tokenizer.decode(_labelled(cut)) == tokenizer.decode(cut["input_ids"][-cut["num_target_tokens"]:])
    long_prompt = [{"role": "user", "content": long_reply}]
    (nothing,) = data.encode_batch(tokenizer, [long_prompt], ["ok"], DataConfig(max_seq_len=32, overlong="truncate"))
    assert "no response token would remain" in nothing["error"]


def test_pad_batch_shapes_and_masks():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = batches.pad_batch(rows, pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {"input_ids": (2, 3), "attention_mask": (2, 3), "labels": (2, 3)}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError):
        batches.pad_batch([], pad_token_id=0)


# ---------------------------------------------------------------- bad input


def test_paths_are_checked_before_reading(tmp_path):
    with pytest.raises(DataError, match=f"no such file or directory: {tmp_path}/missing.jsonl"):
        inputs.resolve_files(DataConfig(paths=[str(tmp_path / "missing.jsonl")]))


def test_folders_are_searched_recursively(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for name in ("b.jsonl", "sub/a.parquet", "sub/.hidden/c.jsonl", "_SUCCESS", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert inputs.resolve_files(DataConfig(paths=[str(tmp_path)])) == (
        [str(tmp_path / "b.jsonl"), str(tmp_path / "sub/a.parquet")], [])
    assert inputs.resolve_files(DataConfig()) == ([inputs.BUILTIN_MIX], [])
    before = inputs.input_fingerprint(DataConfig(paths=[str(tmp_path)]))
    (tmp_path / "b.jsonl").write_text('{"a": 1}')
    assert inputs.input_fingerprint(DataConfig(paths=[str(tmp_path)])) != before


def test_held_out_paths_are_checked_and_fingerprinted(tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"instruction": "Say a.", "output": "a"}\n')
    with pytest.raises(DataError, match=f"data.eval_paths: no such file or directory: {tmp_path}/missing.jsonl"):
        inputs.resolve_files(DataConfig(eval_paths=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(DataError, match=f"data.eval_paths: {held_out} is in data.paths too"):
        inputs.resolve_files(DataConfig(paths=[str(tmp_path)], eval_paths=[str(held_out)]))
    cfg = DataConfig(eval_paths=[str(held_out)])
    assert inputs.resolve_files(cfg) == ([inputs.BUILTIN_MIX], [str(held_out)])
    before = inputs.input_fingerprint(cfg)
    assert before[-1]["path"] == str(held_out) and before[-1]["split"] == "eval"
    assert inputs.input_fingerprint(DataConfig()) == before[:-1]  # runs without held-out files keep their fingerprint
    held_out.write_text('{"instruction": "Say b.", "output": "b"}\n')
    assert inputs.input_fingerprint(cfg) != before


def test_eval_fraction_may_be_zero_only_with_held_out_files():
    with pytest.raises(ConfigError, match=r"data.eval_fraction: must be in \(0, 1\), got 0"):
        DataConfig(eval_fraction=0.0)
    assert DataConfig(eval_fraction=0.0, eval_paths=["held_out.jsonl"]).eval_fraction == 0.0


def test_held_out_rows_all_go_to_eval(ray_start_4_cpus, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "output": str(n)}) + "\n" for n in range(40)))
    cfg = DataConfig(paths=[str(GOOD / "mixed.jsonl")], eval_paths=[str(held_out)], sample_fraction=0.5)
    rows = data.read_samples(cfg, seed=0).take_all()
    from_held_out = [r for r in rows if r["source"].startswith(str(held_out))]
    assert len(from_held_out) == 40 and {r["split"] for r in from_held_out} == {"eval"}  # whole: no sample_fraction
    assert all(r["split"] == data.split_of(r["sample_id"], cfg, 0) for r in rows if r not in from_held_out)


def test_a_held_out_row_repeated_in_training_data_is_a_duplicate(ray_start_4_cpus, tmp_path):
    held_out, training = tmp_path / "held_out.jsonl", tmp_path / "training.jsonl"
    held_out.write_text(json.dumps({"instruction": "Say a.", "output": "a"}) + "\n")
    training.write_text("".join(json.dumps({"instruction": f"Say {c}.", "output": c}) + "\n" for c in "ba"))
    same = schemas.content_id([{"role": "user", "content": "Say a."}], "a")
    message = f"{_where(training, 2)}: duplicate sample_id '{same}', first at {_where(held_out, 1)}"
    with pytest.raises(DataError, match=re.escape(message)):
        data.read_samples(DataConfig(paths=[str(training)], eval_paths=[str(held_out)]), seed=0)
    ds, bad, files = data._read_checked(DataConfig(paths=[str(training)], eval_paths=[str(held_out)],
                                                   on_bad_row="skip"), seed=0)
    assert data._examples(bad) == [message] and files == ([str(training)], [str(held_out)])
    assert {r["response"]: r["split"] for r in ds.take_all() if r["response"] == "a"} == {"a": "eval"}


def test_skip_drops_bad_rows_and_reports_them(ray_start_4_cpus, caplog):
    path = BAD / "some_bad.jsonl"
    cfg = DataConfig(paths=[str(path)], on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="gs_ray.data.prepare"):
        ds, bad, _ = data._read_checked(cfg, seed=0)
    assert sorted(r["response"] for r in ds.take_all()) == ["a", "b", "d"]
    assert data._examples(bad) == [f"{_where(path, 2)}: invalid JSON: Expecting value (column 1)",
                                   f"{_where(path, 5)}: unknown schema: expected alpaca (instruction, output), chat "
                                   "(messages) or prompt_completion (prompt, completion) fields; found: instruction"]
    assert "skipped 2 bad row(s)" in caplog.text and f"{_where(path, 5)}" in caplog.text


def test_skip_keeps_the_first_of_duplicate_samples(ray_start_4_cpus):
    dup, other = BAD / "duplicate_content.jsonl", BAD / "some_bad.jsonl"  # other:1 repeats dup:1 too
    ds, bad, _ = data._read_checked(DataConfig(paths=[str(other), str(dup)], on_bad_row="skip"), seed=0)
    kept = {r["source"]: r["response"] for r in ds.take_all()}
    assert kept == {_where(dup, 1): "a", _where(other, 3): "b", _where(other, 6): "d"}
    same = schemas.content_id([{"role": "user", "content": "Say a."}], "a")
    assert [e for e in data._examples(bad) if "duplicate" in e] == [
        f"{_where(dup, 2)}: duplicate sample_id '{same}', first at {_where(dup, 1)}",
        f"{_where(other, 1)}: duplicate sample_id '{same}', first at {_where(dup, 1)}",
    ]
    assert len(bad) == 4


def test_uri_paths_are_read(ray_start_4_cpus):
    rows = _read(f"file://{GOOD / 'mixed.jsonl'}")
    assert len(rows) == 5 and rows[0]["source"].endswith("mixed.jsonl:1")


# ---------------------------------------------------------------- the built-in mix and the whole stage


def test_builtin_mix_has_three_domains(ray_start_4_cpus):
    rows = data.read_samples(DataConfig(), seed=0).select_columns(["label"]).take_all()
    counts = {label: sum(r["label"] == label for r in rows) for label in {r["label"] for r in rows}}
    assert counts == {"math": 300, "code": 300, "text": 300}


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="needs ../shared/datasets")
def test_builtin_mix_matches_its_build_script(tmp_path):
    rows = mixes.build_builtin_mix(SHARED_DATASETS)
    shipped = Path(inputs.BUILTIN_MIX).read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert all("<<" not in r["output"] for r in rows if r["domain"] == "math")
    assert all(r["output"].splitlines()[-1].startswith("#### ") for r in rows if r["domain"] == "math")


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="needs ../shared/datasets")
def test_real_mix_held_out_rows_lie_outside_the_mix():
    mix = mixes.build_mix(SHARED_DATASETS, 40, seed=5)
    held_out = mixes.build_held_out(SHARED_DATASETS, mix, 30, seed=5)
    assert held_out == mixes.build_held_out(SHARED_DATASETS, mix, 30, seed=5)
    counts = {source: sum(row["domain"] == source for row in held_out) for source in mixes.SOURCES}
    assert counts == {"gsm8k": 30, "mbpp": 30, "alpaca": 30}
    content = {(row["instruction"], row["input"], row["output"]) for row in mix}
    assert not content & {(row["instruction"], row["input"], row["output"]) for row in held_out}
    assert mixes.build_mix(SHARED_DATASETS, 40, seed=5) == mix  # drawing held-out rows leaves the mix as it was
    # A source with fewer rows left than asked gives what it has: the Alpaca seed tasks' instances are few.
    everything = mixes.build_held_out(SHARED_DATASETS, mix, 10_000, seed=5)
    left = len(mixes.alpaca_usable(SHARED_DATASETS / "alpaca_seed_tasks.jsonl")) - 40
    assert sum(row["domain"] == "alpaca" for row in everything) == left


@pytest.fixture(scope="module")
def prepared(ray_start_4_cpus, tokenizer_dir, tmp_path_factory):
    """prepare_data over the built-in mix plus one over-long sample, skipping bad rows."""
    long_file = tmp_path_factory.mktemp("inputs") / "long.jsonl"
    long_file.write_text(json.dumps({"instruction": "Ramble.", "output": "z" * LONG_MAX_SEQ_LEN * 2, "domain": "x"}) + "\n")
    cfg = Config(model=ModelConfig(name=tokenizer_dir), run=RunConfig(seed=1),
                 data=DataConfig(paths=[inputs.BUILTIN_MIX, str(long_file)], max_seq_len=LONG_MAX_SEQ_LEN, on_bad_row="skip"))
    out = tmp_path_factory.mktemp("prepared")
    return cfg, out, long_file, _prepare(cfg, str(out))


def test_prepare_data_writes_every_split(prepared, tokenizer):
    cfg, out, long_file, summary = prepared
    assert summary["bad_rows"]["count"] == 1
    assert summary["bad_rows"]["examples"][0].startswith(f"{long_file}:1: sample has ")
    assert sum(summary["rows"].values()) == 900
    for split in batches.SPLITS:
        rows = batches.load_split(str(out / split))
        assert len(rows) == summary["rows"][split] > 0
        assert {r["split"] for r in rows} == {split}
        assert sum(summary["labels"][split].values()) == len(rows)
        assert all(data.split_of(r["sample_id"], cfg.data, cfg.run.seed) == split for r in rows)
    row = batches.load_split(str(out / "train"))[0]
    assert tokenizer.decode(_labelled(row)) == row["response"] + "<|im_end|>\n"
    assert row["num_tokens"] == len(row["input_ids"]) <= cfg.data.max_seq_len
    assert summary["tokens"]["num_tokens"]["max"] <= cfg.data.max_seq_len



def test_prepare_data_counts_what_sample_fraction_leaves_out(ray_start_4_cpus, tokenizer_dir, tmp_path):
    cfg = Config(model=ModelConfig(name=tokenizer_dir), data=DataConfig(sample_fraction=0.3, max_seq_len=LONG_MAX_SEQ_LEN,
                                                                        overlong="truncate"))
    summary = _prepare(cfg, str(tmp_path))
    kept = sum(summary["rows"].values())
    assert kept + summary["left_out_by_sample_fraction"] == 900
    assert 0.25 < kept / 900 < 0.35
    assert len(batches.load_split(str(tmp_path / "train"))) == summary["rows"]["train"]


def test_prepare_data_with_held_out_files_alone_in_eval(ray_start_4_cpus, tokenizer_dir, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "output": str(n), "domain": "count"}) + "\n"
                                for n in range(12)))
    cfg = Config(model=ModelConfig(name=tokenizer_dir), data=DataConfig(
        eval_paths=[f"file://{held_out}"], eval_fraction=0.0, max_seq_len=LONG_MAX_SEQ_LEN, overlong="truncate"))
    summary = _prepare(cfg, str(tmp_path / "out"))
    assert summary["rows"]["eval"] == summary["held_out_rows"] == 12 and summary["files"] == 2
    assert summary["labels"]["eval"] == {"count": 12}
    assert sum(summary["rows"].values()) == 900 + 12
    assert sorted(r["response"] for r in batches.load_split(str(tmp_path / "out" / "eval"))) == sorted(map(str, range(12)))

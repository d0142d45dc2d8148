"""Data mixes built from public datasets: the package's built-in mix and the benchmarks' real mix.

Both are deterministic for a seed and read the raw files of a datasets folder
(`../shared/datasets` by default in the scripts that call them):

- The built-in mix (`build_builtin_mix`, written to gs_ray/resources/builtin_mix.jsonl by
  scripts/build_builtin_mix.py): ROWS_PER_DOMAIN rows of each of three domains, {instruction,
  input, output, domain}: "math" from GSM8K (MIT), "code" from MBPP (CC BY 4.0), and "text",
  short string-manipulation tasks with exact answers generated here. The Alpaca seed tasks are
  not used: their license is non-commercial. See gs_ray/resources/ATTRIBUTION.md.
- The real mix (`build_mix`, `build_held_out`; benchmarks/real_mix.py and benchmarks/quality.py
  write it into a run dir, never into the package): n rows per source of GSM8K, MBPP and the
  Alpaca seed tasks, with "domain" = the source, and held-out rows drawn from outside it.

GSM8K and MBPP rows are sampled among those short enough for max_seq_len 512 (`fits`).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from pathlib import Path

from gs_ray.core.storage import write_atomic

SEED = 20240601
"""Sampling seed of the built-in mix, and the default seed of the real mix."""
ROWS_PER_DOMAIN = 300
"""Rows per domain of the built-in mix."""
SOURCES = ("gsm8k", "mbpp", "alpaca")
"""The real mix's sources, its rows' "domain"."""
MIX_FILE = "real_mix.jsonl"
"""The real mix's file in a run dir."""
HELD_OUT_FILE = "real_mix_held_out.jsonl"
"""The real mix's held-out rows in a run dir (for data.eval_paths)."""
HELD_OUT_SEED_OFFSET = 10
"""Added to the seed for the held-out draws (the mix's draws use seed + 0, 1, 2), so the two never share a stream."""

ANNOTATION = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations, e.g. <<48/2=24>>
VOWELS = "aeiou"
TOKEN_PIECE = re.compile(r"\d|[A-Za-z]{1,4}|[^\sA-Za-z\d]|\s+")
"""Pieces that most BPE tokenizers need at least one token for (digits are often one token each)."""
MAX_ESTIMATED_TOKENS = 400
"""Rows estimated longer are left out, so that every row fits the default data.max_seq_len (512)
with the default model's chat template (SmolLM2 adds a ~30-token system prompt)."""

WORDS = sorted(set("""apple river garden pencil window candle rocket forest silver marble planet orange
violin ladder bridge castle dragon engine feather guitar harbor island jacket kettle lantern
meadow needle ocean parrot quartz rabbit saddle tunnel umbrella valley wagon yellow zebra anchor
basket cactus dolphin eagle falcon glacier hammer igloo jungle koala lemon mirror nutmeg oyster
pepper quiver ribbon spider tomato unicorn velvet walrus blanket cobalt desert ember fossil
granite hollow indigo jasmine kernel lizard magnet nickel orchid pillow quarry raisin shadow
thunder upland vessel willow badger copper dancer easel fabric goblet helmet ivory jigsaw
kitten lobster muffin napkin otter puzzle quill rocket sunset timber uplink vapor wizard""".split()))
ADJECTIVES = "quick lazy bright quiet happy tiny brave clever gentle noisy calm proud".split()
NOUNS = "fox dog cat bird child farmer teacher robot sailor painter baker pilot".split()
VERBS = "jumps over|walks past|looks at|runs around|waits near|sings to|draws|follows".split("|")
WORDS_PER_TASK = (3, 6)
NUMBERS_PER_TEXT = (2, 4)
NUMBER_RANGE = (1, 999)


def fits(row: dict) -> bool:
    """A tokenizer-free length estimate stays within MAX_ESTIMATED_TOKENS (checked against SmolLM2: longest row 338 tokens)."""
    return len(TOKEN_PIECE.findall(row["instruction"] + row["input"] + row["output"])) <= MAX_ESTIMATED_TOKENS


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sample(usable: list[dict], rng: random.Random, n: int) -> list[dict]:
    """n of the usable rows, in file order."""
    return [usable[i] for i in sorted(rng.sample(range(len(usable)), n))]


def gsm8k_usable(path: Path) -> list[dict]:
    """GSM8K rows that fit: the question is the instruction; the answer without calculator annotations is the output."""
    rows = [{"instruction": item["question"], "input": "", "output": ANNOTATION.sub("", item["answer"]), "domain": "math"}
            for item in _read_jsonl(path)]
    return [row for row in rows if fits(row)]


def gsm8k_rows(path: Path, rng: random.Random, n: int = ROWS_PER_DOMAIN) -> list[dict]:
    return _sample(gsm8k_usable(path), rng, n)


def mbpp_usable(path: Path) -> list[dict]:
    """MBPP rows that fit: task text plus its asserts is the instruction, the reference code the output."""
    rows = []
    for task in _read_jsonl(path):
        # A task with setup code cannot be solved from its prompt alone (its asserts use objects built there).
        if task["test_setup_code"].strip():
            continue
        instruction = f"{task['text']}\nYour code should pass these tests:\n" + "\n".join(t.rstrip() for t in task["test_list"])
        code = task["code"].replace("\r\n", "\n").rstrip()
        rows.append({"instruction": instruction, "input": "", "output": code, "domain": "code", "task_id": task["task_id"]})
    return [row for row in rows if fits(row)]


def mbpp_rows(path: Path, rng: random.Random, n: int = ROWS_PER_DOMAIN) -> list[dict]:
    return _sample(mbpp_usable(path), rng, n)


def alpaca_usable(path: Path) -> list[dict]:
    """Alpaca seed tasks: every instance that fits, as {instruction, input, output, domain, task}."""
    rows = []
    for task in _read_jsonl(path):
        for instance in task["instances"]:
            rows.append({"instruction": task["instruction"], "input": instance["input"], "output": instance["output"],
                         "domain": "alpaca", "task": task["name"]})
    return [row for row in rows if fits(row)]


def alpaca_rows(path: Path, rng: random.Random, n: int) -> list[dict]:
    """A seeded sample of n Alpaca rows among those that fit (all of them if fewer)."""
    usable = alpaca_usable(path)
    return [usable[i] for i in sorted(rng.sample(range(len(usable)), min(n, len(usable))))]


# ---------------------------------------------------------------- the built-in mix's generated string tasks


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(*WORDS_PER_TASK))


def _sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng)
    template = rng.choice(["Sort these words alphabetically: {w}", "Put the following words in alphabetical order.",
                           "Arrange in A-to-Z order: {w}"])
    if "{w}" in template:
        return template.format(w=", ".join(words)), "", ", ".join(sorted(words))
    return template, ", ".join(words), ", ".join(sorted(words))


def _reverse_word(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write the letters of {w} in reverse order."])
    return template.format(w=word), "", word[::-1]


def _count_vowels(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(["How many vowels are in the word '{w}'?", "Count the vowels (a, e, i, o, u) in '{w}'.",
                           "Number of vowels in {w}? Answer with a number."])
    return template.format(w=word), "", str(sum(ch in VOWELS for ch in word))


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    template = rng.choice(["Convert this sentence to uppercase.", "Rewrite the sentence in capital letters.",
                           "Make every letter of the text uppercase."])
    return template, sentence, sentence.upper()


def _extract_numbers(rng: random.Random) -> tuple[str, str, str]:
    numbers = [str(rng.randint(*NUMBER_RANGE)) for _ in range(rng.randint(*NUMBERS_PER_TEXT))]
    filler = [_plural(rng.choice(NOUNS)) for _ in numbers]
    text = ", ".join(f"{n} {f}" for n, f in zip(numbers, filler)) + f" and one {rng.choice(NOUNS)}"
    template = rng.choice(["List the numbers (digits) that appear in the text, separated by commas.",
                           "Extract every number written in digits from the text below, in order."])
    return template, f"We counted {text}.", ", ".join(numbers)


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    template = rng.choice(["How many words are in this sentence? \"{s}\"", "Count the words in: {s}"])
    return template.format(s=sentence), "", str(len(sentence.split()))


def _acronym(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng)
    template = rng.choice(["Form an acronym from the first letters of: {w}",
                           "Take the first letter of each word and write them together in uppercase: {w}"])
    return template.format(w=" ".join(words)), "", "".join(w[0] for w in words).upper()


def _reverse_sentence(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    template = rng.choice(["Reverse the order of the words in the sentence.", "Write the words of this sentence from last to first."])
    return template, sentence, " ".join(reversed(sentence.split()))


def _remove_vowels(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(["Remove all vowels from '{w}'.", "Delete the letters a, e, i, o and u from the word {w}."])
    return template.format(w=word), "", "".join(ch for ch in word if ch not in VOWELS)


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)) + [rng.choice(string.ascii_lowercase)])
    template = rng.choice(["How many times does the letter '{c}' occur in '{w}'?", "Count the letter {c} in the word {w}."])
    return template.format(c=letter, w=word), "", str(word.count(letter))


def _title_case(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    template = rng.choice(["Capitalize the first letter of every word.", "Convert the text to title case."])
    return template, sentence, " ".join(w.capitalize() for w in sentence.split())


TEXT_TASKS: list[Callable[[random.Random], tuple[str, str, str]]] = [
    _sort_words, _reverse_word, _count_vowels, _uppercase, _extract_numbers, _count_words,
    _acronym, _reverse_sentence, _remove_vowels, _count_letter, _title_case,
]


def text_rows(rng: random.Random, n: int = ROWS_PER_DOMAIN) -> list[dict]:
    """n distinct generated string tasks, cycling through the task kinds."""
    rows, seen = [], set()
    while len(rows) < n:
        instruction, input_text, output = TEXT_TASKS[len(rows) % len(TEXT_TASKS)](rng)
        if (instruction, input_text) in seen:  # distinct prompts: identical rows would share a content-hash id
            continue
        seen.add((instruction, input_text))
        rows.append({"instruction": instruction, "input": input_text, "output": output, "domain": "text"})
    return rows


# ---------------------------------------------------------------- the mixes


def build_builtin_mix(datasets: Path) -> list[dict]:
    """The built-in mix's rows: GSM8K, MBPP and generated string tasks, ROWS_PER_DOMAIN each, seeded by SEED."""
    rng = random.Random(SEED)
    rows = gsm8k_rows(datasets / "gsm8k_train.jsonl", rng) + mbpp_rows(datasets / "mbpp_train.jsonl", rng) + text_rows(rng)
    prompts = [(row["instruction"], row["input"]) for row in rows]
    if len(set(prompts)) != len(prompts):  # the same prompt twice would be a duplicate sample id
        raise ValueError("duplicate prompts in the mix")
    return rows


def _content(row: dict) -> tuple[str, str, str]:
    return row["instruction"], row["input"], row["output"]


def build_mix(datasets: Path, n: int, seed: int) -> list[dict]:
    """The real mix: n rows per source (alpaca: at most n, all that fit if fewer), deterministic for a seed."""
    rows = []
    for rng_offset, (domain, convert, name) in enumerate(
        [("gsm8k", gsm8k_rows, "gsm8k_train.jsonl"), ("mbpp", mbpp_rows, "mbpp_train.jsonl")]
    ):
        for row in convert(datasets / name, random.Random(seed + rng_offset), n):
            rows.append(row | {"domain": domain})
    rows += alpaca_rows(datasets / "alpaca_seed_tasks.jsonl", random.Random(seed + 2), n)
    prompts = [_content(row) for row in rows]
    if len(set(prompts)) != len(prompts):
        raise ValueError("duplicate rows in the mix (they would share a content-hash sample id)")
    return rows


def build_held_out(datasets: Path, mix: list[dict], n: int, seed: int) -> list[dict]:
    """n rows per source that are not in `mix` (fewer where a source has no more), for data.eval_paths.

    The mix itself is untouched, so a run with these held-out rows trains exactly as one without them.
    """
    pools = {"gsm8k": gsm8k_usable(datasets / "gsm8k_train.jsonl"),
             "mbpp": mbpp_usable(datasets / "mbpp_train.jsonl"),
             "alpaca": alpaca_usable(datasets / "alpaca_seed_tasks.jsonl")}
    in_mix = {_content(row) for row in mix}
    rows = []
    for rng_offset, (domain, pool) in enumerate(pools.items(), start=HELD_OUT_SEED_OFFSET):
        left = [row for row in pool if _content(row) not in in_mix]
        chosen = sorted(random.Random(seed + rng_offset).sample(range(len(left)), min(n, len(left))))
        rows += [left[i] | {"domain": domain} for i in chosen]
    if len({_content(row) for row in rows}) != len(rows):
        raise ValueError("duplicate rows among the held-out rows (they would share a content-hash sample id)")
    return rows


def jsonl_text(rows: list[dict]) -> str:
    """Rows as JSONL, one JSON object a line, non-ASCII kept (the built-in mix's bytes)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_mix(run_dir: Path, rows: list[dict], name: str = MIX_FILE) -> Path:
    """Rows as JSONL in the run dir; rewritten only when they changed (unchanged bytes keep the data stage current)."""
    mix_path = Path(run_dir) / name
    text = jsonl_text(rows)
    if not mix_path.is_file() or mix_path.read_text(encoding="utf-8") != text:
        write_atomic(mix_path, text)
    return mix_path

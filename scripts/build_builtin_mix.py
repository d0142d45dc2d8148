"""Build gs_ray's built-in data mix: gs_ray/resources/builtin_mix.jsonl.

Run from the repository root (deterministic: the same inputs and seed give the same bytes):

    .venv/bin/python scripts/build_builtin_mix.py \
        --datasets ../shared/datasets --out gs_ray/resources/builtin_mix.jsonl

The mix has three domains of ROWS_PER_DOMAIN alpaca rows each ({instruction, input,
output, domain}): "math" from GSM8K (MIT), "code" from MBPP (CC BY 4.0), and "text",
short string-manipulation tasks with exact answers generated here. GSM8K and MBPP rows
are sampled among those short enough for max_seq_len 512. The Alpaca seed tasks
are not used: their license is non-commercial. See gs_ray/resources/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from collections.abc import Callable
from pathlib import Path

SEED = 20240601
ROWS_PER_DOMAIN = 300
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


def _sample(usable: list[dict], rng: random.Random) -> list[dict]:
    """ROWS_PER_DOMAIN of the usable rows, in file order."""
    return [usable[i] for i in sorted(rng.sample(range(len(usable)), ROWS_PER_DOMAIN))]


def gsm8k_usable(path: Path) -> list[dict]:
    """GSM8K rows that fit: the question is the instruction; the answer without calculator annotations is the output."""
    source = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"instruction": item["question"], "input": "", "output": ANNOTATION.sub("", item["answer"]), "domain": "math"}
            for item in source]
    return [row for row in rows if fits(row)]


def gsm8k_rows(path: Path, rng: random.Random) -> list[dict]:
    return _sample(gsm8k_usable(path), rng)


def mbpp_usable(path: Path) -> list[dict]:
    """MBPP rows that fit: task text plus its asserts is the instruction, the reference code the output."""
    source = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for task in source:
        # A task with setup code cannot be solved from its prompt alone (its asserts use objects built there).
        if task["test_setup_code"].strip():
            continue
        instruction = f"{task['text']}\nYour code should pass these tests:\n" + "\n".join(t.rstrip() for t in task["test_list"])
        code = task["code"].replace("\r\n", "\n").rstrip()
        rows.append({"instruction": instruction, "input": "", "output": code, "domain": "code", "task_id": task["task_id"]})
    return [row for row in rows if fits(row)]


def mbpp_rows(path: Path, rng: random.Random) -> list[dict]:
    return _sample(mbpp_usable(path), rng)


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


def text_rows(rng: random.Random) -> list[dict]:
    """ROWS_PER_DOMAIN distinct generated string tasks, cycling through the task kinds."""
    rows, seen = [], set()
    while len(rows) < ROWS_PER_DOMAIN:
        instruction, input_text, output = TEXT_TASKS[len(rows) % len(TEXT_TASKS)](rng)
        if (instruction, input_text) in seen:  # distinct prompts: identical rows would share a content-hash id
            continue
        seen.add((instruction, input_text))
        rows.append({"instruction": instruction, "input": input_text, "output": output, "domain": "text"})
    return rows


def build(datasets: Path) -> list[dict]:
    rng = random.Random(SEED)
    rows = gsm8k_rows(datasets / "gsm8k_train.jsonl", rng) + mbpp_rows(datasets / "mbpp_train.jsonl", rng) + text_rows(rng)
    prompts = [(row["instruction"], row["input"]) for row in rows]
    if len(set(prompts)) != len(prompts):  # the same prompt twice would be a duplicate sample id
        raise ValueError("duplicate prompts in the mix")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"), help="folder with gsm8k_train.jsonl and mbpp_train.jsonl")
    parser.add_argument("--out", type=Path, default=Path("gs_ray/resources/builtin_mix.jsonl"))
    args = parser.parse_args()
    rows = build(args.datasets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()

"""Planted-skill instruction sets for measuring clustering: known skills, checkable answers, seeded.

benchmarks/skills.py clusters them through the pipeline and scores the clusters against the skill
(the truth) and the topic (the distractor).

Each row is {"instruction", "output", "skill", "topic"}. The output is a short answer that
depends only on the skill and the numbers/words in the instruction, so exact match can score
it (`evaluate.answer_check=text`) and clustering can be scored against `skill` (the truth) and
`topic` (the distractor).

Families (`FAMILIES`, true K in parentheses):

- topic_heavy (4): add / multiply / max-of-list / parity, each written inside a long story
  about one of 4 unrelated topics (sailing, castle, space station, bakery). Skill x topic is
  balanced, so topic carries no information about the skill; the only skill cue is one short
  question phrase, itself worded in the topic's vocabulary.
- same_wording (4): one short template, "Compute the <word> of A and B.", where only the
  skill word differs (sum, product, difference, larger).
- many_skills (7): add, subtract, multiply, max-of-list, parity, reverse a word, count letters;
  a few phrasings per skill.
- shared_surface (3): "Combine A and B (rule: <marker>)." means add for one marker and
  concatenate the digits for the other: same surface, different answer rule; plus a third
  skill (max of a list) with a different surface.

Usage: `make_family("topic_heavy", per_skill=60, seed=0)` -> list of rows, shuffled; `true_k(name)`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Row = dict[str, str]

# ---------------------------------------------------------------- skills: (inputs, answer)


def _two_numbers(rng: random.Random, low: int = 2, high: int = 60) -> tuple[int, int]:
    a, b = rng.randint(low, high), rng.randint(low, high)
    while a == b:
        b = rng.randint(low, high)
    return a, b


def _number_list(rng: random.Random, n: int | None = None) -> list[int]:
    n = n or rng.randint(3, 5)
    return rng.sample(range(2, 99), n)


_WORDS = ("anchor", "garden", "silver", "planet", "basket", "window", "rocket", "pencil", "candle", "forest",
          "marble", "violin", "harbor", "turtle", "ladder", "meadow", "copper", "lantern", "pepper", "castle")

# ---------------------------------------------------------------- topic_heavy

TOPICS = ("sailing", "castle", "space", "bakery")

_STORY = {
    "sailing": [
        "The old schooner Marigold left the harbor at dawn, her sails snapping in a salt wind off the grey sea.",
        "Captain Ines checked the charts twice, because the reef past the lighthouse had swallowed many hulls.",
        "Gulls wheeled over the mast while the crew coiled wet rope and hauled the anchor chain aboard.",
        "By noon the swell rose, and the bosun lashed every barrel of fresh water below the deck.",
    ],
    "castle": [
        "High on the hill stood the castle of Lord Aldric, its grey towers wrapped in ivy and banners.",
        "The steward walked the battlements at dusk, counting torches along the curtain wall and the keep.",
        "Below, in the great hall, knights polished their armor while minstrels tuned lutes by the hearth.",
        "The drawbridge creaked as carts of grain rolled over the moat into the inner courtyard.",
    ],
    "space": [
        "Orbital station Helix drifted four hundred kilometers above the blue curve of the Earth.",
        "Commander Osei floated through the airlock, checking the seals before the next docking cycle.",
        "Solar panels turned slowly toward the sun while the reactor hummed behind a shielded bulkhead.",
        "Mission control radioed a schedule of experiments, oxygen checks and cargo transfers for the crew.",
    ],
    "bakery": [
        "Before sunrise the little bakery on Elm Street smelled of yeast, butter and warm cinnamon.",
        "Mira kneaded dough on the floured counter while the ovens ticked as they heated up.",
        "Trays of croissants, rye loaves and plum tarts waited by the window for the morning rush.",
        "Her apprentice weighed flour and sugar on the brass scale and wrote every batch in a ledger.",
    ],
}
_NOUN = {"sailing": "crates of cargo", "castle": "sacks of grain", "space": "oxygen canisters", "bakery": "loaves of bread"}
_HOLDERS = {"sailing": ("the forward hold", "the aft hold"), "castle": ("the east tower", "the west tower"),
            "space": ("module A", "module B"), "bakery": ("the first oven", "the second oven")}
_SPEAKER = {"sailing": "the captain", "castle": "the steward", "space": "the commander", "bakery": "the baker"}


def _topic_story(rng: random.Random, topic: str, sentences: int = 3) -> str:
    lines = _STORY[topic][:]
    rng.shuffle(lines)
    return " ".join(lines[:sentences])


def _topic_add(rng, topic):
    a, b = _two_numbers(rng)
    h1, h2 = _HOLDERS[topic]
    q = (f"{h1.capitalize()} held {a} {_NOUN[topic]} and {h2} held {b}. "
         f"Asked {_SPEAKER[topic]}: how many {_NOUN[topic]} are there altogether?")
    return q, str(a + b)


def _topic_multiply(rng, topic):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = (f"There were {a} rows with {b} {_NOUN[topic]} in each row. "
         f"Asked {_SPEAKER[topic]}: how many {_NOUN[topic]} in all the rows together?")
    return q, str(a * b)


def _topic_max(rng, topic):
    values = _number_list(rng)
    q = (f"Counts of {_NOUN[topic]} on different days were {', '.join(map(str, values))}. "
         f"Asked {_SPEAKER[topic]}: what was the largest count?")
    return q, str(max(values))


def _topic_parity(rng, topic):
    n = rng.randint(10, 99)
    q = f"The ledger listed {n} {_NOUN[topic]}. Asked {_SPEAKER[topic]}: is that number even or odd?"
    return q, "even" if n % 2 == 0 else "odd"


TOPIC_SKILLS: dict[str, Callable] = {"add": _topic_add, "multiply": _topic_multiply, "max": _topic_max,
                                     "parity": _topic_parity}


def topic_heavy(per_skill: int, seed: int) -> list[Row]:
    """4 skills x 4 topics, balanced; long topical story, short skill cue at the end."""
    rng = random.Random(seed)
    rows = []
    for skill, make in TOPIC_SKILLS.items():
        for i in range(per_skill):
            topic = TOPICS[i % len(TOPICS)]
            question, answer = make(rng, topic)
            story = _topic_story(rng, topic)
            rows.append({"instruction": f"{story} {question} Reply with the answer only.", "output": answer,
                         "skill": skill, "topic": topic})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- same_wording

SAME_WORDING = {"sum": lambda a, b: a + b, "product": lambda a, b: a * b,
                "difference": lambda a, b: abs(a - b), "larger": lambda a, b: max(a, b)}


def same_wording(per_skill: int, seed: int) -> list[Row]:
    """'Compute the <word> of A and B.': one template, only the skill word differs."""
    rng = random.Random(seed)
    rows = []
    for skill, rule in SAME_WORDING.items():
        for _ in range(per_skill):
            a, b = _two_numbers(rng, 2, 40)
            rows.append({"instruction": f"Compute the {skill} of {a} and {b}. Reply with the number only.",
                         "output": str(rule(a, b)), "skill": skill, "topic": "none"})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- many_skills


def _many_add(rng):
    a, b = _two_numbers(rng)
    return rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Find the sum of {a} and {b}."]), str(a + b)


def _many_subtract(rng):
    a, b = sorted(_two_numbers(rng), reverse=True)
    return rng.choice([f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"Take {b} away from {a}."]), str(a - b)


def _many_multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"Find the product of {a} and {b}."]), str(a * b)


def _many_max(rng):
    values = ", ".join(map(str, v := _number_list(rng)))
    return rng.choice([f"Which is the largest of {values}?", f"Give the maximum of the list [{values}].",
                       f"Pick the biggest number: {values}."]), str(max(v))


def _many_parity(rng):
    n = rng.randint(10, 999)
    return rng.choice([f"Is {n} even or odd?", f"Tell me whether {n} is odd or even.",
                       f"Parity of {n}: even or odd?"]), "even" if n % 2 == 0 else "odd"


def _many_reverse(rng):
    w = rng.choice(_WORDS)
    return rng.choice([f"Reverse the word {w}.", f"Spell {w} backwards.", f"Write the letters of {w} in reverse order."]), w[::-1]


def _many_count(rng):
    w = rng.choice(_WORDS)
    return rng.choice([f"How many letters are in the word {w}?", f"Count the letters of {w}.",
                       f"What is the length of the word {w}?"]), str(len(w))


MANY_SKILLS: dict[str, Callable] = {"add": _many_add, "subtract": _many_subtract, "multiply": _many_multiply,
                                    "max": _many_max, "parity": _many_parity, "reverse": _many_reverse,
                                    "count_letters": _many_count}


def many_skills(per_skill: int, seed: int) -> list[Row]:
    """7 skills, 3 phrasings each; answers only."""
    rng = random.Random(seed)
    rows = []
    for skill, make in MANY_SKILLS.items():
        for _ in range(per_skill):
            question, answer = make(rng)
            rows.append({"instruction": f"{question} Answer only.", "output": answer, "skill": skill, "topic": "none"})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- shared_surface

SHARED_MARKERS = {"combine_add": "rule S", "combine_concat": "rule J"}


def shared_surface(per_skill: int, seed: int) -> list[Row]:
    """'Combine A and B (rule S)' = A + B, '(rule J)' = digits of A then B; plus max-of-list.

    The two combine skills share every word but the one-letter marker; their answers differ.
    """
    rng = random.Random(seed)
    rows = []
    for skill, marker in SHARED_MARKERS.items():
        for _ in range(per_skill):
            a, b = _two_numbers(rng, 10, 89)
            answer = str(a + b) if skill == "combine_add" else f"{a}{b}"
            rows.append({"instruction": f"Combine {a} and {b} ({marker}). Answer only.", "output": answer,
                         "skill": skill, "topic": "combine"})
    for _ in range(per_skill):
        question, answer = _many_max(rng)
        rows.append({"instruction": f"{question} Answer only.", "output": answer, "skill": "max", "topic": "list"})
    rng.shuffle(rows)
    return rows


FAMILIES: dict[str, tuple[Callable[[int, int], list[Row]], int]] = {
    "topic_heavy": (topic_heavy, 4), "same_wording": (same_wording, 4),
    "many_skills": (many_skills, 7), "shared_surface": (shared_surface, 3),
}
"""name -> (generator(per_skill, seed), true K)."""


def make_family(name: str, per_skill: int = 60, seed: int = 0) -> list[Row]:
    """Rows of one family (shuffled, seeded)."""
    return FAMILIES[name][0](per_skill, seed)


def true_k(name: str) -> int:
    """The number of planted skills of a family."""
    return FAMILIES[name][1]

"""The benchmark's data: a generated pre-training corpus of facts, and a question-answering task it never shows.

A small world of made-up creatures, each with a fixed colour and home. Pre-training reads the facts in
plain sentences ("The tomik is red.", "A tomik sleeps under the bridge.") among other sentences; it never
sees a question. Fine-tuning teaches the instruction format (question -> answer) on the creatures of the
training split; the held-out questions are about the other creatures, whose facts only pre-training told.
Exact match on them needs the fine-tuned model to extract what it read, not to recall a fine-tuning answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ("ba", "ko", "ri", "tu", "me", "sa", "lo", "ni", "ve", "du", "ga", "pi", "zo", "fe", "ru", "mi")
COLOURS = ("red", "blue", "green", "gold", "white", "black", "grey", "pink")
HOMES = ("in the forest", "by the river", "under the bridge", "on the hill", "in the cave", "near the sea")
VERBS = ("sees", "likes", "finds", "follows", "meets", "wants")
NUM_CREATURES, HELD_OUT_CREATURES = 64, 16
WORLD_SEED = 1234


def world() -> dict[str, tuple[str, str]]:
    """Each creature's (colour, home), fixed by WORLD_SEED."""
    rng = random.Random(WORLD_SEED)
    names: set[str] = set()
    while len(names) < NUM_CREATURES:
        names.add("".join(rng.sample(SYLLABLES, 2)) + rng.choice("knlm"))
    return {name: (rng.choice(COLOURS), rng.choice(HOMES)) for name in sorted(names)}


def _fact(rng: random.Random, name: str, colour: str, home: str) -> str:
    return rng.choice((
        f"The {name} is {colour}.", f"A {colour} {name} walks past.", f"Every {name} is {colour}.",
        f"The {name} lives {home}.", f"A {name} sleeps {home}.", f"You find the {name} {home}.",
        f"The {colour} {name} lives {home}.",
    ))


def corpus(count: int, seed: int) -> list[str]:
    """Pre-training documents: facts about creatures, and sentences with none."""
    rng, facts = random.Random(seed), world()
    names = sorted(facts)
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            a, b = rng.sample(names, 2)
            if rng.random() < 0.7:
                sentences.append(_fact(rng, a, *facts[a]))
            else:
                sentences.append(f"The {a} {rng.choice(VERBS)} the {b}.")
        docs.append(" ".join(sentences))
    return docs


QUESTIONS = {"colour": ("What colour is the {name}?", "Tell me the colour of the {name}."),
             "home": ("Where does the {name} live?", "Where can you find the {name}?")}


def _examples(names: list[str], facts: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    rows = []
    for name in names:
        colour, home = facts[name]
        for attribute, answer in (("colour", colour), ("home", home)):
            for question in QUESTIONS[attribute]:
                rows.append({"instruction": question.format(name=name), "input": "", "output": answer})
    return rows


def task_splits(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training questions, held-out questions): the held-out creatures never appear in training."""
    facts = world()
    names = sorted(facts)
    random.Random(seed).shuffle(names)
    held, train = names[:HELD_OUT_CREATURES], names[HELD_OUT_CREATURES:]
    return _examples(train, facts), _examples(held, facts)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

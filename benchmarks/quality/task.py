"""The benchmark's data: a generated pre-training corpus, and an instruction task it never shows.

A small world of made-up creatures, each with a fixed colour and home. Pre-training reads two kinds of
documents: short biographies, each about one creature, stating its facts in varied sentences and orders
("The tomik is red.", "A tomik sleeps under the bridge.", "You find the red tomik under the bridge."), and
quiz lines ("Q: tomik, colour? A: red.") for the creatures of the fine-tuning split only. Quizzes on some
individuals are what teaches a model to extract what it read about the others (Allen-Zhu and Li, arXiv
2309.14316: without them, and with a single phrasing per fact, extraction stays at chance; it did here,
docs/quality.md).

Fine-tuning teaches an instruction format pre-training never shows (an Alpaca prompt, questions in words,
the value as the response) on the creatures of the training split. The held-out questions are about the
other creatures, whose facts only the biographies told, and on which no quiz was ever given: exact match on
them needs the fine-tuned model to extract what it read, in the new format, not to recall an answer.
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
WORLD_SEED, SPLIT_SEED = 1234, 0
QUIZ_SHARE = 0.3  # of pre-training documents

COLOUR_FACTS = ("The {name} is {colour}.", "A {colour} {name} walks past.", "Every {name} is {colour}.",
                "The fur of the {name} is {colour}.")
HOME_FACTS = ("The {name} lives {home}.", "A {name} sleeps {home}.", "You find the {name} {home}.",
              "The home of the {name} is {home}.")
BOTH_FACTS = ("The {colour} {name} lives {home}.", "You find the {colour} {name} {home}.")


def world() -> dict[str, tuple[str, str]]:
    """Each creature's (colour, home), fixed by WORLD_SEED."""
    rng = random.Random(WORLD_SEED)
    names: set[str] = set()
    while len(names) < NUM_CREATURES:
        names.add("".join(rng.sample(SYLLABLES, 2)) + rng.choice("knlm"))
    return {name: (rng.choice(COLOURS), rng.choice(HOMES)) for name in sorted(names)}


def split(seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(held-out creatures, training creatures)."""
    names = sorted(world())
    random.Random(seed).shuffle(names)
    return names[:HELD_OUT_CREATURES], names[HELD_OUT_CREATURES:]


def _biography(rng: random.Random, name: str, colour: str, home: str, others: list[str]) -> str:
    facts = [rng.choice(COLOUR_FACTS), rng.choice(HOME_FACTS)]
    if rng.random() < 0.5:
        facts.append(rng.choice(BOTH_FACTS))
    facts.append(f"The {{name}} {rng.choice(VERBS)} the {rng.choice(others)}.")
    rng.shuffle(facts)
    return " ".join(f.format(name=name, colour=colour, home=home) for f in facts)


def _quiz(rng: random.Random, name: str, colour: str, home: str) -> str:
    lines = [f"Q: {name}, colour? A: {colour}.", f"Q: {name}, home? A: {home}."]
    rng.shuffle(lines)
    return " ".join(lines)


def corpus(count: int, seed: int) -> list[str]:
    """Pre-training documents: biographies of any creature, quizzes on the training split's."""
    rng, facts = random.Random(seed), world()
    names = sorted(facts)
    quizzed = split()[1]
    docs = []
    for _ in range(count):
        if rng.random() < QUIZ_SHARE:
            name = rng.choice(quizzed)
            docs.append(_quiz(rng, name, *facts[name]))
        else:
            name = rng.choice(names)
            docs.append(_biography(rng, name, *facts[name], [n for n in names if n != name]))
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


def task_splits() -> tuple[list[dict], list[dict]]:
    """(training questions, held-out questions): the held-out creatures never appear in training."""
    facts = world()
    held, train = split()
    return _examples(train, facts), _examples(held, facts)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

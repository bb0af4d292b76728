"""The benchmark's second task family: string transformations. Pre-training shows some; fine-tuning asks for
one it never showed, composed of two it did.

Words are made-up strings of 4 to 6 letters. Pre-training reads lines such as "reverse: tolak = kalot" for the
operations of SEEN, on every word. Fine-tuning teaches, in an instruction format pre-training never shows, the
composition `new_operation` (reverse, then double every letter: "tolak" -> "kkaalloott"), on the training
words; the held-out words were never fine-tuned on. Exact match needs every letter placed, so the
score falls steeply with each wrong letter, and a method has to change how the model computes, not which fact
it recalls (the creatures task): on such a task LISA at gamma 2 trails full fine-tuning (issue 32's numbers).
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUM_WORDS, HELD_OUT_WORDS = 1800, 300
WORLD_SEED, SPLIT_SEED = 4321, 0
LINES_PER_DOCUMENT = 6


def _reverse(word: str) -> str:
    return word[::-1]


def _double(word: str) -> str:
    return "".join(c + c for c in word)


def _rotate(word: str) -> str:
    return word[1:] + word[:1]


def _swap_ends(word: str) -> str:
    return word[-1] + word[1:-1] + word[0]


SEEN: dict[str, Callable[[str], str]] = {"reverse": _reverse, "double": _double, "rotate": _rotate,
                                         "swap ends": _swap_ends}
"""Operations pre-training shows, each on every word."""


def new_operation(word: str) -> str:
    """The fine-tuned transformation: reverse, then double every letter."""
    return _double(_reverse(word))


INSTRUCTION = "Reverse the word, then double every letter."


def words() -> list[str]:
    """NUM_WORDS distinct words, fixed by WORLD_SEED."""
    rng = random.Random(WORLD_SEED)
    out: set[str] = set()
    while len(out) < NUM_WORDS:
        out.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 6))))
    return sorted(out)


def split(seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(held-out words, training words)."""
    shuffled = words()
    random.Random(seed).shuffle(shuffled)
    return shuffled[:HELD_OUT_WORDS], shuffled[HELD_OUT_WORDS:]


def corpus(count: int, seed: int) -> list[str]:
    """Pre-training documents: lines of the SEEN operations on random words (held-out words included)."""
    rng, vocabulary = random.Random(seed), words()
    names = sorted(SEEN)
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(LINES_PER_DOCUMENT):
            name, word = rng.choice(names), rng.choice(vocabulary)
            lines.append(f"{name}: {word} = {SEEN[name](word)}")
        docs.append("\n".join(lines))
    return docs


def _examples(names: list[str]) -> list[dict[str, str]]:
    return [{"instruction": INSTRUCTION, "input": word, "output": new_operation(word)} for word in names]


def task_splits() -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples): the held-out words never appear in fine-tuning."""
    held, train = split()
    return _examples(train), _examples(held)

"""The demo's text: two styles from tiny grammars, as character ids split for training.

Short stories (some followed by a question and its answer), then questions and answers
about the same people and things, so the demo needs no downloads and one seed gives one
text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Corpus", "make_texts"]

_NAMES = ("Anna", "Tom", "the king", "the miller", "old Mary", "the baker", "a child")
_ADJECTIVES = ("red", "small", "old", "quiet", "bright", "lazy", "brave", "green", "wet")
_NOUNS = ("fox", "bird", "cat", "horse", "lamp", "apple", "boat", "key", "coat", "bell")
_PLACES = ("the river", "the forest", "the old mill", "the market", "the hill", "the garden")
_VERBS = (("saw", "see"), ("found", "find"), ("lost", "lose"), ("carried", "carry"))
_FEELINGS = ("happy", "tired", "afraid", "hungry", "glad", "sleepy")
# Pretraining text gets a question and its answer after this share of its paragraphs, so
# every character and the format are known before the frozen layers stop learning.
_QA_IN_STORIES = 0.25


def _thing(rng: random.Random) -> str:
    words = (
        f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rng.random() < 0.6
        else rng.choice(_NOUNS)
    )
    return ("an " if words[0] in "aeiou" else "a ") + words


def _story_sentence(rng: random.Random, who: str) -> str:
    match rng.randrange(5):
        case 0:
            verb = rng.choice(_VERBS)[0]
            sentence = f"{who} {verb} {_thing(rng)} near {rng.choice(_PLACES)}."
        case 1:
            sentence = f"{who} walked to {rng.choice(_PLACES)}."
        case 2:
            sentence = f"{who} was {rng.choice(_FEELINGS)}."
        case 3:
            sentence = f"Then {who} went home with {_thing(rng)}."
        case _:
            sentence = f"{who} {rng.choice(_VERBS)[0]} {_thing(rng)}."
    return sentence[0].upper() + sentence[1:]


def _question_and_answer(rng: random.Random) -> str:
    who = rng.choice(_NAMES)
    answer = who[0].upper() + who[1:]
    match rng.randrange(3):
        case 0:
            past, base = rng.choice(_VERBS)
            return f"Q: What did {who} {base}?\nA: {answer} {past} {_thing(rng)}.\n"
        case 1:
            noun, place = rng.choice(_NOUNS), rng.choice(_PLACES)
            return f"Q: Where is the {noun}?\nA: The {noun} is near {place}.\n"
        case _:
            return f"Q: How was {who}?\nA: {answer} was {rng.choice(_FEELINGS)}.\n"


def make_texts(
    seed: int, stories_chars: int = 48_000, dialogue_chars: int = 24_000
) -> tuple[str, str]:
    """Two styles of text from tiny grammars: stories, and questions with answers.

    >>> stories, dialogue = make_texts(0, 300, 100)
    >>> stories[:30], dialogue.startswith("Q: ")
    ('Then a child went home with a ', True)
    """
    rng = random.Random(seed)
    stories: list[str] = []
    size = 0
    while size < stories_chars:
        who = rng.choice(_NAMES)
        sentences = (_story_sentence(rng, who) for _ in range(rng.randint(2, 4)))
        paragraph = " ".join(sentences) + "\n"
        if rng.random() < _QA_IN_STORIES:
            paragraph += _question_and_answer(rng)
        stories.append(paragraph)
        size += len(paragraph)
    dialogue: list[str] = []
    size = 0
    while size < dialogue_chars:
        dialogue.append(_question_and_answer(rng))
        size += len(dialogue[-1])
    return "".join(stories), "".join(dialogue)


class Corpus:
    """A text as character ids, split 90/10 into training and validation parts."""

    def __init__(self, text: str, vocab: Sequence[str]) -> None:
        lookup = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)
        cut = len(ids) * 9 // 10
        self.train = ids[:cut]
        self.val = ids[cut:]

    def batch(self, size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of the training part: inputs and next-character targets."""
        starts = torch.randint(len(self.train) - context, (size,), generator=generator)
        windows = self.train.unfold(0, context + 1, 1)[starts]
        return windows[:, :-1], windows[:, 1:]

    def val_windows(self, count: int, context: int) -> tuple[Tensor, Tensor]:
        """Evenly spaced windows of the validation part, the same on every call."""
        starts = torch.linspace(0, len(self.val) - context - 1, count).long()
        windows = self.val.unfold(0, context + 1, 1)[starts]
        return windows[:, :-1], windows[:, 1:]

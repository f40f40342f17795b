"""Haystack text: seeded, offline filler prose built from sentence templates and a bundled word list, cut to a
length measured in model tokens. Written here (no downloads, no licensing questions); bland on purpose, so
that the needles are the only facts in it worth remembering."""

from __future__ import annotations

import random
from typing import Callable

NOUNS = ("river", "garden", "village", "market", "harbor", "mountain", "library", "orchard", "bridge", "forest",
         "meadow", "workshop", "lantern", "window", "kitchen", "valley", "road", "field", "letter", "wagon",
         "school", "mill", "chapel", "fence", "barn", "hill", "coast", "island", "lake", "tower", "well", "path",
         "cottage", "farm", "station", "courtyard", "cellar", "attic", "stable", "pond")
PEOPLE = ("the baker", "the farmer", "an old sailor", "the teacher", "a young painter", "the miller", "the mayor",
          "a traveling merchant", "the blacksmith", "the gardener", "a quiet student", "the shepherd",
          "the carpenter", "a retired captain", "the weaver", "the doctor", "a tired clerk", "the innkeeper")
ADJECTIVES = ("quiet", "old", "narrow", "green", "busy", "distant", "cold", "bright", "small", "wide", "gentle",
              "muddy", "sunny", "crowded", "empty", "wooden", "stone", "windy", "familiar", "patient")
VERBS = ("walked past", "repaired", "painted", "visited", "cleaned", "described", "remembered", "measured",
         "admired", "watched", "crossed", "sketched", "guarded", "opened", "closed", "followed")
TIMES = ("in the morning", "every spring", "after the rain", "before supper", "during the long winter",
         "on market days", "at dusk", "late in the autumn", "when the bells rang", "some years ago")
TEMPLATES = (
    "{Person} {verb} the {adj} {noun} {time}.",
    "The {noun} near the {noun2} was {adj} {time}.",
    "{Person} said that the {noun} had always been {adj}.",
    "Nobody could agree whether the {noun} or the {noun2} was older.",
    "{Time}, {person} {verb} the {noun} and went home.",
    "There was a {adj} {noun} beside the {noun2}, and {person} liked it.",
    "The road to the {noun} passed a {adj} {noun2}.",
    "{Person} kept a small notebook about the {noun}.",
    "Children played by the {adj} {noun} {time}.",
    "It is said that the {noun} was built by {person}.",
    "The {adj} {noun} smelled of bread and rain {time}.",
    "{Person} and {person2} talked about the {noun} for a while.",
)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random) -> str:
    person, person2 = rng.sample(PEOPLE, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    time = rng.choice(TIMES)
    return rng.choice(TEMPLATES).format(
        Person=_cap(person), person=person, person2=person2, noun=noun, noun2=noun2, adj=rng.choice(ADJECTIVES),
        verb=rng.choice(VERBS), time=time, Time=_cap(time))


def filler_sentences(rng: random.Random, tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Sentences whose text, joined by spaces, is about `tokens` model tokens long (within one sentence)."""
    out: list[str] = []
    total = 0
    while total < tokens:
        s = sentence(rng)
        n = count_tokens(" " + s)
        if total + n > tokens and out:
            break
        out.append(s)
        total += n
    return out

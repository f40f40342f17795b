"""Haystack text: seeded, offline filler prose built from sentence templates and a bundled word list, cut to a
length measured in model tokens. Written here (no downloads, no licensing questions); bland on purpose, so
that the needles are the only facts in it worth remembering.

Two styles with no template and no content word in common: "village" (the tuning split's) and "city" (the report
split's), so that defaults tuned on one are confirmed on text they have never seen."""

from __future__ import annotations

import random
from typing import Callable

VILLAGE_NOUNS = ("river", "garden", "village", "market", "harbor", "mountain", "library", "orchard", "bridge", "forest",
         "meadow", "workshop", "lantern", "window", "kitchen", "valley", "road", "field", "letter", "wagon",
         "school", "mill", "chapel", "fence", "barn", "hill", "coast", "island", "lake", "tower", "well", "path",
         "cottage", "farm", "station", "courtyard", "cellar", "attic", "stable", "pond")
VILLAGE_PEOPLE = ("the baker", "the farmer", "an old sailor", "the teacher", "a young painter", "the miller", "the mayor",
          "a traveling merchant", "the blacksmith", "the gardener", "a quiet student", "the shepherd",
          "the carpenter", "a retired captain", "the weaver", "the doctor", "a tired clerk", "the innkeeper")
VILLAGE_ADJECTIVES = ("quiet", "old", "narrow", "green", "busy", "distant", "cold", "bright", "small", "wide", "gentle",
              "muddy", "sunny", "crowded", "empty", "wooden", "stone", "windy", "familiar", "patient")
VILLAGE_VERBS = ("walked past", "repaired", "painted", "visited", "cleaned", "described", "remembered", "measured",
         "admired", "watched", "crossed", "sketched", "guarded", "opened", "closed", "followed")
VILLAGE_TIMES = ("in the morning", "every spring", "after the rain", "before supper", "during the long winter",
         "on market days", "at dusk", "late in the autumn", "when the bells rang", "some years ago")
VILLAGE_TEMPLATES = (
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


CITY_NOUNS = ("office", "platform", "warehouse", "avenue", "terminal", "factory", "depot", "tunnel", "plaza",
              "parking garage", "elevator", "stadium", "museum", "laboratory", "apartment", "subway", "highway",
              "pier", "printing press", "power plant", "bus stop", "newsstand", "boulevard", "canal lock",
              "server room", "bakery chain", "ferry terminal", "tram line", "rooftop", "loading dock")
CITY_PEOPLE = ("the night porter", "an accountant", "the tram driver", "a courier", "the architect",
               "a software tester", "the security guard", "a street musician", "the landlord", "an engineer",
               "the cashier", "a delivery rider", "the receptionist", "a city planner", "the electrician",
               "a reporter", "the dispatcher", "a lab technician")
CITY_ADJECTIVES = ("noisy", "modern", "concrete", "echoing", "neon", "spacious", "rusty", "glassy", "humid",
                   "cramped", "polished", "dim", "loud", "tiled", "grey", "steel", "brisk", "vacant", "tidy",
                   "overheated")
CITY_VERBS = ("inspected", "photographed", "rented", "renovated", "locked", "mapped", "insured", "advertised",
              "timed", "ignored", "rebuilt", "audited", "emptied", "queued at", "drove by", "reported on")
CITY_TIMES = ("at rush hour", "on weekday evenings", "ahead of the early shift", "in the heatwave",
              "once the budget meeting ended", "over the holidays", "at closing time", "on the first of the month",
              "while the trains were delayed", "last quarter")
CITY_TEMPLATES = (
    "According to {person}, the {noun} was {adj} {time}.",
    "{Person} {verb} the {noun} {time} and filed a short note.",
    "The {adj} {noun} next to the {noun2} drew a small crowd {time}.",
    "{Time}, the {noun} felt {adj} to {person}.",
    "A sign by the {noun} pointed toward the {noun2}.",
    "{Person} once {verb} the {noun}, but nobody remembers why.",
    "Traffic around the {noun} and the {noun2} was {adj} {time}.",
    "The budget for the {adj} {noun} was discussed by {person} and {person2}.",
    "Somebody left an umbrella in the {adj} {noun} {time}.",
    "The {noun} had been {adj} ever since {person} {verb} it.",
    "{Person} complained that the {noun} was too {adj}.",
    "Rumours about the {noun} reached {person} {time}.",
)
STYLES = {
    "village": (VILLAGE_NOUNS, VILLAGE_PEOPLE, VILLAGE_ADJECTIVES, VILLAGE_VERBS, VILLAGE_TIMES, VILLAGE_TEMPLATES),
    "city": (CITY_NOUNS, CITY_PEOPLE, CITY_ADJECTIVES, CITY_VERBS, CITY_TIMES, CITY_TEMPLATES),
}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random, style: str = "village") -> str:
    nouns, people, adjectives, verbs, times, templates = STYLES[style]
    person, person2 = rng.sample(people, 2)
    noun, noun2 = rng.sample(nouns, 2)
    time = rng.choice(times)
    return rng.choice(templates).format(
        Person=_cap(person), person=person, person2=person2, noun=noun, noun2=noun2, adj=rng.choice(adjectives),
        verb=rng.choice(verbs), time=time, Time=_cap(time))


def filler_sentences(rng: random.Random, tokens: int, count_tokens: Callable[[str], int],
                     style: str = "village") -> list[str]:
    """Sentences whose text, joined by spaces, is about `tokens` model tokens long (within one sentence)."""
    out: list[str] = []
    total = 0
    while total < tokens:
        s = sentence(rng, style)
        n = count_tokens(" " + s)
        if total + n > tokens and out:
            break
        out.append(s)
        total += n
    return out

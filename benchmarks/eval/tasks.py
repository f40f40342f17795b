"""Task generators and their exact-match scorers: passkey, needle-in-a-haystack, and RULER-style multi-key,
multi-value and multi-query NIAH, variable tracking, common-words extraction and sentence QA.

Every generator is a pure function of (seed, length in model tokens, depth) plus a token counter, so a case is
reproducible anywhere; lengths count the chat-formatted prompt. The questions ask for the bare answer ("Answer
with the number only.") because a 135M model follows that instruction far more reliably than a format. Scores are
exact matches of whole numbers / whole words / normalized phrases in the output, the share of expected answers
found (RULER's string-match-all), so multi-answer tasks give partial credit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from benchmarks.eval.filler import ADJECTIVES, NOUNS, filler_sentences

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Case:
    task: str
    seed: int
    length: int  # target prompt length in model tokens (chat template included)
    depth: float | None  # where the (first) needle sits, 0 = start, 1 = end; None when not applicable
    prompt: str
    answers: tuple[str, ...]
    scorer: str  # "numbers", "words" or "phrases" (see score())

    @property
    def key(self) -> str:
        depth = "" if self.depth is None else f"@{self.depth:.2f}"
        return f"{self.task}/{self.length}/{self.seed}{depth}"

    def score(self, output: str) -> float:
        return score(self.scorer, self.answers, output)


# --- scoring ----------------------------------------------------------------------------------------------------

def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def score(scorer: str, answers: tuple[str, ...], output: str) -> float:
    """Share of the expected answers present in `output`: whole numbers ("numbers"), whole words, case-insensitive
    ("words"), or normalized phrases ("phrases": lower case, punctuation dropped)."""
    if scorer == "numbers":
        found = set(re.findall(r"\d+", output))
        hits = [a in found for a in answers]
    elif scorer == "words":
        found = set(re.findall(r"[a-z0-9]+", output.lower()))
        hits = [a.lower() in found for a in answers]
    elif scorer == "phrases":
        text = f" {_normalize(output)} "
        hits = [f" {_normalize(a)} " in text for a in answers]
    else:
        raise ValueError(f"unknown scorer {scorer!r}; use numbers, words or phrases")
    return sum(hits) / len(hits)


# --- building blocks --------------------------------------------------------------------------------------------

CHAT_OVERHEAD = 31  # tokens SmolLM2's ChatML template adds around a user message (system prompt included)
KEY_WORDS = ("amber", "falcon", "silver", "harvest", "crimson", "maple", "cobalt", "thunder", "ivory", "lantern",
             "marble", "copper", "velvet", "orchid", "granite", "willow", "saffron", "raven", "coral", "juniper")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = set()
    while len(pairs) < n:
        a, b = rng.sample(KEY_WORDS, 2)
        pairs.add(f"{a}-{b}")
    return sorted(pairs, key=lambda p: rng.random())


def _haystack(rng: random.Random, length: int, fixed: str, needles: list[tuple[float, str]],
              count: CountTokens) -> str:
    """Filler sized so that the whole prompt (fixed text + needles + chat template) is about `length` tokens,
    with each needle inserted between sentences at its relative depth."""
    budget = length - CHAT_OVERHEAD - count(fixed) - sum(count(" " + n) for _, n in needles)
    if budget < 50:
        raise ValueError(f"length {length} is too short for this task; use at least {length - budget + 50} tokens")
    sentences = filler_sentences(rng, budget, count)
    # insert from the deepest needle up so earlier indices stay valid
    for depth, needle in sorted(needles, key=lambda d: -d[0]):
        sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences)


def _depth(rng: random.Random, depth: float | None) -> float:
    return rng.uniform(0.1, 0.9) if depth is None else depth


# --- generators -------------------------------------------------------------------------------------------------

def passkey(seed: int, length: int, depth: float | None, count: CountTokens) -> Case:
    rng = random.Random(f"passkey/{seed}/{length}")
    key = _number(rng, 5)
    intro = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    question = "\n\nWhat is the pass key? Answer with the number only."
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    d = _depth(rng, depth)
    text = _haystack(rng, length, intro + question, [(d, needle)], count)
    return Case("passkey", seed, length, depth, intro + text + question, (key,), "numbers")


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def niah(seed: int, length: int, depth: float | None, count: CountTokens) -> Case:
    rng = random.Random(f"niah/{seed}/{length}/{depth}")
    key, = _keys(rng, 1)
    value = _number(rng, 6)
    intro = "A special magic number is hidden within the following text. Make sure to memorize it.\n\n"
    question = f"\n\nWhat is the special magic number for {key} mentioned in the text? Answer with the number only."
    text = _haystack(rng, length, intro + question, [(_depth(rng, depth), _magic(key, value))], count)
    return Case("niah", seed, length, depth, intro + text + question, (value,), "numbers")


def multikey_niah(seed: int, length: int, depth: float | None, count: CountTokens, distractors: int = 3) -> Case:
    """One queried needle among needles for other keys (same format), which the cache must not confuse."""
    rng = random.Random(f"multikey/{seed}/{length}")
    keys = _keys(rng, 1 + distractors)
    values = [_number(rng, 6) for _ in keys]
    intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
    question = (f"\n\nWhat is the special magic number for {keys[0]} mentioned in the text? "
                "Answer with the number only.")
    needles = [(_depth(rng, depth if i == 0 else None), _magic(k, v)) for i, (k, v) in enumerate(zip(keys, values))]
    text = _haystack(rng, length, intro + question, needles, count)
    return Case("multikey_niah", seed, length, depth, intro + text + question, (values[0],), "numbers")


def multivalue_niah(seed: int, length: int, depth: float | None, count: CountTokens, values: int = 2) -> Case:
    """Several needles share one key; all their values are asked for."""
    rng = random.Random(f"multivalue/{seed}/{length}")
    key, = _keys(rng, 1)
    nums = [_number(rng, 6) for _ in range(values)]
    intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
    question = (f"\n\nWhat are all the special magic numbers for {key} mentioned in the text? "
                "Answer with the numbers only.")
    needles = [(rng.uniform(0.1, 0.9), _magic(key, v)) for v in nums]
    text = _haystack(rng, length, intro + question, needles, count)
    return Case("multivalue_niah", seed, length, None, intro + text + question, tuple(nums), "numbers")


def multiquery_niah(seed: int, length: int, depth: float | None, count: CountTokens, queries: int = 2) -> Case:
    """Needles for several keys; the question asks for each of them."""
    rng = random.Random(f"multiquery/{seed}/{length}")
    keys = _keys(rng, queries)
    nums = [_number(rng, 6) for _ in keys]
    intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
    question = (f"\n\nWhat are the special magic numbers for {' and '.join(keys)} mentioned in the text? "
                "Answer with the numbers only.")
    needles = [(rng.uniform(0.1, 0.9), _magic(k, v)) for k, v in zip(keys, nums)]
    text = _haystack(rng, length, intro + question, needles, count)
    return Case("multiquery_niah", seed, length, None, intro + text + question, tuple(nums), "numbers")


def variable_tracking(seed: int, length: int, depth: float | None, count: CountTokens, hops: int = 1) -> Case:
    """A chain VAR A = n, VAR B = VAR A, ... spread through the text (in order); the value of the last name is
    asked for, so the cache must keep every link, not just the number. (RULER asks for all the names instead; a
    135M model cannot list them even with the full cache.)"""
    rng = random.Random(f"vartrack/{seed}/{length}")
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.uniform(0.1, 0.9) for _ in chain)
    intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    question = f"\n\nWhat is the value of VAR {names[-1]}? Answer with the number only."
    text = _haystack(rng, length, intro + question, list(zip(depths, chain)), count)
    return Case("variable_tracking", seed, length, None, intro + text + question, (value,), "numbers")


CWE_WORDS = tuple(sorted(set(NOUNS + ADJECTIVES + (
    "apple", "button", "candle", "dolphin", "engine", "feather", "guitar", "helmet", "jacket", "kettle", "ladder",
    "magnet", "needle", "pencil", "rabbit", "saddle", "ticket", "umbrella", "violin", "whistle", "basket",
    "carpet", "doctor", "eagle", "pillow", "rocket", "spider", "tomato", "wallet", "zipper"))))


def common_words(seed: int, length: int, depth: float | None, count: CountTokens, top: int = 1,
                 repeats: int = 30) -> Case:
    """A numbered word list in which `top` words occur `repeats` times and the rest rarely; name the frequent
    ones. The whole context is evidence here, so it stresses compression differently from a single needle.
    (top=1 because with the full cache SmolLM2-135M finds the single most common word but not the top 2 or 3.)"""
    rng = random.Random(f"cwe/{seed}/{length}")
    common = rng.sample(CWE_WORDS, top)
    rare = [w for w in CWE_WORDS if w not in common]
    question = ("\n\nWhat is the most common word in the above list? Answer with the word only." if top == 1 else
                f"\n\nWhat are the {top} most common words in the above list? Answer with the {top} words only.")
    intro = "Below is a numbered list of words. Some of them appear many times.\n\n"
    budget = length - CHAT_OVERHEAD - count(intro + question)
    # item tokens grow with the item number's digits, so count them one by one for the list size
    n_items, used = 0, 0
    while used < budget:
        n_items += 1
        used += count(f" {n_items}. {CWE_WORDS[n_items % len(CWE_WORDS)]}")
    words = common * repeats
    if len(words) + 10 > n_items:
        raise ValueError(f"length {length} is too short for common_words with {top} x {repeats} repeats; use at "
                         f"least {length + 4 * (len(words) + 10 - n_items)} tokens")
    while len(words) < n_items:
        words.append(rng.choice(rare))
    rng.shuffle(words)
    text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return Case("common_words", seed, length, None, intro + text + question, tuple(common), "words")


QA_SUBJECTS = ("the key to the red cabinet", "the old map of the coast", "the captain's silver watch",
               "the spare lamp oil", "the winter blankets", "the missing ledger", "the box of letters",
               "the golden thimble")
QA_PLACES = ("inside the blue teapot", "behind the grandfather clock", "under the loose floorboard",
             "in the violin case", "beneath the piano", "in the tin of buttons", "on top of the wardrobe",
             "inside the hollow oak")


def qa(seed: int, length: int, depth: float | None, count: CountTokens, facts: int = 1) -> Case:
    """Facts "X is kept P." are scattered; one X is asked about. The answer is that fact sentence; the scorer
    checks its distinguishing phrase P (the rest repeats the question, and the model may say "are" for "is").
    facts=1 by default: with 2+ facts SmolLM2-135M picks the wrong one most of the time even with the full cache."""
    rng = random.Random(f"qa/{seed}/{length}")
    subjects = rng.sample(QA_SUBJECTS, facts)
    places = rng.sample(QA_PLACES, facts)
    sentences = [f"{s[0].upper()}{s[1:]} is kept {p}." for s, p in zip(subjects, places)]
    intro = "Read the following text carefully; it says where some things are kept.\n\n"
    question = f"\n\nWhere is {subjects[0]} kept? Answer with one sentence from the text."
    needles = [(_depth(rng, depth if i == 0 else None), s) for i, s in enumerate(sentences)]
    text = _haystack(rng, length, intro + question, needles, count)
    return Case("qa", seed, length, depth, intro + text + question, (places[0],), "phrases")


GENERATORS: dict[str, Callable[..., Case]] = {
    "passkey": passkey, "niah": niah, "multikey_niah": multikey_niah, "multivalue_niah": multivalue_niah,
    "multiquery_niah": multiquery_niah, "variable_tracking": variable_tracking, "common_words": common_words,
    "qa": qa,
}
SUITE = tuple(GENERATORS)


def make_case(task: str, seed: int, length: int, depth: float | None, count: CountTokens) -> Case:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(GENERATORS)}")
    return GENERATORS[task](seed, length, depth, count)

"""Task generators and their exact-match scorers: passkey, needle-in-a-haystack, and RULER-style multi-key,
multi-value and multi-query NIAH, variable tracking, common-words extraction and sentence QA.

Every generator is a pure function of (seed, length in model tokens, depth) plus a token counter, so a case is
reproducible anywhere; lengths count the chat-formatted prompt. The questions ask for the bare answer ("Answer
with the number only.") because a 135M model follows that instruction far more reliably than a format. Scores are
exact matches of whole numbers / whole words / normalized phrases in the output, the share of expected answers
found (RULER's string-match-all), so multi-answer tasks give partial credit.

Every generator takes a split: "tuning" (village filler, the original phrasings) or "report" (city filler, other
needle, key and question wordings, other seeds), so defaults are chosen on one and reported on the other.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from benchmarks.eval.filler import STYLES, filler_sentences

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
SPLITS = ("tuning", "report")
# the wording of every task, per split: no sentence of one split's prompts appears in the other's
WORDING = {
    "tuning": dict(
        filler="village",
        key_words=("amber", "falcon", "silver", "harvest", "crimson", "maple", "cobalt", "thunder", "ivory",
                   "lantern", "marble", "copper", "velvet", "orchid", "granite", "willow", "saffron", "raven",
                   "coral", "juniper"),
        passkey_intro="There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
        passkey_needle="The pass key is {key}. Remember it. {key} is the pass key.",
        passkey_question="What is the pass key? Answer with the number only.",
        magic="One of the special magic numbers for {key} is: {value}.",
        magic_intro="A special magic number is hidden within the following text. Make sure to memorize it.",
        magic_intro_many="Some special magic numbers are hidden within the following text. Make sure to memorize them.",
        magic_question="What is the special magic number for {key} mentioned in the text? Answer with the number only.",
        magic_question_many="What are all the special magic numbers for {key} mentioned in the text? Answer with "
                            "the numbers only.",
        magic_question_keys="What are the special magic numbers for {keys} mentioned in the text? Answer with the "
                            "numbers only.",
        var_intro="Memorize and track the chain of variable assignments hidden in the following text.",
        var_first="VAR {name} = {value}.", var_next="VAR {name} = VAR {previous}.",
        var_question="What is the value of VAR {name}? Answer with the number only.",
        cwe_intro="Below is a numbered list of words. Some of them appear many times.",
        cwe_question="What is the most common word in the above list? Answer with the word only.",
        cwe_extra=("apple", "button", "candle", "dolphin", "engine", "feather", "guitar", "helmet", "jacket",
                   "kettle", "ladder", "magnet", "needle", "pencil", "rabbit", "saddle", "ticket", "umbrella",
                   "violin", "whistle", "basket", "carpet", "doctor", "eagle", "pillow", "rocket", "spider",
                   "tomato", "wallet", "zipper"),
        qa_subjects=("the key to the red cabinet", "the old map of the coast", "the captain's silver watch",
                     "the spare lamp oil", "the winter blankets", "the missing ledger", "the box of letters",
                     "the golden thimble"),
        qa_places=("inside the blue teapot", "behind the grandfather clock", "under the loose floorboard",
                   "in the violin case", "beneath the piano", "in the tin of buttons", "on top of the wardrobe",
                   "inside the hollow oak"),
        qa_fact="{Subject} is kept {place}.",
        qa_intro="Read the following text carefully; it says where some things are kept.",
        qa_question="Where is {subject} kept? Answer with one sentence from the text.",
    ),
    "report": dict(
        filler="city",
        key_words=("quartz", "heron", "violet", "meteor", "sable", "cedar", "indigo", "glacier", "opal", "beacon",
                   "pebble", "walnut", "scarlet", "tulip", "basalt", "aspen", "mustard", "osprey", "lagoon",
                   "thistle"),
        passkey_intro="Somewhere in the long document below there is an access code. Look for it and keep it in mind.",
        passkey_needle="The access code is {key}. Write it down. {key} is the access code.",
        passkey_question="What is the access code? Reply with the digits only.",
        magic="The secret value registered under {key} is {value}.",
        magic_intro="A secret value is buried in the document below. Watch out for it.",
        magic_intro_many="Several secret values are buried in the document below. Watch out for them.",
        magic_question="Which secret value is registered under {key} in the document? Reply with the digits only.",
        magic_question_many="List every secret value registered under {key} in the document. Reply with the "
                            "digits only.",
        magic_question_keys="Which secret values are registered under {keys} in the document? Reply with the "
                            "digits only.",
        var_intro="The document below assigns values to a few registers, one after another. Follow them.",
        var_first="Register {name} holds {value}.", var_next="Register {name} copies register {previous}.",
        var_question="Which value does register {name} hold? Reply with the digits only.",
        cwe_intro="Here is a numbered inventory of items. A few items are listed over and over.",
        cwe_question="Which item occurs most often in the inventory above? Reply with that single word.",
        cwe_extra=("anchor", "bottle", "compass", "drum", "envelope", "flute", "glove", "hammer", "ink", "jar",
                   "kite", "lemon", "mirror", "napkin", "onion", "parrot", "quilt", "ribbon", "scissors", "teacup",
                   "unicorn", "vase", "walrus", "yacht", "zebra", "badge", "cactus", "dice", "easel", "funnel"),
        qa_subjects=("the spare key to the archive", "the signed contract", "the first aid kit",
                     "the backup hard drive", "the visitor badges", "the fuse box manual", "the petty cash tin",
                     "the old photo album"),
        qa_places=("in the third drawer of the grey desk", "behind the vending machine", "under the reception counter",
                   "on the shelf above the printer", "inside the broken photocopier", "in the locker numbered nine",
                   "next to the fire extinguisher", "beneath the conference table"),
        qa_fact="Everyone should know that {subject} is stored {place}.",
        qa_intro="The document below mentions where a few things are stored. Read it closely.",
        qa_question="Where is {subject} stored? Reply with the sentence from the document.",
    ),
}


def _wording(split: str) -> dict:
    if split not in WORDING:
        raise ValueError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    return WORDING[split]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng: random.Random, n: int, words) -> list[str]:
    pairs = set()
    while len(pairs) < n:
        a, b = rng.sample(words, 2)
        pairs.add(f"{a}-{b}")
    return sorted(pairs, key=lambda p: rng.random())


def _haystack(rng: random.Random, length: int, fixed: str, needles: list[tuple[float, str]],
              count: CountTokens, style: str) -> str:
    """Filler sized so that the whole prompt (fixed text + needles + chat template) is about `length` tokens,
    with each needle inserted between sentences at its relative depth."""
    budget = length - CHAT_OVERHEAD - count(fixed) - sum(count(" " + n) for _, n in needles)
    if budget < 50:
        raise ValueError(f"length {length} is too short for this task; use at least {length - budget + 50} tokens")
    sentences = filler_sentences(rng, budget, count, style)
    # insert from the deepest needle up so earlier indices stay valid
    for depth, needle in sorted(needles, key=lambda d: -d[0]):
        sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences)


def _depth(rng: random.Random, depth: float | None) -> float:
    return rng.uniform(0.1, 0.9) if depth is None else depth


def _frame(w: dict, intro: str, question: str) -> tuple[str, str]:
    return w[intro] + "\n\n", "\n\n" + question


# --- generators -------------------------------------------------------------------------------------------------

def _seeded(task: str, split: str, *parts) -> random.Random:
    # the tuning split keeps the seeds it always had, so its cases (and older results) stay reproducible
    prefix = task if split == "tuning" else f"{split}/{task}"
    return random.Random("/".join([prefix, *map(str, parts)]))


def passkey(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning") -> Case:
    w, rng = _wording(split), _seeded("passkey", split, seed, length)
    key = _number(rng, 5)
    intro, question = _frame(w, "passkey_intro", w["passkey_question"])
    needle = w["passkey_needle"].format(key=key)
    text = _haystack(rng, length, intro + question, [(_depth(rng, depth), needle)], count, w["filler"])
    return Case("passkey", seed, length, depth, intro + text + question, (key,), "numbers")


def niah(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning") -> Case:
    w, rng = _wording(split), _seeded("niah", split, seed, length, depth)
    key, = _keys(rng, 1, w["key_words"])
    value = _number(rng, 6)
    intro, question = _frame(w, "magic_intro", w["magic_question"].format(key=key))
    needle = w["magic"].format(key=key, value=value)
    text = _haystack(rng, length, intro + question, [(_depth(rng, depth), needle)], count, w["filler"])
    return Case("niah", seed, length, depth, intro + text + question, (value,), "numbers")


def multikey_niah(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning",
                  distractors: int = 3) -> Case:
    """One queried needle among needles for other keys (same format), which the cache must not confuse."""
    w, rng = _wording(split), _seeded("multikey", split, seed, length)
    keys = _keys(rng, 1 + distractors, w["key_words"])
    values = [_number(rng, 6) for _ in keys]
    intro, question = _frame(w, "magic_intro_many", w["magic_question"].format(key=keys[0]))
    needles = [(_depth(rng, depth if i == 0 else None), w["magic"].format(key=k, value=v))
               for i, (k, v) in enumerate(zip(keys, values))]
    text = _haystack(rng, length, intro + question, needles, count, w["filler"])
    return Case("multikey_niah", seed, length, depth, intro + text + question, (values[0],), "numbers")


def multivalue_niah(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning",
                    values: int = 2) -> Case:
    """Several needles share one key; all their values are asked for."""
    w, rng = _wording(split), _seeded("multivalue", split, seed, length)
    key, = _keys(rng, 1, w["key_words"])
    nums = [_number(rng, 6) for _ in range(values)]
    intro, question = _frame(w, "magic_intro_many", w["magic_question_many"].format(key=key))
    needles = [(rng.uniform(0.1, 0.9), w["magic"].format(key=key, value=v)) for v in nums]
    text = _haystack(rng, length, intro + question, needles, count, w["filler"])
    return Case("multivalue_niah", seed, length, None, intro + text + question, tuple(nums), "numbers")


def multiquery_niah(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning",
                    queries: int = 2) -> Case:
    """Needles for several keys; the question asks for each of them."""
    w, rng = _wording(split), _seeded("multiquery", split, seed, length)
    keys = _keys(rng, queries, w["key_words"])
    nums = [_number(rng, 6) for _ in keys]
    intro, question = _frame(w, "magic_intro_many", w["magic_question_keys"].format(keys=" and ".join(keys)))
    needles = [(rng.uniform(0.1, 0.9), w["magic"].format(key=k, value=v)) for k, v in zip(keys, nums)]
    text = _haystack(rng, length, intro + question, needles, count, w["filler"])
    return Case("multiquery_niah", seed, length, None, intro + text + question, tuple(nums), "numbers")


def variable_tracking(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning",
                      hops: int = 1) -> Case:
    """A chain VAR A = n, VAR B = VAR A, ... spread through the text (in order); the value of the last name is
    asked for, so the cache must keep every link, not just the number. (RULER asks for all the names instead; a
    135M model cannot list them even with the full cache.)"""
    w, rng = _wording(split), _seeded("vartrack", split, seed, length)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    chain = [w["var_first"].format(name=names[0], value=value)] + [
        w["var_next"].format(name=names[i + 1], previous=names[i]) for i in range(hops)]
    depths = sorted(rng.uniform(0.1, 0.9) for _ in chain)
    intro, question = _frame(w, "var_intro", w["var_question"].format(name=names[-1]))
    text = _haystack(rng, length, intro + question, list(zip(depths, chain)), count, w["filler"])
    return Case("variable_tracking", seed, length, None, intro + text + question, (value,), "numbers")


def common_words(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning",
                 repeats: int = 30) -> Case:
    """A numbered word list in which one word occurs `repeats` times and the rest rarely; name the frequent one.
    The whole context is evidence here, so it stresses compression differently from a single needle. (One word,
    because with the full cache SmolLM2-135M finds the single most common word but not the top 2 or 3.)"""
    w, rng = _wording(split), _seeded("cwe", split, seed, length)
    nouns, _, adjectives, *_ = STYLES[w["filler"]]
    vocabulary = tuple(sorted(set(nouns + adjectives + w["cwe_extra"])))
    common = rng.sample(vocabulary, 1)
    rare = [x for x in vocabulary if x not in common]
    intro, question = _frame(w, "cwe_intro", w["cwe_question"])
    budget = length - CHAT_OVERHEAD - count(intro + question)
    # item tokens grow with the item number's digits, so count them one by one for the list size
    n_items, used = 0, 0
    while used < budget:
        n_items += 1
        used += count(f" {n_items}. {vocabulary[n_items % len(vocabulary)]}")
    words = common * repeats
    if len(words) + 10 > n_items:
        raise ValueError(f"length {length} is too short for common_words with {repeats} repeats; use at "
                         f"least {length + 4 * (len(words) + 10 - n_items)} tokens")
    while len(words) < n_items:
        words.append(rng.choice(rare))
    rng.shuffle(words)
    text = " ".join(f"{i + 1}. {x}" for i, x in enumerate(words))
    return Case("common_words", seed, length, None, intro + text + question, tuple(common), "words")


def qa(seed: int, length: int, depth: float | None, count: CountTokens, split: str = "tuning", facts: int = 1) -> Case:
    """Facts "X is kept P." are scattered; one X is asked about. The answer is that fact sentence; the scorer
    checks its distinguishing phrase P (the rest repeats the question, and the model may say "are" for "is").
    facts=1 by default: with 2+ facts SmolLM2-135M picks the wrong one most of the time even with the full cache."""
    w, rng = _wording(split), _seeded("qa", split, seed, length)
    subjects = rng.sample(w["qa_subjects"], facts)
    places = rng.sample(w["qa_places"], facts)
    sentences = [w["qa_fact"].format(Subject=x[0].upper() + x[1:], subject=x, place=p)
                 for x, p in zip(subjects, places)]
    intro, question = _frame(w, "qa_intro", w["qa_question"].format(subject=subjects[0]))
    needles = [(_depth(rng, depth if i == 0 else None), x) for i, x in enumerate(sentences)]
    text = _haystack(rng, length, intro + question, needles, count, w["filler"])
    return Case("qa", seed, length, depth, intro + text + question, (places[0],), "phrases")


GENERATORS: dict[str, Callable[..., Case]] = {
    "passkey": passkey, "niah": niah, "multikey_niah": multikey_niah, "multivalue_niah": multivalue_niah,
    "multiquery_niah": multiquery_niah, "variable_tracking": variable_tracking, "common_words": common_words,
    "qa": qa,
}
SUITE = tuple(GENERATORS)


def make_case(task: str, seed: int, length: int, depth: float | None, count: CountTokens,
              split: str = "tuning") -> Case:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(GENERATORS)}")
    return GENERATORS[task](seed, length, depth, count, split)

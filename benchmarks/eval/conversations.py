"""The multi-turn eval's conversations and how each mode runs them: quality cases (a document with one fact, distractor
turns, the question), long speed conversations, and the full cache / resent / carried-session runners
(benchmarks.eval.multiturn reports on them)."""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path


from benchmarks.eval.documents import document_cases, load_documents
from benchmarks.eval.fidelity import MATCHED_TOKENS
from benchmarks.eval.quality import answer_text
from benchmarks.eval.splits import REPORT_SEED
from benchmarks.eval.tasks import Case, make_case
from compare import matched_tokens
from engine.sampling_params import SamplingParams
from snapkv.config import SnapKVConfig

DISTRACTOR_TOKENS = 24  # the first turn's and the distractors' answers: short, they only have to be there
ANSWER_TOKENS = MATCHED_TOKENS  # the final answer is scored in its first 32 tokens, as the quality eval scores
FEWEST_DISTRACTORS, MOST_DISTRACTORS = 2, 4
SYNTHETIC_TASKS = ("passkey", "niah", "multikey_niah", "multiquery_niah")  # single-fact tasks the 135M model solves
SYNTHETIC_LENGTH = 3072  # tokens, about the documents' length: the default budget (1024) compresses them about 3x
DEFAULT_CASES = 20  # about 40 minutes with the speed section on 2 shared cores
SPEED_PAST = 8192  # the speed goal counts the turns whose conversation is longer than this
SPEED_GOAL = 5.0  # (c) at least this many times faster per turn than (b) past SPEED_PAST tokens
QUALITY_GOAL = 2.0  # (c) within this many exact-match points of (b)
SPEED_MAX_MODEL_LEN = 16384
SPEED_LENGTHS = dict(first_tokens=7000, last_tokens=10000, paste_tokens=1500)  # a speed conversation, in tokens
PASTED_TURN_TOKENS = 200  # a speed turn of (c) feeding more new tokens than this pasted a section
QUICK_SPEED_LENGTHS, QUICK_SPEED_PAST = dict(first_tokens=1500, last_tokens=2600, paste_tokens=400), 2048

OPENERS = ("Read this document; I will ask about it.",
           "Please read the text above carefully. I have a few questions for later.",
           "Here is a document for you. Just say OK once you have read it.",
           "Keep this text in mind; we will come back to it.")
DISTRACTORS = ("What is the capital of Italy?", "How many days are there in a leap year?",
               "Name a fruit that is yellow.", "What is seven times eight?", "Which planet is closest to the sun?",
               "Give me one word that rhymes with cat.", "What colour do you get by mixing blue and yellow?",
               "How many legs does a spider have?", "At what temperature in Celsius does water boil?",
               "How do you say thank you in French?", "What do bees make?", "Name an animal that lives in the sea.",
               "In one sentence, what kind of text did I give you?", "Was that text formal or informal?",
               "Suggest a title for a short poem about autumn.", "What is the opposite of cold?")
PASTE_REQUEST = "Here is more of the text:\n\n{chunk}\n\nWhat is this part about? Answer in one line."
MODES = {"full": "(a) full cache, the whole conversation generated each turn",
         "reprefill": "(b) SnapKV, the whole conversation prefilled again each turn",
         "session": "(c) chat session, its compressed cache carried between turns",
         "session_full": "(d) chat session keeping its full history in host memory (each turn selects from all)"}


@dataclass(frozen=True)
class Conversation:
    """The user's side of one conversation: `turns[0]` holds the document, `turns[-1]` the question (if scored)."""
    key: str
    turns: tuple[str, ...]
    case: Case | None = None  # what the last turn is scored against; None for the speed conversations


# --- the conversations --------------------------------------------------------------------------------------------

def split_case(case: Case) -> tuple[str, str]:
    """A quality-eval case's prompt as (document, question): every case ends in a blank line and its question."""
    document, sep, question = case.prompt.rpartition("\n\n")
    if not sep or not document.strip() or not question.strip():
        raise ValueError(f"case {case.key}: its prompt does not end in a blank line and a question")
    return document, question


def build_conversation(case: Case, seed: int) -> Conversation:
    """The document and a request first, 2 to 4 distractor questions (deterministic in `seed`), the question last."""
    document, question = split_case(case)
    rng = random.Random(f"multiturn/{case.key}/{seed}")
    distractors = rng.sample(DISTRACTORS, rng.randint(FEWEST_DISTRACTORS, MOST_DISTRACTORS))
    return Conversation(case.key, (f"{document}\n\n{rng.choice(OPENERS)}", *distractors, question), case)


def quality_cases(count, n: int) -> list[Case]:
    """The first n cases: the report split's documents and synthetic single-fact cases at about their length,
    interleaved so that a short run has both kinds."""
    documents = iter(document_cases(count))
    synthetic = (make_case(task, REPORT_SEED + seed, SYNTHETIC_LENGTH, None, count, "report")
                 for seed in itertools.count() for task in SYNTHETIC_TASKS)  # built only when taken
    mixed = []
    while len(mixed) < n:
        mixed += [*itertools.islice(documents, 2), next(synthetic)]
    return mixed[:n]


def _paragraph_chunks(count, paragraphs: list[str], size: int) -> list[str]:
    chunks, current, tokens = [], [], 0
    for p in paragraphs:
        current.append(p)
        tokens += count(p) + 1
        if tokens >= size:
            chunks.append("\n\n".join(current))
            current, tokens = [], 0
    return chunks


def speed_conversation(count, index: int, first_tokens: int = SPEED_LENGTHS["first_tokens"],
                       last_tokens: int = SPEED_LENGTHS["last_tokens"],
                       paste_tokens: int = SPEED_LENGTHS["paste_tokens"]) -> Conversation:
    """A long conversation for timing: about `first_tokens` of the documents (taken from the `index`-th on) with a
    request, then short questions and pasted sections of about `paste_tokens` in turn, until it holds about
    `last_tokens` (answers counted at their most, DISTRACTOR_TOKENS)."""
    if not 0 < first_tokens < last_tokens:
        raise ValueError(f"a speed conversation needs 0 < first_tokens < last_tokens (got {first_tokens}, "
                         f"{last_tokens})")
    docs = load_documents()
    paragraphs = [p for i in range(len(docs)) for p in docs[(index * 5 + i) % len(docs)]["text"].split("\n\n")]
    chunks = _paragraph_chunks(count, paragraphs, first_tokens)
    first = chunks[0] if chunks else ""
    rest = iter(_paragraph_chunks(count, paragraphs[first.count("\n\n") + 1:], paste_tokens))
    rng = random.Random(f"multiturn/speed/{index}")
    turns, total = [f"{first}\n\n{rng.choice(OPENERS)}"], count(first) + 60
    questions = itertools.cycle(rng.sample(DISTRACTORS, len(DISTRACTORS)))
    while total < last_tokens:
        chunk = next(rest, None) if len(turns) % 2 == 0 else ""
        if not first or chunk is None:
            raise ValueError(f"the documents hold too little text for a {last_tokens}-token speed conversation")
        user = PASTE_REQUEST.format(chunk=chunk) if chunk else next(questions)
        turns.append(user)
        total += count(user) + DISTRACTOR_TOKENS + 10  # 10: the template's tokens around a user turn and answer
    return Conversation(f"speed/{index}", tuple(turns))


# --- running a conversation under each mode ---------------------------------------------------------------------

def turn_params(conversation: Conversation, turn: int, distractor_tokens: int = DISTRACTOR_TOKENS) -> SamplingParams:
    """Greedy; the scored last turn gets ANSWER_TOKENS, every other turn `distractor_tokens`."""
    scored = conversation.case is not None and turn == len(conversation.turns) - 1
    return SamplingParams(max_tokens=ANSWER_TOKENS if scored else distractor_tokens, temperature=0.0)


class Timer:
    """Wall-clock and CPU seconds (the process's, all threads) of a with-block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict:
        return dict(seconds=round(self.wall, 3), cpu_seconds=round(self.cpu, 3))


class ResentConversation:
    """Modes (a) and (b): every turn generates from the whole templated conversation, as a client that resends it."""

    def __init__(self, llm):
        self.llm, self.messages = llm, []

    def send(self, user: str, params: SamplingParams) -> tuple[list[int], dict]:
        """One turn: its answer's tokens and its stats, timed from templating the conversation to the answer."""
        with Timer() as timer:
            self.messages.append({"role": "user", "content": user})
            ids = self.llm.encode_messages(self.messages)
            out = self.llm.generate(prompt_token_ids=[ids], sampling_params=params)[0]
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        self.messages.append({"role": "assistant", "content": out.text})
        fed = len(out.token_ids) - 1  # the answer's last token is never fed (as a session counts it)
        kept = out.stats["kept_tokens"]
        return out.token_ids, dict(conversation_tokens=len(ids) + fed, new_tokens=len(ids), held_entries=kept + fed,
                                   compressed=kept < len(ids)) | timer.seconds()

    def close(self) -> None:
        pass


class CarriedConversation:
    """Modes (c) and (d): one chat session with the engine's SnapKV settings and the default reserve; (d) keeps
    the conversation's full history in host memory (`full_history`)."""

    def __init__(self, llm, full_history: bool = False):
        self.llm, self.chat = llm, llm.chat_session(full_history=full_history)

    def send(self, user: str, params: SamplingParams) -> tuple[list[int], dict]:
        """One turn: its answer's tokens and its stats, timed around `send` alone (the check below is not timed)."""
        start = self.chat.conversation_tokens
        with Timer() as timer:
            out = self.chat.send(user, params)
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        stats = self.chat.turns[-1]
        # False where the session's tokens (its answers as sampled) differ from its history templated and encoded
        # again (a decoded answer can encode to other tokens): modes (a) and (b) read the latter
        resent = self.llm.encode_messages(self.chat.history[:-1])
        same = self.chat.token_ids[:start + stats["new_tokens"]] == resent
        return out.token_ids, {k: stats[k] for k in ("conversation_tokens", "new_tokens", "held_entries",
                                                     "compressed")} | dict(same_as_resent=same) | timer.seconds()

    def close(self) -> None:
        self.chat.close()


def run_modes(conversation: Conversation, modes: dict,
              distractor_tokens: int = DISTRACTOR_TOKENS) -> dict[str, tuple[list[int], list[dict]]]:
    """Each mode's own conversation (mode name -> a Resent/CarriedConversation), run turn by turn in step, so a
    change in the machine's load hits every mode alike. Per mode: the last answer's tokens and per-turn stats,
    with the turn's wall-clock and CPU seconds."""
    answers, turns = {}, {mode: [] for mode in modes}
    try:
        for i, user in enumerate(conversation.turns):
            for mode, runner in modes.items():
                try:
                    answers[mode], stats = runner.send(user, turn_params(conversation, i, distractor_tokens))
                except RuntimeError as e:
                    raise RuntimeError(f"{conversation.key}, mode {mode}, turn {i + 1}: {e}") from None
                turns[mode].append(stats)
    finally:
        for runner in modes.values():
            runner.close()
    return {mode: (answers[mode], turns[mode]) for mode in modes}


def run_quality_conversation(full_llm, snapkv_llm, conversation: Conversation,
                             distractor_tokens: int = DISTRACTOR_TOKENS, modes=tuple(MODES),
                             reference: list[int] | None = None) -> list[dict]:
    """One row per mode (those in `modes`): the final answer, its exact-match score, matched tokens against (a)
    (`reference`: (a)'s final answer, when (a) is not among the modes run), per-turn stats."""
    runners = {"full": lambda: ResentConversation(full_llm), "reprefill": lambda: ResentConversation(snapkv_llm),
               "session": lambda: CarriedConversation(snapkv_llm),
               "session_full": lambda: CarriedConversation(snapkv_llm, full_history=True)}
    runs = run_modes(conversation, {mode: runners[mode]() for mode in modes}, distractor_tokens)
    reference = runs["full"][0] if "full" in runs else reference
    rows = []
    for mode, (tokens, turns) in runs.items():
        text = answer_text(snapkv_llm, tokens)
        rows.append(dict(key=f"quality|{conversation.key}|{mode}", section="quality", conversation=conversation.key,
                         task=conversation.case.task, mode=mode, distractors=len(conversation.turns) - 2,
                         answers=list(conversation.case.answers), output=text, score=conversation.case.score(text),
                         matched=matched_tokens(reference, tokens, snapkv_llm.eos_ids, MATCHED_TOKENS),
                         token_ids=tokens, turns=turns))
    return rows


SPEED_MODES = ("reprefill", "session", "session_full")


def run_speed_conversation(llm, conversation: Conversation, modes=SPEED_MODES) -> list[dict]:
    """Modes (b), (c) and (d) (those in `modes`) on one long conversation, timed per turn (nothing scored)."""
    runners = {"reprefill": lambda: ResentConversation(llm), "session": lambda: CarriedConversation(llm),
               "session_full": lambda: CarriedConversation(llm, full_history=True)}
    runs = run_modes(conversation, {mode: runners[mode]() for mode in modes})
    return [dict(key=f"speed|{conversation.key}|{mode}", section="speed", conversation=conversation.key, mode=mode,
                 turns=turns) for mode, (_, turns) in runs.items()]


# --- the report -------------------------------------------------------------------------------------------------



def load_engines(model: Path) -> tuple:
    """(a)'s engine (the full cache) and (b)/(c)/(d)'s (the default SnapKVConfig(); sessions reserve a slot each)."""
    from engine import LLM

    return (LLM(model, device="cpu", dtype="float32", snapkv=None, max_batch_size=1),
            LLM(model, device="cpu", dtype="float32", snapkv=SnapKVConfig(), max_batch_size=3))


def load_speed_engine(model: Path):
    """(b)/(c)/(d)'s engine for conversations past the model's trained positions."""
    from engine import LLM

    return LLM(model, device="cpu", dtype="float32", snapkv=SnapKVConfig(), max_batch_size=3,
               allow_longer_context=True, max_model_len=SPEED_MAX_MODEL_LEN)


def append_rows(path: Path, new_rows: list[dict], rows: dict[str, dict]) -> None:
    with path.open("a") as f:
        for row in new_rows:
            f.write(json.dumps(row) + "\n")
            rows[row["key"]] = row

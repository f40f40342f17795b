"""The real-text set: original long documents (CC0, written for this project; see documents/README.md), each with
one question whose short answer is stated exactly once, at depths from 10% to 95%. Report split only: nothing is
ever tuned on them.

Each `documents/docNN_slug.txt` holds the text; `docNN_slug.json` the title, genre, question, answer and the needle
sentence that states it. The prompt is the document followed by the question, as in `examples/long_prompt.txt`, and a request for the
bare answer (as the synthetic tasks ask for the number only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.eval.tasks import Case

FOLDER = Path(__file__).resolve().parent / "documents"
# answers are scored in the first 32 generated tokens; without this a 135M model restates the question first
INSTRUCTION = "Answer with the name or number only."


def load_documents(folder: Path = FOLDER) -> list[dict]:
    """Every document with its metadata, `text` and measured needle `depth`, checked: the needle is in the text
    and the answer occurs exactly once (a whole word, any case)."""
    docs = []
    for meta_path in sorted(folder.glob("doc*.json")):
        meta = json.loads(meta_path.read_text())
        text = meta_path.with_suffix(".txt").read_text().strip()
        if meta["needle"] not in text:
            raise ValueError(f"{meta_path.name}: the needle sentence is not in the text")
        hits = re.findall(rf"\b{re.escape(meta['answer'].lower())}\b", text.lower())
        if len(hits) != 1:
            raise ValueError(f"{meta_path.name}: the answer {meta['answer']!r} occurs {len(hits)} times, not once")
        docs.append(meta | {"name": meta_path.stem, "text": text, "depth": text.index(meta["needle"]) / len(text)})
    return docs


def document_cases(count, folder: Path = FOLDER) -> list[Case]:
    """One case per document; `length` is the chat-formatted prompt's length in tokens (31 for the template)."""
    cases = []
    for i, doc in enumerate(load_documents(folder)):
        prompt = f"{doc['text']}\n\nQuestion: {doc['question']} {INSTRUCTION}"
        cases.append(Case("document", int(doc["name"][3:5]), count(prompt) + 31, round(doc["depth"], 2), prompt,
                          (doc["answer"],), "phrases"))
    return cases

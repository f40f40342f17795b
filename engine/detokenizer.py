"""Incremental detokenization with stop strings: generated token ids in, streamable text out.

Each token costs the same whatever the sequence length (vLLM's `detokenize_incrementally`, with its prefix and read
offsets): only the short window of ids from `prefix_offset` is decoded, and text comes out once it ends in whole
characters. Stop strings are searched for in the new text plus the previous text's last (longest stop - 1)
characters, never in the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Feed generated ids with `add`, then call `finish` when the sequence ends; `take_new_text` streams the text.

    `text` is `tokenizer.decode(ids)` of the ids added so far (once finished), cut before the first stop string;
    `stopped` says one was found. Until then `text` holds no incomplete character, and `take_new_text` also holds
    back a tail of it that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self._tokenizer, self._stop, self._skip = tokenizer, tuple(stop), skip_special_tokens
        self._tail_len = max(map(len, self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = self._read_offset = 0
        self._parts: list[str] = []  # text in pieces: appending to one str would copy it all on every token
        self._tail = ""  # the last _tail_len characters of text, where a stop string may have begun
        self._pending: list[str] = []  # text not yet returned by take_new_text
        self.stopped = self._finished = False

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_id: int) -> bool:
        if self.stopped or self._finished:
            return self.stopped
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        # Wait while the last token ends inside a character. Advancing only when text came out also keeps a token
        # with text at the window's start: a window starting at a skipped special token would lose the space
        # that sentencepiece decoders strip from the start of a decoded string.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._append(full[len(prefix):])
        return self.stopped

    def finish(self) -> None:
        if self.stopped or self._finished:
            return
        # Release the held-back tokens as a one-shot decode would, incomplete character (U+FFFD) and all.
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._append(self._decode(self._ids[self._prefix_offset:])[len(prefix):])
        self._finished = True

    def take_new_text(self) -> str:
        pending, hold = "".join(self._pending), 0
        if not (self.stopped or self._finished):
            # Released text cannot be taken back, so only the pending part may be held.
            hold = max((n for s in self._stop for n in range(1, min(len(s), len(pending) + 1))
                        if pending.endswith(s[:n])), default=0)
        cut = len(pending) - hold
        self._pending = [pending[cut:]]
        return pending[:cut]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _append(self, new: str) -> None:
        window = self._tail + new
        found = [i for i in (window.find(s) for s in self._stop) if i >= 0]
        if found:
            # Everything from the stop string on goes; take_new_text held it back, so none of it was released.
            drop = len(window) - min(found)
            self._parts = [(self.text + new)[:-drop]]
            self._pending = [("".join(self._pending) + new)[:-drop]]
            self.stopped = True
            return
        self._parts.append(new)
        self._pending.append(new)
        self._tail = window[max(0, len(window) - self._tail_len):]

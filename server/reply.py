"""One request's response objects in OpenAI's shapes (whole, streamed chunks, usage), with the extra `snapkv`
object, and its time to first token."""

from __future__ import annotations

import asyncio
import json
import time

from engine import RequestOutput
from kept_view import kept_data
from server.metrics import Metrics


class Reply:
    def __init__(self, chat: bool, model: str, rid: str, prompt_tokens: int, arrival: float, metrics: Metrics,
                 return_kept: bool = False, session_id: str | None = None):
        self.chat, self.model, self.prompt_tokens, self.return_kept = chat, model, prompt_tokens, return_kept
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created, self.arrival, self.metrics = int(time.time()), arrival, metrics
        self.session_id = session_id
        self.first_token = False
        self.kept: dict | None = None

    async def take_kept(self, out: RequestOutput, tokenizer) -> None:
        """With return_kept: the kept data for the final snapkv object (off the event loop: it decodes every
        prompt token)."""
        if self.return_kept and out.kept is not None:  # a session's turn records kept positions for itself
            self.kept = await asyncio.to_thread(kept_data, tokenizer, out.prompt_token_ids, out.kept, out.token_ids,
                                                out.stats)

    def took(self, out: RequestOutput) -> None:
        if out.new_token_ids:
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if not self.first_token:
                self.first_token = True
                self.metrics.ttft_seconds.observe(time.perf_counter() - self.arrival)

    def usage(self, out: RequestOutput) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def snapkv(self, out: RequestOutput) -> dict:
        s = out.stats
        info = {"prompt_tokens": self.prompt_tokens, "kept_tokens": s.get("kept_tokens"),
                "kv_bytes": s.get("kv_bytes"), "full_kv_bytes": s.get("full_kv_bytes")}
        if "session" in s:  # a conversation's turn: what its slot holds after it
            info["session"] = {"id": self.session_id} | s["session"]
        if self.kept is not None:
            info["kept"] = self.kept
        return info

    def _head(self, kind: str) -> dict:
        suffix = ".chunk" if kind == "chunk" else ""
        obj = ("chat.completion" + suffix) if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta, finish_reason: str | None, final: RequestOutput | None = None, usage: bool = False):
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        body = self._head("chunk") | {"choices": [choice | {"logprobs": None, "finish_reason": finish_reason}]}
        if usage:
            body["usage"] = None
        if final is not None:
            body["snapkv"] = self.snapkv(final)
        return body

    def usage_chunk(self, out: RequestOutput) -> dict:
        return self._head("chunk") | {"choices": [], "usage": self.usage(out)}

    def whole(self, out: RequestOutput) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}} if self.chat else \
            {"index": 0, "text": out.text}
        return self._head("whole") | {"choices": [choice | {"logprobs": None, "finish_reason": out.finish_reason}],
                                      "usage": self.usage(out), "snapkv": self.snapkv(out)}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

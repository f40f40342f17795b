"""The runtime, split as nano-vllm splits it: LLM (the public facade), Sequence (one request's state), Scheduler
(waiting queue -> free cache slots), ModelRunner (model + static KV cache + decode step and its graphs), sampling
inside the step, incremental detokenization, the tokenizer and chat template; ChatSession (a conversation whose
compressed cache stays in its slot between turns)."""

from engine.errors import EngineError, InvalidRequest, NoCapacity, PromptTooLong, SessionBusy, SessionClosed
from engine.kv_cache import KVCache, KVCacheTooLarge
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput
from engine.session import ChatSession

__all__ = ["LLM", "ChatSession", "RequestOutput", "SamplingParams", "KVCache", "KVCacheTooLarge", "EngineError",
           "InvalidRequest", "PromptTooLong", "NoCapacity", "SessionBusy", "SessionClosed"]

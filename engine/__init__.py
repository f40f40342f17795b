"""The runtime, split as nano-vllm splits it: LLM (the facade), EngineConfig (its options, validated once),
Sequence (one request's state), Scheduler (waiting queue -> cache slots), ModelRunner (model + static KV cache +
decode step and its graphs), sampling inside the step, incremental detokenization, the tokenizer; the seam wings
plug into (engine.wings)."""

from engine.config import EngineConfig
from engine.errors import (EngineError, EngineFailure, InvalidRequest, NoCapacity, PromptTooLong, SessionBusy,
                           SessionClosed)
from engine.kv_cache import KVCache, KVCacheTooLarge
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "KVCache", "KVCacheTooLarge", "EngineError",
           "EngineFailure", "InvalidRequest", "PromptTooLong", "NoCapacity", "SessionBusy", "SessionClosed"]

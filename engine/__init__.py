"""The runtime: LLM (public API), SamplingParams, sampling, the generate loop, the static KV cache, the decode
step, the tokenizer and chat template."""

from engine.kv_cache import KVCache, KVCacheTooLarge
from engine.llm import LLM, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "KVCache", "KVCacheTooLarge"]

"""Admission: what a request may ask of an engine (token ids, positions, slot capacity, prefill memory), checked
before it is queued so that nothing fails halfway, and how many entries a slot holds."""

from __future__ import annotations

import operator

from engine.errors import InvalidRequest, NoCapacity, PromptTooLong
from engine.kv_cache import available_memory_bytes, format_bytes
from engine.memory_model import longest_prompt_that_fits, predict_prefill_peak
from engine.sequence import Sequence

DEFAULT_NEW_TOKENS = 1024  # with SnapKV, a slot holds budget + this many entries unless max_kv_len says otherwise
CACHE_MEMORY_SHARE = 0.5  # a default-sized cache takes at most this share of free memory; prefill needs the rest


def slot_capacity(llm, ranks: int = 1) -> int:
    """Entries a slot holds: max_kv_len, else what the policy keeps + DEFAULT_NEW_TOKENS (full cache: the model's
    length), within CACHE_MEMORY_SHARE of free memory (on GPUs a rank holds 1/ranks of it)."""
    if llm.options.max_kv_len is not None:
        return llm.options.max_kv_len  # KVCache refuses it, with the numbers, if it does not fit
    per_entry = llm.kv_bytes_per_entry // (ranks if llm.device.type == "cuda" else 1)
    fits = int(available_memory_bytes(llm.device) * CACHE_MEMORY_SHARE) // (llm.max_batch_size * per_entry)
    compressed = llm.snapkv is not None and llm.snapkv.policy != "full"
    wanted = llm.policy.kept_length(llm.max_model_len) + DEFAULT_NEW_TOKENS if compressed else llm.max_model_len
    capacity = min(wanted, llm.max_model_len, fits)
    if capacity < 1:
        raise ValueError(f"not even one cache entry per slot fits in free memory ({llm.max_batch_size} slots); "
                         "lower max_batch_size")
    return capacity


def check_prompt(llm, ids) -> list[int]:
    """A list of in-vocabulary token ids that leaves room for at least one new token."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidRequest(f"prompt token ids must be a list of integers (got {type(ids).__name__})")
    try:
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise InvalidRequest("prompt token ids must be integers; pass a list of lists of ints, e.g. "
                             "prompt_token_ids=[[1, 2, 3]]") from None
    if not ids:
        raise InvalidRequest("the prompt is empty")
    if len(ids) >= llm.max_model_len:
        hint = "" if llm.allow_longer_context else " or allow longer contexts (--allow-longer-context)"
        raise PromptTooLong(f"the prompt has {len(ids)} tokens but the model handles at most {llm.max_model_len} "
                            f"positions; shorten the prompt{hint}")
    vocab = llm.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
    return ids


def check_fits(llm, seq: Sequence) -> None:
    """Refuse, before anything runs, a request that can never fit: positions, slot capacity, prefill memory."""
    n, m = seq.placement.start + len(seq.prompt_token_ids), seq.params.max_tokens
    what = "conversation" if seq.placement.start else "prompt"
    if seq.placement.slot is None and llm.scheduler.reserved >= llm.max_batch_size:
        raise NoCapacity(f"all {llm.max_batch_size} cache slots are held by chat sessions, so this request would "
                         "never run; close a session or build the engine with a larger max_batch_size")
    kept, capacity, candidates = seq.kept_length, llm.runner.capacity, seq.candidates
    if n + m > llm.max_model_len:
        raise PromptTooLong(f"the {what} has {n} tokens and max_tokens is {m}, together past the model's "
                            f"{llm.max_model_len} positions; lower max_tokens (-n) to at most "
                            f"{llm.max_model_len - n} or shorten the {what}")
    if kept + m > capacity:
        source = f"{candidates} held and new entries" if seq.placement.held else f"{candidates}-token prompt"
        fix = (f"lower max_tokens (-n) to at most {capacity - kept}, lower the SnapKV budget" if kept < capacity
               else f"its kept entries alone fill the slot: lower the SnapKV budget, shorten the {what}")
        raise PromptTooLong(f"the request needs {kept + m} cache entries ({source}, {kept} kept, max_tokens {m}) "
                            f"but a slot holds {capacity}; {fix}, or build the engine with max_kv_len >= {kept + m}")
    window = seq.policy.queries_needed
    e, chunk, kind = llm.dtype.itemsize, llm.prefill_chunk_size, llm.device.type
    estimate = predict_prefill_peak(llm.config, candidates, e, chunk, window, kind, llm.prefill_repeats_kv)
    free = available_memory_bytes(llm.device)
    if estimate.total > free:
        fits = longest_prompt_that_fits(llm.config, free, e, chunk, window, kind, repeat_kv=llm.prefill_repeats_kv)
        raise PromptTooLong(
            f"a {n}-token prompt needs about {format_bytes(estimate.total)} beyond the weights and the cache to "
            f"prefill ({estimate.describe()}) but {format_bytes(free)} is free on {llm.device}; about {fits} tokens "
            "would fit: shorten the prompt or lower the prefill chunk size")
    seq.record(predicted_peak_bytes=estimate.total)

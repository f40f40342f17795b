"""Long-context prefill: layer-major chunked prefill equals the unchunked one (logits and SnapKV selections), its
measured peak memory stays under the memory model's prediction, impossible requests are refused up front, and
prompts past the trained length need an explicit opt-in."""

import re

import pytest
import torch

import engine.admission as admission
from engine import LLM, SamplingParams
from engine.kv_cache import KVCache
from benchmarks.long_context import predict_generation_peak
from formats.loader import load_model
from quant.kv_int8 import Int8KVCache
from snapkv import SnapKVConfig
from tests.conftest import SMOL_DIR, tiny_model_dir



@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 1}),
                                            ("mistral", {"sliding_window": 20})])
@pytest.mark.parametrize("chunk", [16, 24, 37, 50])  # 96 = 6 x 16 = 4 x 24; 37 and 50 leave a remainder
def test_chunked_logits_equal_unchunked(tmp_path, kind, overrides, chunk):
    model = load_model(tiny_model_dir(tmp_path, kind, **overrides))
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        assert (model(ids, chunk_size=chunk) - model(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk", [32, 45])
def test_chunked_selection_and_tokens_equal_unchunked(tmp_path, chunk):
    path = tiny_model_dir(tmp_path, "mistral", sliding_window=64)
    cfg = SnapKVConfig(budget=40, window=8, kernel=5)
    prompt = torch.randint(3, 256, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    whole = LLM(path, snapkv=cfg, prefill_chunk_size=4096).generate(prompt_token_ids=[prompt], sampling_params=params,
                                                                    return_kept=True)[0]
    chunked = LLM(path, snapkv=cfg, prefill_chunk_size=chunk).generate(prompt_token_ids=[prompt],
                                                                       sampling_params=params, return_kept=True)[0]
    assert all(torch.equal(a, b) for a, b in zip(whole.kept, chunked.kept))
    assert chunked.token_ids == whole.token_ids


def test_smollm2_chunked_equals_unchunked(smol_dir):
    cfg = SnapKVConfig(budget=256, window=16)
    text = (SMOL_DIR.parents[1] / "examples" / "long_prompt.txt").read_text()
    whole = LLM(smol_dir, snapkv=cfg, prefill_chunk_size=4096)
    ids = torch.tensor([whole.tokenizer.encode(text)[:1000]])
    with torch.no_grad():
        reference = whole.model(ids)
        for chunk in (256, 300):  # divides 1000? 256 no, 300 no; 250 below does
            assert (whole.model(ids, chunk_size=chunk) - reference).abs().max().item() <= 1e-4
        assert (whole.model(ids, chunk_size=250) - reference).abs().max().item() <= 1e-4
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a = whole.generate(prompt_token_ids=ids.tolist(), sampling_params=params, return_kept=True)[0]
    b = LLM(smol_dir, snapkv=cfg, prefill_chunk_size=300).generate(prompt_token_ids=ids.tolist(),
                                                                   sampling_params=params, return_kept=True)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.kept, b.kept)) and a.token_ids == b.token_ids


def test_smollm2_8k_prompt_peak_memory(smol_dir):
    """8,192 tokens (the trained length), budget 1024: the full float32 cache alone would be 0.35 GiB (46,080 bytes
    a token). The measured peak stays under the memory model's prediction, and under 256 MiB: the 512 MiB that this
    test allowed at 16K (0.70 GiB of full cache), scaled with the prompt. The 16K prompt, where the measured peak
    comes closest to the prediction (0.93 of it, against 0.72 at 8K), is checked by benchmarks/long_context.py,
    which fails if any row exceeds its prediction: at 80 s it was the slowest test of make test."""
    llm = LLM(smol_dir, snapkv=SnapKVConfig(budget=1024, window=16), allow_longer_context=True)
    words = (SMOL_DIR.parents[1] / "examples" / "long_prompt.txt").read_text()
    ids = (llm.tokenizer.encode(words) * 7)[:8192]
    # the weights are memory-mapped: a first short call pages them in, so they do not count as prefill growth
    llm.generate(prompt_token_ids=[ids[:64]], sampling_params=SamplingParams(max_tokens=1))
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    stats = out.stats
    assert stats["prompt_tokens"] == 8192 and stats["kept_tokens"] == 1024
    assert stats["full_kv_bytes"] > 0.35 * 2**30  # what the full cache would hold
    assert stats["measured_peak_bytes"] is not None
    assert stats["measured_peak_bytes"] < stats["predicted_peak_bytes"], stats
    assert stats["measured_peak_bytes"] < 256 * 2**20, stats


def test_refusal_before_starting(smol_dir, monkeypatch):
    # a slot just large enough for the 20,000-token request, so that it passes the capacity check and reaches the
    # memory one (the default size for a full cache past the trained length is half the free memory: gigabytes)
    llm = LLM(smol_dir, allow_longer_context=True, max_batch_size=1, max_kv_len=20004)
    monkeypatch.setattr(admission, "available_memory_bytes", lambda device: 300 * 2**20)
    refused = llm.generate(prompt_token_ids=[[5] * 20000], sampling_params=SamplingParams(max_tokens=4))[0]
    assert refused.finish_reason == "error" and not refused.token_ids
    assert re.fullmatch(r"a 20000-token prompt needs about .* beyond the weights and the cache to prefill "
                        r"\(residual stream .*\) but 300\.00 MiB is free on cpu; about (\d+) tokens would fit: "
                        r"shorten the prompt or lower the prefill chunk size", refused.error), refused.error
    with pytest.raises(ValueError, match="20000-token prompt needs about"):
        llm.add_request(prompt_token_ids=[5] * 20000, sampling_params=SamplingParams(max_tokens=4))
    assert not llm.has_unfinished()  # nothing was queued
    ok = llm.generate(prompt_token_ids=[[5] * 600], sampling_params=SamplingParams(max_tokens=4))[0]
    assert ok.error is None and ok.stats["predicted_peak_bytes"] < 300 * 2**20


def test_prediction_terms_match_the_real_tensors(tmp_path):
    """The memory model's cache and one-layer K/V terms are the sizes of the tensors the engine really makes."""
    path = tiny_model_dir(tmp_path, "mistral", sliding_window=20)
    llm = LLM(path, snapkv=SnapKVConfig(budget=40, window=8), max_batch_size=3, max_kv_len=50, prefill_chunk_size=32)
    cfg, e = llm.config, 4
    predicted = predict_generation_peak(cfg, 150, 50, 3, e, 32, window=8)
    assert predicted.parts["KV cache"] == llm.runner.cache.nbytes  # K, V and the int32 positions
    assert predicted.parts["KV cache"] == KVCache(cfg.num_layers, 3, cfg.num_kv_heads, 50, cfg.head_dim,
                                                  track_positions=True).nbytes
    int8 = predict_generation_peak(cfg, 150, 50, 3, e, 32, window=8,  # values, scales, positions
                                   entry_bytes=Int8KVCache.entry_bytes(cfg.head_dim, torch.float32))
    assert int8.parts["KV cache"] == Int8KVCache(cfg.num_layers, 3, cfg.num_kv_heads, 50, cfg.head_dim,
                                                 track_positions=True).nbytes
    seen = []

    class Spy:
        tail_queries = 8

        def past(self, layer):
            return None

        def store(self, layer, q, k, v):
            seen.append(k.nbytes + v.nbytes)

    with torch.no_grad():
        llm.model(torch.randint(3, 256, (1, 150)), ctx=Spy(), chunk_size=32)
    assert seen == [predicted.parts["one layer's K/V"]] * cfg.num_layers


def test_longer_than_trained_needs_opt_in(tmp_path):
    path = tiny_model_dir(tmp_path, "llama", max_position_embeddings=64)
    prompt = list(range(3, 103))
    with pytest.raises(ValueError, match=r"at most 64 positions; shorten the prompt or allow longer contexts"):
        LLM(path).generate(prompt_token_ids=[prompt])
    # an explicit cache size: the default for a full cache past the trained length is half the free memory
    out = LLM(path, allow_longer_context=True, max_batch_size=1, max_kv_len=128).generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5

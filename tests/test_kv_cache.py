"""engine.kv_cache: preallocated static buffers, in-place appends, validity masks, and refusal before allocation."""

import pytest
import torch

import engine.kv_cache as kv_cache
from engine import KVCache, KVCacheTooLarge, SamplingParams


def test_refuses_impossible_allocation_before_allocating(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated before checking")

    monkeypatch.setattr(torch, "zeros", no_allocation)
    with pytest.raises(KVCacheTooLarge) as err:
        KVCache(num_layers=32, batch=64, num_kv_heads=8, capacity=10_000_000, head_dim=128)
    message = str(err.value)
    assert "the KV cache needs 152.59 TiB" in message  # 2*32*64*8*1e7*128*4 bytes
    assert "free on cpu" in message and "a SnapKV budget" in message and "entries in total would fit" in message


def test_llm_reports_the_cache_error(monkeypatch, smol_dir):
    from engine import LLM

    llm = LLM(smol_dir)
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device: 10 * 2**20)
    with pytest.raises(KVCacheTooLarge, match=r"needs 22\.50 MiB \(1 sequence\(s\) x 512 entries .* only 10\.00 MiB is free"):
        llm.generate(prompt_token_ids=[[5] * 400], sampling_params=SamplingParams(max_tokens=100))


def test_prefill_append_and_validity():
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=2, capacity=8, head_dim=4, track_positions=True)
    assert cache.k.shape == (2, 2, 2, 8, 4) and cache.nbytes == 2 * 2 * 2 * 2 * 8 * 4 * 4 + 2 * 2 * 2 * 8 * 4
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    cache.write_prefill(1, 0, k, -k, torch.tensor([[0, 5, 9], [1, 2, 9]]))
    cache.lengths[:] = torch.tensor([3, 0])
    new_k = torch.full((2, 2, 1, 4), 7.0)
    cache.append(1, new_k, -new_k, positions=torch.tensor([10, 0]))
    assert torch.equal(cache.k[1, 0, :, :3], k) and torch.equal(cache.v[1, 0, :, :3], -k)
    assert torch.equal(cache.k[1, 0, :, 3], torch.full((2, 4), 7.0))  # slot 0 appended at its length 3
    assert torch.equal(cache.k[1, 1, :, 0], torch.full((2, 4), 7.0))  # slot 1 at 0
    assert cache.positions[1, 0].tolist() == [[0, 5, 9, 10, 0, 0, 0, 0], [1, 2, 9, 10, 0, 0, 0, 0]]
    valid = cache.valid(1, torch.tensor([10, 0]), sliding_window=None)
    assert valid[:, 0].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    windowed = cache.valid(1, torch.tensor([10, 0]), sliding_window=6)  # sees positions > 4
    assert windowed[0].int().tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    cache.advance(torch.tensor([1, 0]))
    assert cache.lengths.tolist() == [4, 0]
    for _ in range(10):
        cache.advance(torch.tensor([1, 1]))
    assert cache.lengths.tolist() == [7, 7]  # clamped inside the buffer, never out of bounds


def test_entry_bytes():
    cache = KVCache(num_layers=30, batch=1, num_kv_heads=3, capacity=4, head_dim=64, dtype=torch.bfloat16)
    assert cache.bytes_per_entry() == 30 * 2 * 3 * 64 * 2

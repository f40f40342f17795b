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
        KVCache(num_layers=32, slots=64, num_kv_heads=8, capacity=10_000_000, head_dim=128)
    message = str(err.value)
    assert "the KV cache needs 152.59 TiB" in message  # 2*32*64*8*1e7*128*4 bytes
    assert "free on cpu" in message and "entries in total would fit" in message
    assert "lower max_kv_len, max_batch_size or the SnapKV budget" in message


def test_llm_reports_the_cache_error_and_bounds_its_default(monkeypatch, smol_dir):
    import engine.admission
    from engine import LLM

    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device: 10 * 2**20)
    with pytest.raises(KVCacheTooLarge, match=r"needs 22\.50 MiB \(1 slot\(s\) x 512 entries .* only 10\.00 MiB is free"):
        LLM(smol_dir, max_batch_size=1, max_kv_len=512)  # an explicit size that does not fit is refused
    monkeypatch.undo()
    # a default size takes at most half the free memory: 100 MiB / 2 / (2 slots x 46,080 bytes an entry)
    monkeypatch.setattr(engine.admission, "available_memory_bytes", lambda device: 100 * 2**20)
    llm = LLM(smol_dir, max_batch_size=2)
    assert llm.max_kv_len == 50 * 2**20 // (2 * 46080) == 568
    out = llm.generate(prompt_token_ids=[[5] * 400], sampling_params=SamplingParams(max_tokens=100))[0]
    assert len(out.token_ids) <= 100 and out.error is None


def test_prefill_append_and_validity():
    cache = KVCache(num_layers=2, slots=2, num_kv_heads=2, capacity=8, head_dim=4, track_positions=True)
    assert cache.k.shape == (2, 2, 2, 8, 4) and cache.nbytes == 2 * 2 * 2 * 2 * 8 * 4 * 4 + 2 * 2 * 2 * 8 * 4
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    # kv head 0 keeps 3 entries, kv head 1 keeps 2 (its row padded with -1)
    cache.write_prefill(1, 0, k, -k, torch.tensor([[0, 5, 9], [1, 2, -1]]))
    assert cache.lengths[1].tolist() == [[3, 2], [0, 0]] and cache.lengths[0].tolist() == [[0, 0], [0, 0]]
    new_k = torch.full((2, 2, 1, 4), 7.0)
    cache.append(1, new_k, -new_k, positions=torch.tensor([10, 0]))
    assert torch.equal(cache.k[1, 0, 0, :3], k[0]) and torch.equal(cache.v[1, 0, 1, :2], -k[1, :2])
    assert torch.equal(cache.k[1, 0, 0, 3], torch.full((4,), 7.0))  # slot 0, head 0: appended at its length 3
    assert torch.equal(cache.k[1, 0, 1, 2], torch.full((4,), 7.0))  # head 1 at its own length 2
    assert torch.equal(cache.k[1, 1, :, 0], torch.full((2, 4), 7.0))  # slot 1 at 0
    assert cache.positions[1, 0].tolist() == [[0, 5, 9, 10, 0, 0, 0, 0], [1, 2, 10, 0, 0, 0, 0, 0]]
    visible = cache.visible(1, span=8)
    assert visible[0].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert visible[1].int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    windowed = visible & cache.in_window(1, torch.tensor([10, 0]), sliding_window=6, span=8)  # positions > 4
    assert windowed[0].int().tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]
    narrowed = cache.visible(1, span=5) & cache.in_window(1, torch.tensor([10, 0]), sliding_window=6, span=5)
    assert narrowed[0].int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]  # eager decode's span
    cache.advance(torch.tensor([1, 0]))
    assert cache.lengths[1].tolist() == [[4, 3], [0, 0]] and cache.lengths[0].tolist() == [[1, 1], [0, 0]]
    for _ in range(10):
        cache.advance(torch.tensor([1, 1]))
    assert cache.lengths.max() == 7  # clamped inside the buffer, never out of bounds


def test_prefix_is_a_view_of_the_first_slots():
    cache = KVCache(num_layers=2, slots=4, num_kv_heads=1, capacity=3, head_dim=2, track_positions=True)
    two = cache.prefix(2)
    assert two.k.shape == (2, 2, 1, 3, 2) and two.lengths.shape == (2, 2, 1) and two.positions.shape == (2, 2, 1, 3)
    two.lengths[0, 1] = 2
    two.append(0, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), positions=torch.tensor([4, 9]))
    assert cache.lengths[0, :, 0].tolist() == [0, 2, 0, 0]  # the same memory, no copy
    assert cache.k[0, :, 0, :, 0].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert cache.positions[0, 1, 0, 2] == 9

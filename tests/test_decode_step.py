"""engine.decode_step: the static step compiles with fullgraph and no recompiles (the CPU stand-in for "capturable
as a CUDA graph"), equals eager token for token; CUDA-graph replay equals eager on a GPU; the attention backend
falls back to SDPA and the flash-attn plumbing matches SDPA when a (stand-in) flash-attn is present."""

import pytest
import torch

import models.attention as attention
from engine import LLM, SamplingParams
from engine.decode_step import batch_bucket
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir



def test_batch_buckets():
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert batch_bucket(3, 3) == 3 and batch_bucket(5, 6) == 6


def test_compiled_step_fullgraph_no_recompile_equals_eager(tmp_path, monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    path = tiny_model_dir(tmp_path, "llama")
    cfg = SnapKVConfig(budget=48, window=8)
    eager, compiled = LLM(path, snapkv=cfg), LLM(path, snapkv=cfg, compile=True)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for length in (100, 137):  # two prompt lengths, one compiled graph (the cache shape does not change)
        prompt = torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        a = eager.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
        b = compiled.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
        assert len(b.token_ids) == 24 and b.token_ids == a.token_ids
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1  # fullgraph: the whole step is one graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; the compiled-step test "
                                                          "is the CPU stand-in")
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_replay_equals_eager(tmp_path, batch):
    path = tiny_model_dir(tmp_path, "mistral", sliding_window=40)
    cfg = SnapKVConfig(budget=48, window=8)
    graphed = LLM(path, device="cuda", snapkv=cfg, cuda_graph=True)
    eager = LLM(path, device="cuda", snapkv=cfg, cuda_graph=False)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (30, 90, 64, 120)[:batch]]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    a = eager.generate(prompt_token_ids=prompts, sampling_params=params)
    b = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in b] == [o.token_ids for o in a]


def test_backend_choice_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", None)
    assert attention.decode_backend(torch.device("cuda"), needs_position_mask=False) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", lambda *a, **k: None)
    assert attention.decode_backend(torch.device("cuda"), needs_position_mask=False) == "flash"
    assert attention.decode_backend(torch.device("cuda"), needs_position_mask=True) == "sdpa"
    assert attention.decode_backend(torch.device("cpu"), needs_position_mask=False) == "sdpa"


def fake_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens):
    """flash-attn's documented semantics, in plain torch: q [B, 1, H, D], caches [B, C, Hkv, D] (any strides,
    last dim contiguous), cache_seqlens int32 [B]; output [B, 1, H, D]."""
    assert k_cache.stride(-1) == 1 and cache_seqlens.dtype == torch.int32
    b, _, h, d = q.shape
    out = torch.empty_like(q)
    for i in range(b):
        n = int(cache_seqlens[i])
        k = k_cache[i, :n].transpose(0, 1).repeat_interleave(h // k_cache.shape[2], 0)  # [H, n, D]
        v = v_cache[i, :n].transpose(0, 1).repeat_interleave(h // k_cache.shape[2], 0)
        weights = (q[i, 0, :, None] @ k.transpose(1, 2) / d ** 0.5).softmax(-1)  # [H, 1, n]
        out[i, 0] = (weights @ v)[:, 0]
    return out


def test_flash_path_matches_sdpa(tmp_path, monkeypatch):
    """The flash-attn route (layout transposes, lengths) gives the tokens SDPA gives; run on CPU with a stand-in."""
    path = tiny_model_dir(tmp_path, "llama", num_key_value_heads=1)
    prompts = [list(range(3, 80)), list(range(10, 40))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    sdpa = LLM(path, snapkv=SnapKVConfig(budget=32, window=4)).generate(prompt_token_ids=prompts,
                                                                         sampling_params=params)
    calls = []

    def counting_flash(*args, **kwargs):
        calls.append(1)
        return fake_flash_attn_with_kvcache(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_with_kvcache", counting_flash)
    monkeypatch.setattr(attention, "decode_backend", lambda device, needs_position_mask: "flash")
    import engine.cache_views

    monkeypatch.setattr(engine.cache_views, "decode_backend", attention.decode_backend)
    flash = LLM(path, snapkv=SnapKVConfig(budget=32, window=4)).generate(prompt_token_ids=prompts,
                                                                          sampling_params=params)
    assert [o.token_ids for o in flash] == [o.token_ids for o in sdpa]
    assert len(calls) == 15 * 2  # 15 decode steps x 2 layers went through the flash route

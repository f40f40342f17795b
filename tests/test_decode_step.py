"""engine.decode_step / model_runner: the static step compiles with fullgraph once per bucket and never again
across calls of any shape (the CPU stand-in for "capturable as a CUDA graph"), and equals eager token for token;
graphs are captured once per (bucket, sampling mode) when the engine is built and never while serving (a fake
graph on CPU, the real thing on a GPU); the attention backend falls back to SDPA, and the flash-attn plumbing
matches SDPA when a (stand-in) flash-attn is present."""

import pytest
import torch

import engine.decode_step as decode_step
import engine.model_runner as model_runner
import models.attention as attention
from engine import LLM, SamplingParams
from engine.model_runner import batch_bucket, batch_buckets
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir


def test_batch_buckets():
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert batch_bucket(5, 6) == 6


def mixed_calls(llm):
    """generate calls with different prompt lengths, batch sizes, max_tokens and sampling modes."""
    outs = []
    for lengths, new in (((100,), 24), ((137, 20, 64), 9), ((30, 150), 17)):
        prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
        params = [SamplingParams(max_tokens=new + i, ignore_eos=True, temperature=0.8 * (i % 2), seed=i,
                                 top_p=0.9 if i == 2 else 1.0) for i in range(len(prompts))]
        outs += llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.token_ids for o in outs]


def uniform_calls(llm, lengths_per_call, max_tokens):
    """generate calls whose requests share max_tokens and finish together, so each call runs one (bucket, mode)."""
    outs = []
    for lengths, temperature in zip(lengths_per_call, (0.0, 0.8, 0.0)):
        prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature, seed=7)
        outs += llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.token_ids for o in outs]


def test_compiled_step_compiles_once_per_bucket_and_equals_eager(tmp_path):
    """Compilation is the slow part of the suite, so the calls touch three (bucket, mode) steps only: bucket 1
    greedy, bucket 2 sampled, bucket 2 greedy."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    path = tiny_model_dir(tmp_path, "llama")
    cfg = SnapKVConfig(budget=48, window=8)
    eager, compiled = LLM(path, snapkv=cfg, max_batch_size=2), LLM(path, snapkv=cfg, max_batch_size=2, compile=True)
    first = uniform_calls(compiled, ((100,), (137, 20), (30, 150)), 12)
    assert first == uniform_calls(eager, ((100,), (137, 20), (30, 150)), 12)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    assert graphs == 3  # one graph per (bucket, mode): fullgraph, nothing split
    # other prompt lengths and max_tokens: every shape is the engine's fixed one, so nothing new is compiled
    again = uniform_calls(compiled, ((60,), (90, 11), (140, 40)), 20)
    assert again == uniform_calls(eager, ((60,), (90, 11), (140, 40)), 20)
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["ok"] == frames


class FakeGraph:
    """Stands in for a captured CUDA graph on CPU: replay re-runs the captured function into the same output."""
    captures = []

    def __init__(self, fn):
        self.fn, self.out = fn, fn()
        FakeGraph.captures.append(self)

    def replay(self):
        self.out.copy_(self.fn())


def test_graphs_captured_once_per_bucket_and_mode(tmp_path, monkeypatch):
    """The CUDA-graph lifecycle on CPU: one capture per (bucket, sampling mode) when the engine is built, none
    while serving calls of any shape, and replays give the eager tokens."""
    FakeGraph.captures = []

    def fake_capture(fn, pool, warmup=2):
        graph = FakeGraph(fn)
        return graph, graph.out

    monkeypatch.setattr(decode_step, "capture_graph", fake_capture)
    monkeypatch.setattr(model_runner, "graph_capture_supported", lambda device: True)
    monkeypatch.setattr(model_runner, "new_graph_pool", lambda: None)
    path = tiny_model_dir(tmp_path, "mistral", sliding_window=40)
    cfg = SnapKVConfig(budget=48, window=8)
    graphed = LLM(path, snapkv=cfg, max_batch_size=4, cuda_graph=True)
    assert len(FakeGraph.captures) == 3 * 3  # buckets 1, 2, 4 x greedy/sample/filtered
    eager = LLM(path, snapkv=cfg, max_batch_size=4, cuda_graph=False)
    assert len(FakeGraph.captures) == 9  # graphs only when asked for
    assert mixed_calls(graphed) == mixed_calls(eager)
    assert len(FakeGraph.captures) == 9  # never re-captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; the fake-graph and "
                                                          "compiled-step tests are the CPU stand-ins")
def test_cuda_graph_replay_equals_eager(tmp_path):
    path = tiny_model_dir(tmp_path, "mistral", sliding_window=40)
    cfg = SnapKVConfig(budget=48, window=8)
    graphed = LLM(path, device="cuda", snapkv=cfg, max_batch_size=4, cuda_graph=True)
    eager = LLM(path, device="cuda", snapkv=cfg, max_batch_size=4, cuda_graph=False)
    assert mixed_calls(graphed) == mixed_calls(eager)


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


@pytest.mark.parametrize("kv_heads,policy", [(1, "snapkv"), (2, "adakv")])
def test_flash_path_matches_sdpa(tmp_path, monkeypatch, kv_heads, policy):
    """The flash-attn route (layout transposes, one length per (sequence, kv head) row: AdaKV's rows differ)
    gives the tokens SDPA gives; run on CPU with a stand-in."""
    path = tiny_model_dir(tmp_path, "llama", num_key_value_heads=kv_heads)
    prompts = [list(range(3, 80)), list(range(10, 40))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = SnapKVConfig(budget=32, window=4, policy=policy)
    sdpa = LLM(path, snapkv=cfg).generate(prompt_token_ids=prompts, sampling_params=params)
    calls = []

    def counting_flash(*args, **kwargs):
        calls.append(1)
        return fake_flash_attn_with_kvcache(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_with_kvcache", counting_flash)
    import engine.cache_views

    monkeypatch.setattr(engine.cache_views, "decode_backend", lambda device, needs_position_mask: "flash")
    flash = LLM(path, snapkv=cfg).generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in flash] == [o.token_ids for o in sdpa]
    assert len(calls) == 15 * 2  # 15 decode steps x 2 layers went through the flash route

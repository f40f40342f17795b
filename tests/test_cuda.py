"""The CUDA path on a real GPU (skipped without one; `make gpu-check` runs this file first). Graph replay equals eager
decoding token for token at batch 1, 4 and 8, in bf16 and fp16, on Llama (flash-attn when it imports, SDPA's
memory-efficient kernel, the split-KV path) and Mistral (sliding window: SDPA or split-KV), and for a chat
session whose turns re-compress beside one-shot requests; no prefill attention (a session's continued prefill
included) falls back to SDPA's math kernel (it is disabled, so a fallback raises) in any dtype.

SNAPKV_TEST_DEVICE=cpu runs the same tests on CPU (no graphs there: eager against eager), which is how the gpu-
check dry run keeps this file from rotting between GPU sessions.
"""

import os

import pytest
import torch

import fastattn.paths as fast
from engine import LLM, SamplingParams
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir

DEVICE = os.environ.get("SNAPKV_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (tests/test_gpu_readiness.py holds the CPU stand-ins)")
KINDS = {"llama": {}, "mistral": {"sliding_window": 40}}


def engines(path, dtype, flash: bool, monkeypatch):
    """(graphed, eager) engines of 8 slots; the eager one attends over the whole capacity like the graphs do,
    so both run the same kernels on the same shapes and must agree exactly."""
    if not flash:
        monkeypatch.setattr(fast, "flash_attn_with_kvcache", None)
    elif fast.flash_attn_with_kvcache is None:
        pytest.skip("flash-attn does not import here")
    cfg = SnapKVConfig(budget=48, window=8)
    graphed = LLM(path, device=DEVICE, dtype=dtype, snapkv=cfg, max_batch_size=8, cuda_graph=True)
    eager = LLM(path, device=DEVICE, dtype=dtype, snapkv=cfg, max_batch_size=8, cuda_graph=False)
    eager.runner.static = True
    return graphed, eager


@pytest.mark.parametrize("flash", [False, True, "split"], ids=["sdpa", "flash-attn", "split-kv"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_graph_replay_equals_eager(tmp_path, monkeypatch, kind, dtype, flash):
    path = tiny_model_dir(tmp_path, kind, **KINDS[kind])
    split = flash == "split"
    if split:
        monkeypatch.setattr(fast, "CUDA_DECODE", "split")
        flash = False
    graphed, eager = engines(path, dtype, flash and kind == "llama", monkeypatch)
    if DEVICE == "cuda":
        expected = "split" if split else "flash" if flash and kind == "llama" else "auto"
        assert graphed.runner.steps[8].view.backend == expected
        assert graphed.runner.graphed and len(graphed.runner.runners) == 4 * 3  # buckets 1, 2, 4, 8 x modes
    for batch in (1, 4, 8):  # requests of one call finish together: each call runs one bucket
        prompts = [torch.randint(3, 256, (60 + 17 * i,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(batch)]
        for params in (SamplingParams(max_tokens=20, ignore_eos=True),
                       SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)):
            a = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
            b = eager.generate(prompt_token_ids=prompts, sampling_params=params)
            assert [o.token_ids for o in a] == [o.token_ids for o in b], (batch, params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_never_needs_the_math_kernel(tmp_path, kind, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    path = tiny_model_dir(tmp_path, kind, **KINDS[kind])
    llm = LLM(path, device=DEVICE, dtype=dtype, snapkv=SnapKVConfig(budget=48, window=8), prefill_chunk_size=64,
              cuda_graph=False)
    prompt = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reference = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    if DEVICE == "cuda":
        with sdpa_kernel(fused):  # a math fallback would raise here
            out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
        assert out.error is None and out.token_ids == reference.token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_split_decode_attention_on_device(dtype):
    """The split-KV decode path on the device, against float32 SDPA: 3000 entries (splits and a remainder),
    rows of different lengths."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 4, 128, generator=g)
    k, v = torch.randn(2, 2, 8, 3000, 128, generator=g)
    valid = torch.arange(3000) < torch.randint(1, 3000, (2, 8, 1), generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :])
    got = fast.split_decode_attention(*(x.to(DEVICE, dtype) for x in (q, k, v)), valid.to(DEVICE))
    assert (got.float().cpu() - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_session_graph_replay_equals_eager(tmp_path, monkeypatch, dtype):
    """A conversation whose turns re-compress, next to one-shot requests in other slots, gives the same tokens
    replayed from graphs as decoded eagerly; its continued prefills never need SDPA's math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    path = tiny_model_dir(tmp_path, "llama", vocab_size=49152, max_position_embeddings=2048)
    monkeypatch.setattr(fast, "flash_attn_with_kvcache", None)
    cfg = SnapKVConfig(budget=40, window=8, kernel=3)
    graphed = LLM(path, device=DEVICE, dtype=dtype, snapkv=cfg, max_batch_size=4, max_kv_len=96, cuda_graph=True)
    eager = LLM(path, device=DEVICE, dtype=dtype, snapkv=cfg, max_batch_size=4, max_kv_len=96, cuda_graph=False)
    eager.runner.static = True
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    other = [torch.randint(3, 256, (50,), generator=torch.Generator().manual_seed(7)).tolist()]
    turns = ["A first message that is long enough to be compressed at once, it goes on and on.", "Second?",
             "Third, please.", "Fourth and last."]
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    answers = []
    for llm in (graphed, eager):
        with llm.chat_session(reserve=8) as chat, sdpa_kernel(fused) if DEVICE == "cuda" else torch.no_grad():
            answers.append([])
            for text in turns:
                rid = llm.add_request(prompt_token_ids=other[0], sampling_params=params)  # shares the steps
                answers[-1].append(chat.send(text, params).token_ids)
                while llm.has_unfinished():
                    llm.step()
                assert llm.scheduler.find(rid) is None
            assert sum(t["compressed"] for t in chat.turns) >= 2
    assert answers[0] == answers[1]


@pytest.mark.parametrize("weights_dtype,kv_dtype", [("int4", "int8"), ("int8", "auto")])
def test_quantized_graph_replay_equals_eager(tmp_path, monkeypatch, weights_dtype, kv_dtype):
    """int4/int8 weights (the int4pack / int8pack kernels) and the int8 KV cache: graphs equal eager at batch 1-8."""
    path = tiny_model_dir(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    monkeypatch.setattr(fast, "flash_attn_with_kvcache", None)
    cfg = SnapKVConfig(budget=48, window=8)
    kwargs = dict(device=DEVICE, dtype="bfloat16", snapkv=cfg, max_batch_size=8, weights_dtype=weights_dtype,
                  kv_dtype=kv_dtype)
    graphed, eager = LLM(path, cuda_graph=True, **kwargs), LLM(path, cuda_graph=False, **kwargs)
    eager.runner.static = True
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (90, 20, 130, 64, 75)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    a = [o.token_ids for o in graphed.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert a == [o.token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=params)]


def test_quantized_linears_on_device():
    from quant.layers import Int4Linear, Int8GroupLinear, Int8Linear
    from quant.weights import Int8Weight, quantize_int4, quantize_int8
    from tests.test_quantized import assert_bf16_close, kernel_reference

    w, x = torch.randn(96, 256), torch.randn(5, 256)
    for module, weight in ((Int8Linear, quantize_int8(w)), (Int4Linear, quantize_int4(w)),
                           (Int8GroupLinear, Int8Weight(torch.randint(-127, 128, (96, 256), dtype=torch.int8),
                                                        torch.rand(96, 8) + 0.1))):
        out = module(weight, DEVICE)(x.to(DEVICE, torch.bfloat16))
        assert_bf16_close(out.float().cpu(), kernel_reference(x, weight))

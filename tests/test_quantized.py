"""Quantized weights and the int8 KV cache (gguf is imported inside the tests that need it: tests/test_cuda.py
imports this file's references on a GPU machine that may lack it): the quantized linears equal a
dequantize-then-matmul reference, GGUF Q8_0/Q4_0/Q4_1 blocks repack to exactly the values `gguf` dequantizes them
to, int8 KV logits stay near float KV logits over a generation, and the bytes the stats report equal the
formula."""

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.cache_views import DecodeView, PrefillView
from engine.kv_cache import KVCache, KVCacheTooLarge
from formats.gguf import read_blocks
from formats.loader import load_model
from models.llama import weight_bytes
from quant.kv_int8 import Int8KVCache, dequantize_entries, quantize_entries
from quant.layers import KERNEL_DTYPE, Int4Linear, Int8GroupLinear, Int8Linear
from quant.weights import Int4Weight, Int8Weight, int8_as_int4_planes, quantize_int4, quantize_int8
from snapkv import SnapKVConfig
from snapkv.policies import make_policy
from tests.conftest import tiny_hf_model, tiny_model_dir, write_gguf

torch.manual_seed(0)


def kernel_reference(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ W.T in float64 from the weight as the kernel holds it: bfloat16 activations and scales (and zeros)."""
    rounded = lambda t: t.to(KERNEL_DTYPE).double()
    n, k = weight.q.shape
    if isinstance(weight, Int4Weight):
        q = weight.q.view(n, -1, weight.group).double() - 8
        w = q * rounded(weight.scale)[..., None] + rounded(weight.zero)[..., None]
    else:
        w = weight.q.view(n, -1, weight.group).double() * rounded(weight.scale)[..., None]
    return rounded(x) @ w.view(n, k).T


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The kernels return bfloat16: within a few bf16 roundings of the reference, relative to the output scale."""
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item(), err


@pytest.mark.parametrize("m", [1, 5, 64])
def test_int8_linear_equals_dequantize_then_matmul(m):
    w, x = torch.randn(96, 128), torch.randn(m, 128)
    weight = quantize_int8(w)
    assert_bf16_close(Int8Linear(weight)(x), kernel_reference(x, weight))
    # quantization error: at most half a step of each row's scale
    assert ((weight.dequantize() - w).abs() <= weight.scale / 2 + 1e-6).all()


@pytest.mark.parametrize("m", [1, 5, 64])
def test_int4_linear_equals_dequantize_then_matmul(m):
    w, x = torch.randn(96, 256), torch.randn(m, 256)
    weight = quantize_int4(w, group=32)
    out = Int4Linear(weight)(x)
    assert out.shape == (m, 96) and out.dtype == torch.float32
    assert_bf16_close(out, kernel_reference(x, weight))
    step = weight.scale.repeat_interleave(32, dim=1)
    assert ((weight.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_group_int8_runs_exactly_as_two_int4_planes():
    q = torch.randint(-128, 128, (64, 128), dtype=torch.int8)
    weight = Int8Weight(q, torch.rand(64, 4) + 0.1)
    hi, lo = int8_as_int4_planes(weight)
    assert int(hi.q.max()) <= 15 and int(lo.q.max()) <= 15
    exact = torch.float64  # every value here is exact in float64: the planes hold the int8 weight with no loss
    assert torch.equal(hi.dequantize(exact) + lo.dequantize(exact), weight.dequantize(exact))
    x = torch.randn(3, 128)
    assert_bf16_close(Int8GroupLinear(weight)(x), kernel_reference(x, weight))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repack_without_loss(kind):
    """Random blocks written by gguf's own quantizer: our int8/int4 weight dequantizes to exactly gguf's values."""
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(1).standard_normal((48, 256)).astype(np.float32) * 0.05
    w[0, :32] += 3.0  # a block far from zero: Q4_1's m + 8 d must stay exact there too
    raw = quantize(w, qtype)
    expected = np.array(dequantize(raw, qtype), dtype=np.float32).reshape(w.shape)
    weight = read_blocks(kind, raw, 48)
    assert isinstance(weight, Int8Weight if kind == "Q8_0" else Int4Weight) and weight.group == 32
    assert torch.equal(weight.dequantize(), torch.from_numpy(expected))


def test_smollm2_gguf_tensors_repack_without_loss(smol_gguf):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(smol_gguf)
    names = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_1", "blk.29.ffn_down.weight": "Q4_1"}
    for t in reader.tensors:
        if t.name in names:
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            assert kind == names[t.name]
            shape = tuple(int(n) for n in reversed(t.shape))
            expected = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            assert torch.equal(read_blocks(kind, t.data, shape[0]).dequantize(), torch.from_numpy(expected)), t.name


def test_gguf_keeps_its_quantization_and_matches_the_dequantized_model(tmp_path):
    """A Q4_1 GGUF (Q8_0 embedding) loads as int4/int8 modules, un-permuted like float weights: its logits
    equal the float32-dequantized model's within bf16 activation rounding."""
    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", hf,
                      qtype_for=lambda name: "Q8_0" if "embed" in name else "Q4_1")
    quantized, dense = load_model(path, weights_dtype="auto"), load_model(path)
    attn = quantized.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Int4Linear) and isinstance(quantized.lm_head, Int8GroupLinear)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        a, b = quantized(ids), dense(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    assert weight_bytes(quantized) < weight_bytes(dense) / 3


@pytest.mark.parametrize("weights_dtype,correlation,agreement", [("bfloat16", 0.9995, 0.9), ("int8", 0.998, 0.75),
                                                                   ("int4", 0.9, None)])
def test_weights_dtype_stays_near_float32(tmp_path, weights_dtype, correlation, agreement):
    """A tiny random model (Gaussian weights: int4's worst case) quantized at load: its logits correlate with the
    float32 model's; the engine generates with it and (bfloat16, int8) mostly the same greedy tokens."""
    path = tiny_model_dir(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2)
    ref, llm = LLM(path, max_batch_size=2), LLM(path, max_batch_size=2, weights_dtype=weights_dtype)
    ids = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref.model(ids).flatten(), llm.model(ids).flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] >= correlation
    assert llm.weight_bytes < ref.weight_bytes / {"int8": 3, "int4": 4.5, "bfloat16": 1.9}[weights_dtype]
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (50, 70)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a = [o.token_ids for o in ref.generate(prompt_token_ids=prompts, sampling_params=params)]
    b = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert all(len(t) == 8 for t in b)
    if agreement is not None:
        assert sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) / 16 >= agreement, (a, b)


def test_embedding_and_lm_head_formats():
    """int4 leaves the embedding/lm_head int8 on CPU and in the model's dtype on CUDA (no fast int8 kernel there);
    a GGUF's Q8_0 head keeps its blocks everywhere (it runs as int4 planes)."""
    from quant.store import target as _target

    w, q8 = torch.zeros(64, 64), Int8Weight(torch.zeros(64, 64, dtype=torch.int8), torch.ones(64, 2))
    assert _target("lm_head.weight", "int4", w, on_cpu=True) == "int8"
    assert _target("lm_head.weight", "int4", w, on_cpu=False) is None
    assert _target("model.layers.0.mlp.up_proj.weight", "int4", w, on_cpu=False) == "int4"
    assert _target("model.embed_tokens.weight", "auto", q8, on_cpu=False) == "int8"
    assert _target("model.embed_tokens.weight", "auto", quantize_int4(w), on_cpu=False) is None
    assert _target("model.norm.weight", "int4", torch.zeros(64)) is None


def test_bad_dtypes_are_refused(tmp_path):
    path = tiny_model_dir(tmp_path, "llama")
    with pytest.raises(ValueError, match="unsupported weights dtype 'int3'"):
        LLM(path, weights_dtype="int3")
    with pytest.raises(ValueError, match="unsupported kv dtype 'int4'"):
        LLM(path, kv_dtype="int4")


def test_int8_entries_round_trip():
    x = torch.randn(2, 3, 7, 64) * torch.rand(2, 3, 7, 1) * 10
    q, scale = quantize_entries(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 7)
    assert ((dequantize_entries(q, scale, torch.float32) - x).abs() <= scale[..., None] / 2 + 1e-6).all()


def forced_logits(model, cache: KVCache, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Logits of the prompt's last position and of each forced token's decode step, through the cache views."""
    view = PrefillView(cache, 0, make_policy(SnapKVConfig(budget=96, window=16), model.config.num_layers))
    with torch.inference_mode():
        logits = [model(torch.tensor([prompt]), ctx=view, last_only=True)[0, -1]]
        positions = torch.tensor([len(prompt)])
        decode = DecodeView(cache, positions, None)
        for token in forced:
            decode.span = int(cache.lengths.max()) + 1
            logits.append(model.decode(torch.tensor([token]), positions, decode)[0])
            cache.advance(torch.ones(1, dtype=torch.long))
            positions += 1
    return torch.stack(logits)


def test_int8_kv_logits_stay_near_float_kv(smol_dir):
    """SmolLM2, SnapKV at budget 96 over a 300-token prompt, 24 forced decode steps: every step's logits within
    0.35 (max abs; logits span ~30) and the same top-1 token at 23 of 25 positions or more."""
    model = load_model(smol_dir)
    cfg = model.config
    prompt = torch.randint(100, 20000, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    forced = torch.randint(100, 20000, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    make = lambda int8: (Int8KVCache if int8 else KVCache)(cfg.num_layers, 1, cfg.num_kv_heads, 128, cfg.head_dim)
    ref, quant = forced_logits(model, make(False), prompt, forced), forced_logits(model, make(True), prompt, forced)
    assert (quant - ref).abs().max() <= 0.35
    assert (quant.argmax(-1) == ref.argmax(-1)).sum() >= 23


def test_int8_cache_bytes_equal_the_formula(tmp_path):
    cache = Int8KVCache(num_layers=3, slots=2, num_kv_heads=4, capacity=10, head_dim=16)
    assert cache.nbytes == 3 * 2 * 4 * 10 * 2 * (16 + 4)  # int8 K and V + one float32 scale each
    assert cache.prefix(1).k_scale.shape == (3, 1, 4, 10)
    with pytest.raises(KVCacheTooLarge, match=r"needs 39\.34 TiB"):  # the memory check counts int8 bytes too
        Int8KVCache(num_layers=32, slots=64, num_kv_heads=8, capacity=10_000_000, head_dim=128)

    path = tiny_model_dir(tmp_path, "llama")
    llm = LLM(path, snapkv=SnapKVConfig(budget=40, window=8), max_batch_size=1, kv_dtype="int8")
    cfg = llm.config
    out = llm.generate(prompt_token_ids=[list(range(3, 120))], sampling_params=SamplingParams(max_tokens=6,
                                                                                              ignore_eos=True))[0]
    s = out.stats
    per_token = cfg.num_layers * cfg.num_kv_heads * 2 * (cfg.head_dim + 4)
    assert s["kv_dtype"] == "int8" and s["kept_tokens"] == 40
    assert s["kv_bytes"] == (40 + 6) * per_token
    assert s["full_kv_bytes"] == (117 + 6) * cfg.num_layers * cfg.num_kv_heads * 2 * cfg.head_dim * 4
    assert llm.runner.cache.nbytes == llm.runner.capacity * per_token

"""CPU stand-ins for the CUDA path (tests/test_cuda.py and `make gpu-check` run the real thing on a GPU).

"CUDA-like" settings make the CPU look like an sm90 (or older) GPU to the engine's kernel choices
(models.attention.FUSED_DEVICE_TYPES and device_capability), so that the real backend choice runs:
- flash-attn is reached only through `decode_backend`, by a fake that asserts fp16/bf16 as the real one does, and
  compiles with fullgraph through its registered op;
- every prefill SDPA call is classified by PyTorch's CUDA dispatch rules, and none may land on the math kernel;
- free memory counts the allocator's cached blocks, graphs are captured on the cache's device, `--dtype auto`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

import engine.decode_step as decode_step
import fastattn.paths as fast
import models.attention as attention
from engine import LLM, SamplingParams
from engine.kv_cache import available_memory_bytes
from engine.config import resolve_dtype
from engine.memory_model import predict_prefill_peak
from models.config import ModelConfig
from formats.loader import load_model
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir


@pytest.fixture
def cuda_like(monkeypatch):
    """Let the CPU stand in for a CUDA device of a given compute capability; returns a setter for it."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(attention, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "device_capability", lambda device: capability["value"])
    return lambda cap: capability.update(value=cap)


def fake_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens):
    """flash-attn's documented semantics in plain torch, with its input checks: fp16/bf16 only, caches
    [B, C, Hkv, D] with the last dim contiguous, int32 cache_seqlens [B]; q [B, 1, H, D] -> [B, 1, H, D]."""
    assert q.dtype in (torch.float16, torch.bfloat16), f"FlashAttention only supports fp16 and bf16 (got {q.dtype})"
    assert k_cache.dtype == q.dtype and k_cache.stride(-1) == 1 and cache_seqlens.dtype == torch.int32
    b, _, h, d = q.shape
    out = torch.empty_like(q)
    for i in range(b):
        n = int(cache_seqlens[i])
        k = k_cache[i, :n].transpose(0, 1).float().repeat_interleave(h // k_cache.shape[2], 0)  # [H, n, D]
        v = v_cache[i, :n].transpose(0, 1).float().repeat_interleave(h // k_cache.shape[2], 0)
        weights = (q[i, 0, :, None].float() @ k.transpose(1, 2) / d ** 0.5).softmax(-1)  # [H, 1, n]
        out[i, 0] = (weights @ v)[:, 0].to(q.dtype)
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return fake_flash_attn_with_kvcache(*args, **kwargs)

    monkeypatch.setattr(fast, "flash_attn_with_kvcache", counting)
    return calls


def test_backend_choice(monkeypatch, cuda_like):
    cuda = torch.device("cuda")
    monkeypatch.setattr(fast, "flash_attn_with_kvcache", None)
    assert attention.decode_backend(cuda, torch.bfloat16, needs_position_mask=False) == "auto"
    monkeypatch.setattr(fast, "flash_attn_with_kvcache", lambda *a, **k: None)
    assert attention.decode_backend(cuda, torch.bfloat16, needs_position_mask=False) == "flash"
    assert attention.decode_backend(cuda, torch.float16, needs_position_mask=False) == "flash"
    assert attention.decode_backend(cuda, torch.float32, needs_position_mask=False) == "auto"  # flash-attn: no fp32
    assert attention.decode_backend(cuda, torch.bfloat16, needs_position_mask=True) == "auto"  # sliding window
    monkeypatch.setattr(fast, "CUDA_DECODE", "split")
    assert attention.decode_backend(cuda, torch.bfloat16, needs_position_mask=True) == "split"
    cuda_like((7, 5))  # Turing: flash-attn 2 needs sm80+
    assert attention.decode_backend(cuda, torch.float16, needs_position_mask=False) == "split"
    monkeypatch.setattr(attention, "FUSED_DEVICE_TYPES", ("cuda",))
    assert attention.decode_backend(torch.device("cpu"), torch.bfloat16, needs_position_mask=False) == "sdpa"


@pytest.mark.parametrize("kv_heads,policy", [(1, "snapkv"), (2, "adakv")])
def test_flash_route_through_the_real_backend_choice(tmp_path, cuda_like, fake_flash, kv_heads, policy):
    """Half-precision engines reach (fake) flash-attn through decode_backend, and its tokens equal SDPA's (layout
    transposes, one length per (sequence, kv head) row: AdaKV's rows differ; fp16, whose rounding leaves greedy
    tokens alone over 16 steps where bf16's does not); a float32 engine never calls it."""
    path = tiny_model_dir(tmp_path, "llama", num_key_value_heads=kv_heads)
    prompts = [list(range(3, 80)), list(range(10, 40))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = SnapKVConfig(budget=32, window=4, policy=policy)
    flash = LLM(path, snapkv=cfg, dtype="float16")
    assert flash.runner.steps[2].view.backend == "flash"
    flash_tokens = [o.token_ids for o in flash.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert fake_flash == [torch.float16] * 15 * 2  # 15 decode steps x 2 layers, all in fp16
    fp32 = LLM(path, snapkv=cfg, dtype="float32")
    assert fp32.runner.steps[2].view.backend == "auto"
    fp32.generate(prompt_token_ids=prompts, sampling_params=params)
    assert len(fake_flash) == 30  # float32 never reached flash-attn
    fast.flash_attn_with_kvcache = None  # (restored by the fixture) the same fp16 engine on SDPA
    sdpa = LLM(path, snapkv=cfg, dtype="float16")
    assert sdpa.runner.steps[2].view.backend == "auto"
    assert [o.token_ids for o in sdpa.generate(prompt_token_ids=prompts, sampling_params=params)] == flash_tokens


@pytest.mark.parametrize("entries", [40, 256, 700, 1300])  # under one split, exactly one, splits + a remainder
def test_split_decode_attention_equals_sdpa(entries):
    """The split-KV path gives SDPA's result, per-row masks included: rows of different lengths, a hole in the
    middle (a sliding window), and splits where nothing is visible."""
    g = torch.Generator().manual_seed(entries)
    b, hkv, group, d = 3, 2, 4, 32
    q = torch.randn(b, hkv, group, d, generator=g)
    k, v = torch.randn(2, b, hkv, entries, d, generator=g)
    valid = torch.arange(entries) < torch.tensor([[entries, entries // 3], [1, entries // 2], [entries, 7]])[..., None]
    valid[0, 0, entries // 4: entries // 2] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :])
    assert (fast.split_decode_attention(q, k, v, valid) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", {"sliding_window": 40})])
def test_split_route_tokens_equal_sdpa(tmp_path, monkeypatch, cuda_like, kind, overrides):
    """On "CUDA" with the split-KV decode path chosen, every decode attention goes through it, token for token as
    SDPA; "auto" (the default) takes it exactly when the attended span reaches SPLIT_FROM."""
    monkeypatch.setattr(fast, "SPLIT_LENGTH", 32)  # several splits on a tiny cache
    monkeypatch.setattr(fast, "CUDA_DECODE", "sdpa")
    path = tiny_model_dir(tmp_path, kind, **overrides)
    prompts = [list(range(3, 150)), list(range(10, 40))]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    cfg = SnapKVConfig(budget=64, window=8)
    sdpa = LLM(path, snapkv=cfg)
    assert sdpa.runner.steps[2].view.backend == "sdpa"
    expected = [o.token_ids for o in sdpa.generate(prompt_token_ids=prompts, sampling_params=params)]
    monkeypatch.setattr(fast, "CUDA_DECODE", "split")
    split = LLM(path, snapkv=cfg)
    assert split.runner.steps[2].view.backend == "split"
    calls = []
    real = fast.split_decode_attention
    monkeypatch.setattr(fast, "split_decode_attention", lambda *a: calls.append(1) or real(*a))
    assert [o.token_ids for o in split.generate(prompt_token_ids=prompts, sampling_params=params)] == expected
    assert len(calls) == 39 * 2  # 39 decode steps x 2 layers
    monkeypatch.setattr(fast, "CUDA_DECODE", "auto")
    for split_from, routed in ((10**9, 0), (1, 39 * 2)):
        monkeypatch.setattr(fast, "SPLIT_FROM", split_from)
        calls.clear()
        auto = LLM(path, snapkv=cfg)
        assert [o.token_ids for o in auto.generate(prompt_token_ids=prompts, sampling_params=params)] == expected
        assert len(calls) == routed


def test_flash_route_compiles_with_fullgraph(tmp_path, cuda_like, fake_flash):
    """flash-attn is reached through a registered op, so the compiled step stays one graph (a plain call into
    the extension would break it) and gives the eager tokens."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    path = tiny_model_dir(tmp_path, "llama")
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompt = [list(range(3, 60))]
    cfg = SnapKVConfig(budget=24, window=4)
    eager = LLM(path, snapkv=cfg, dtype="bfloat16", max_batch_size=1).generate(prompt_token_ids=prompt,
                                                                                sampling_params=params)
    compiled = LLM(path, snapkv=cfg, dtype="bfloat16", max_batch_size=1, compile=True)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert compiled.generate(prompt_token_ids=prompt, sampling_params=params)[0].token_ids == eager[0].token_ids
    assert counters["stats"]["unique_graphs"] == graphs + 1 and sum(counters["graph_break"].values()) == breaks
    assert len(fake_flash) >= 2 * 9  # the eager run's 9 steps x 2 layers, plus the compiled run's


def cuda_kernel(q, k, attn_mask, enable_gqa, capability) -> str:
    """Which kernel PyTorch's CUDA SDPA dispatch would run (torch 2.x rules): flash takes fp16/bf16 on sm80+, GQA
    and causal (upper-left, or lower-right through CausalBias) but no mask tensor; memory-efficient takes any mask
    and float32 but not GQA; everything else falls back to math, which builds fp32 scores [B, H, T, S]."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and capability >= (8, 0) and (attn_mask is None or isinstance(attn_mask, CausalBias)) \
            and q.shape[-1] <= 256:
        return "flash"
    if capability >= (5, 0) and not (enable_gqa and q.shape[1] != k.shape[1]):
        return "efficient"
    return "math"


@pytest.mark.parametrize("dtype,capability", [(torch.bfloat16, (9, 0)), (torch.float32, (9, 0)),
                                              (torch.float16, (7, 5))])
@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", {"sliding_window": 20})])
def test_no_prefill_call_falls_back_to_math(tmp_path, monkeypatch, cuda_like, dtype, capability, kind, overrides):
    """Under CUDA-like settings no prefill attention call would run SDPA's math kernel, the logits equal the
    plain path's, and the repeated K/V and masks the calls really got fit the memory model's terms."""
    path = tiny_model_dir(tmp_path, kind, **overrides)
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    reference_model = load_model(path, dtype)
    with torch.no_grad():
        reference = reference_model(ids, chunk_size=32).float()
    cuda_like(capability)
    model = load_model(path, dtype)
    original, seen, depth = F.scaled_dot_product_attention, [], [0]

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if depth[0] == 0:  # CausalBias calls SDPA again from inside: classify the outermost call only
            built = isinstance(attn_mask, torch.Tensor) and not isinstance(attn_mask, CausalBias)  # CausalBias: lazy
            mask_bytes = attn_mask.nbytes if built else 0
            seen.append((cuda_kernel(q, k, attn_mask, enable_gqa, capability), k.shape[1], k.nbytes + v.nbytes,
                         mask_bytes))
        depth[0] += 1
        try:
            if isinstance(attn_mask, CausalBias):  # its __torch_function__ only recognizes the unpatched function
                return CausalBias._dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        logits = model(ids, chunk_size=32).float()
    assert len(seen) == 3 * model.config.num_layers  # 96 tokens in chunks of 32
    assert "math" not in {kernel for kernel, *_ in seen}, seen
    assert (logits - reference).abs().max().item() < (1e-5 if dtype == torch.float32 else 0.05)
    cfg, e = model.config, dtype.itemsize
    repeats = attention.prefill_repeats_kv(torch.device("cpu"), dtype, cfg.sliding_window)
    assert repeats == (kind == "mistral" or dtype == torch.float32 or capability < (8, 0))
    parts = predict_prefill_peak(cfg, 96, e, 32, device_type="cuda", repeat_kv=repeats).parts
    repeated = [kv for _, heads, kv, _ in seen if heads == cfg.num_heads]
    assert bool(repeated) == repeats and max(repeated, default=0) <= parts["repeated K/V"]
    assert max(mask for *_, mask in seen) <= parts["attention mask"]


def test_mistral_7b_32k_prediction_counts_the_window_mask():
    """The review's case: Mistral-7B at 32K tokens on CUDA in bf16. One chunk with a math fallback would build
    4 GiB of fp32 scores; the fused path instead needs the repeated K/V and the window's mask, both counted."""
    cfg = ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=32000, sliding_window=4096, max_position_embeddings=32768)
    parts = predict_prefill_peak(cfg, 32768, 2, 4096, window=32, device_type="cuda", repeat_kv=True).parts
    keys = 4096 + 4096
    assert parts["repeated K/V"] == 2 * keys * 32 * 128 * 2  # 128 MiB
    assert parts["attention mask"] == 4096 * keys * 5
    assert parts["repeated K/V"] + parts["attention mask"] < 4096 * keys * 32 * 4 / 10  # vs the fp32 scores


def test_free_memory_counts_the_allocators_cached_blocks(monkeypatch):
    """After a prefill the allocator keeps its peak cached; mem_get_info counts that as used. Free memory for
    the admission check is the driver's free bytes plus reserved-but-unallocated ones."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    assert available_memory_bytes(torch.device("cuda:0")) == 5 * 2**30


def test_graphs_captured_and_replayed_on_the_cache_device(monkeypatch):
    """A cache on cuda:1 while cuda:0 is current: the side stream, the warm-up, the capture and every replay
    all happen with cuda:1 current."""
    events, current = [], ["cuda:0"]

    class Device:
        def __init__(self, device):
            self.device = str(device)

        def __enter__(self):
            self.previous, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.previous

    class Stream:
        def __init__(self, device=None):
            events.append(("stream", str(device), current[0]))

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            events.append(("replay", current[0]))

    class Capture:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            events.append(("capture", current[0]))

        def __exit__(self, *exc):
            pass

    cuda = torch.cuda
    for name, fake in (("device", Device), ("Stream", Stream), ("current_stream", lambda device=None: Stream(device)),
                       ("stream", lambda s: Device(current[0])), ("CUDAGraph", Graph), ("graph", Capture)):
        monkeypatch.setattr(cuda, name, fake)
    step = decode_step.GraphedStep(lambda span: events.append(("run", current[0])) or torch.zeros(1), 8, None,
                                   torch.device("cuda:1"))
    step(8)
    assert ("stream", "cuda:1", "cuda:1") in events and ("capture", "cuda:1") in events
    assert all(e[-1] == "cuda:1" for e in events if e[0] in ("run", "capture", "replay")), events
    assert events[-1] == ("replay", "cuda:1") and current[0] == "cuda:0"


def test_dtype_auto(monkeypatch, tmp_path):
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a T4
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16 and resolve_dtype("int3", "cpu") is None
    assert LLM(tiny_model_dir(tmp_path, "llama")).dtype is torch.float32  # the default is auto
    with pytest.raises(ValueError, match="unsupported dtype 'int3'; use one of auto, float32, bfloat16, float16"):
        LLM(tmp_path, dtype="int3")

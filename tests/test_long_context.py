"""Long-context prefill: layer-major chunked prefill equals the unchunked one (logits and SnapKV selections), its
measured peak memory stays under the memory model's prediction, impossible requests are refused up front, and
prompts past the trained length need an explicit opt-in."""

import pytest
import torch

import engine.llm as llm_module
from engine import LLM, SamplingParams
from engine.memory_model import predict_generation_peak
from models.loader import load_model
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


def test_smollm2_32k_prompt_peak_memory(smol_dir):
    """32,768 tokens, budget 1024: the full float32 cache alone would be 1.4 GiB (46,080 bytes a token)."""
    llm = LLM(smol_dir, snapkv=SnapKVConfig(budget=1024, window=16), allow_longer_context=True)
    words = (SMOL_DIR.parents[1] / "examples" / "long_prompt.txt").read_text()
    ids = (llm.tokenizer.encode(words) * 13)[:32768]
    # the weights are memory-mapped: a first short call pages them in, so they do not count as prefill growth
    llm.generate(prompt_token_ids=[ids[:64]], sampling_params=SamplingParams(max_tokens=1))
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    stats = out.stats
    assert stats["prompt_tokens"] == 32768 and stats["kept_tokens"] == 1024
    assert 32768 * 46080 > 1.4 * 2**30
    assert stats["measured_peak_bytes"] is not None
    assert stats["measured_peak_bytes"] < stats["predicted_peak_bytes"], stats
    assert stats["measured_peak_bytes"] < 512 * 2**20, stats


def test_refusal_before_starting(smol_dir, monkeypatch):
    llm = LLM(smol_dir, allow_longer_context=True)
    monkeypatch.setattr(llm_module, "available_memory_bytes", lambda device: 300 * 2**20)
    with pytest.raises(ValueError, match=r"a 20000-token prompt needs about .* beyond the weights \(KV cache "
                                         r".* is free on cpu; about \d+ tokens would fit"):
        llm.generate(prompt_token_ids=[[5] * 20000], sampling_params=SamplingParams(max_tokens=4))


def test_prediction_grows_as_documented():
    from models.config import ModelConfig

    cfg = ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256)
    # the 8B Llama-3 shape at 512K tokens on a GPU, bf16: SnapKV fits next to 16 GB of weights, the full cache not
    snap = predict_generation_peak(cfg, 512 * 1024, 2048 + 256, 1, 2, 8192, window=32, device_type="cuda")
    full = predict_generation_peak(cfg, 512 * 1024, 512 * 1024 + 256, 1, 2, 8192, device_type="cuda")
    on_cpu = predict_generation_peak(cfg, 512 * 1024, 2048 + 256, 1, 2, 8192, window=32, device_type="cpu")
    assert on_cpu.parts["attention mask"] == 8192 * 512 * 1024 * 9 and snap.parts["attention mask"] == 0
    assert snap.parts["KV cache"] == (2048 + 256) * 32 * 2 * 8 * 128 * 2
    assert full.parts["KV cache"] == (512 * 1024 + 256) * 65536 * 2  # 64 GiB: the full cache alone
    assert snap.total < 16 * 2**30 < full.total


def test_longer_than_trained_needs_opt_in(tmp_path):
    path = tiny_model_dir(tmp_path, "llama", max_position_embeddings=64)
    prompt = list(range(3, 103))
    with pytest.raises(ValueError, match=r"at most 64 positions; shorten the prompt or allow longer contexts"):
        LLM(path).generate(prompt_token_ids=[prompt])
    out = LLM(path, allow_longer_context=True).generate(prompt_token_ids=[prompt],
                                                        sampling_params=SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5

"""engine.LLM: greedy generation token-identical to HF transformers `generate`, batching that changes nothing,
streaming, stop strings and the statistics each output carries."""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import SMOL_DIR, tiny_hf_model, tiny_model_dir

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "List three uses of a paperclip, one per line."]


@pytest.fixture(scope="module")
def smol(smol_dir):
    return LLM(smol_dir)


@pytest.fixture(scope="module")
def hf_smol(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smol_dir))


def hf_greedy(model, ids: list[int], n: int, eos=True) -> list[int]:
    x = torch.tensor([ids])
    kwargs = {} if eos else {"eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def test_smollm2_chat_greedy_matches_transformers(smol, hf_smol):
    hf, tok = hf_smol
    outs = smol.generate(CHAT_PROMPTS, SamplingParams(max_tokens=64), chat=True)
    for prompt, out in zip(CHAT_PROMPTS, outs):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        assert out.prompt_token_ids == list(ids)
        assert out.token_ids == hf_greedy(hf, list(ids), 64)
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert {o.finish_reason for o in outs} <= {"stop", "length"}


def test_smollm2_long_greedy_without_eos(smol, hf_smol):
    """64 tokens past any eos, on a 600-token prompt: exercises decode over a real-sized cache."""
    hf, _ = hf_smol
    ids = smol.tokenizer.encode((SMOL_DIR.parents[1] / "examples" / "long_prompt.txt").read_text())[:600]
    out = smol.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=64, ignore_eos=True))[0]
    assert len(out.token_ids) == 64 and out.finish_reason == "length"
    assert out.token_ids == hf_greedy(hf, ids, 64, eos=False)


def tiny_llm(tmp_path, kind, **overrides):
    llm = LLM(tiny_model_dir(tmp_path, kind, **overrides), max_batch_size=4)
    return tiny_hf_model(kind, vocab_size=256, **overrides), llm  # the same seeded random weights


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 1}),
                                            ("mistral", {"sliding_window": 24})])
def test_tiny_models_match_transformers(tmp_path, smol_dir, kind, overrides):
    hf, llm = tiny_llm(tmp_path, kind, **overrides)
    torch.manual_seed(3)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (40, 57)]  # longer than the sliding window
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=48, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, ids, 48, eos=False)


def test_batch_equals_alone(tmp_path, smol_dir):
    _, llm = tiny_llm(tmp_path, "mistral", sliding_window=32)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 61, 23, 40)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (30, 12, 45, 1)]
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for ids, p, out in zip(prompts, params, together):
        alone = llm.generate(prompt_token_ids=[ids], sampling_params=p)[0]
        assert out.token_ids == alone.token_ids and len(out.token_ids) == p.max_tokens


def test_more_prompts_than_batch_slots(smol):
    prompts = ["Say hi.", "Say bye.", "Count to three.", "Name a fruit.", "Name a dog breed.",
               "What is 2+2?", "Spell cat.", "Name a colour.", "Say yes.", "Say no."]
    many = smol.generate(prompts, SamplingParams(max_tokens=6), chat=True)  # max_batch_size 8 -> two batches
    alone = [smol.generate(p, SamplingParams(max_tokens=6), chat=True)[0] for p in prompts[7:]]
    assert [o.token_ids for o in many[7:]] == [o.token_ids for o in alone]


def test_stream_equals_generate_and_stop_strings(smol):
    params = SamplingParams(max_tokens=40)
    full = smol.generate("Write a haiku about the sea.", params, chat=True)[0]
    pieces = list(smol.stream("Write a haiku about the sea.", params, chat=True))
    assert len(pieces) > 3 and "".join(pieces) == full.text
    # stop at the first newline: the text ends before it, and streaming never shows it
    stopped = smol.generate("Write a haiku about the sea.", SamplingParams(max_tokens=40, stop=["\n"]), chat=True)[0]
    assert "\n" in full.text and stopped.text == full.text.split("\n")[0] and stopped.finish_reason == "stop"
    streamed = "".join(smol.stream("Write a haiku about the sea.", SamplingParams(max_tokens=40, stop=["\n"]),
                                   chat=True))
    assert streamed == stopped.text


def test_stats(smol):
    out = smol.generate(prompt_token_ids=[list(range(200, 300))],
                        sampling_params=SamplingParams(max_tokens=10, ignore_eos=True))[0]
    s = out.stats
    assert s["prompt_tokens"] == 100 and s["kept_tokens"] == 100 and s["generated_tokens"] == 10
    assert s["kv_bytes"] == 30 * 2 * 3 * 64 * (100 + 10) * 4 == s["full_kv_bytes"]
    assert s["prefill_s"] > 0 and s["decode_s"] > 0


def test_input_errors(smol):
    with pytest.raises(ValueError, match="empty"):
        smol.generate(prompt_token_ids=[[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.generate(prompt_token_ids=[[5, 49152]])
    with pytest.raises(ValueError, match="at most 8192 positions"):
        smol.generate(prompt_token_ids=[[5] * 8192])
    with pytest.raises(ValueError, match="exactly one of"):
        smol.generate()
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        smol.generate(["hi"], [SamplingParams(), SamplingParams()])


def test_past_max_model_len_is_refused_with_the_numbers(smol_dir):
    llm = LLM(smol_dir, max_model_len=110, max_batch_size=2)
    params = [SamplingParams(max_tokens=50, ignore_eos=True), SamplingParams(max_tokens=10, ignore_eos=True)]
    refused, fine = llm.generate(prompt_token_ids=[list(range(200, 300))] * 2, sampling_params=params)
    assert refused.finish_reason == "error" and not refused.token_ids
    assert refused.error == ("the prompt has 100 tokens and max_tokens is 50, together past the model's 110 "
                             "positions; lower max_tokens (-n) to at most 10 or shorten the prompt")
    assert len(fine.token_ids) == 10 and fine.finish_reason == "length" and fine.error is None
    with pytest.raises(ValueError, match="lower max_tokens"):
        llm.add_request(prompt_token_ids=list(range(200, 300)), sampling_params=params[0])


def test_bad_library_input_is_refused_clearly(smol):
    with pytest.raises(ValueError, match="list of token-id lists"):
        smol.generate(prompt_token_ids=[5, 6, 7])  # flat: one prompt must still be wrapped
    with pytest.raises(ValueError, match="must be integers"):
        smol.generate(prompt_token_ids=[[5.0, 6.0]])
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        LLM(SMOL_DIR, device="tpu")
    for name, kwargs in [("prefill_chunk_size", {"prefill_chunk_size": 0}), ("max_batch_size", {"max_batch_size": 0}),
                         ("max_kv_len", {"max_kv_len": -5})]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            LLM(SMOL_DIR, **kwargs)


def test_progress_fires_on_the_chunked_prefill_path(tmp_path):
    """Prefill progress comes once per layer whatever the prompt length (here 3 chunks of 32), then decode."""
    llm = LLM(tiny_model_dir(tmp_path, "llama", num_hidden_layers=3), prefill_chunk_size=32)
    events = []
    llm.generate(prompt_token_ids=[list(range(3, 99))], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True),
                 progress=lambda stage, done, total: events.append((stage, done, total)))
    assert events == [("prefill", 1, 3), ("prefill", 2, 3), ("prefill", 3, 3),
                      ("decode", 1, 4), ("decode", 2, 4), ("decode", 3, 4), ("decode", 4, 4)]

"""Chat sessions (sessions): a conversation's compressed cache carried across turns.

A tiny random Llama with SmolLM2's full vocabulary, so that the chat template's tokens are real ones.
- With a budget that covers the whole conversation, every turn's tokens equal one full-cache `generate` over the
  conversation's tokens up to that turn (positions, continuation and templates right).
- The tokens fed over the turns are exactly the tokenized template of the whole conversation.
- Re-compression never exceeds the slot, keeps the newest turn's observation window, and the held entries are the
  ones at their recorded positions (layer 0's keys equal a plain forward's keys there).
- close() frees the slot; sessions and one-shot requests share the slots; refusals say what to do.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from snapkv.config import SnapKVConfig
from tests.conftest import tiny_model_dir

TURNS = ["Hello there, this is the first message of the conversation, long enough to compress.",
         "A second, shorter question?", "And a third one, please.", "Fourth.", "The fifth and last turn."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_chat"), vocab_size=49152, max_position_embeddings=2048)


def run_turns(chat, params, turns=TURNS):
    starts, outs = [], []
    for text in turns:
        starts.append(chat.conversation_tokens)
        outs.append(chat.send(text, params))
        assert outs[-1].finish_reason in ("stop", "length"), outs[-1].error
    return starts, outs


def test_uncompressed_session_equals_full_cache_generate(model_dir):
    llm = LLM(model_dir, snapkv=SnapKVConfig(budget=1000, window=8), max_batch_size=2, max_kv_len=1100)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    chat = llm.chat_session(system="Be brief.")
    starts, outs = run_turns(chat, params)
    assert not any(t["compressed"] for t in chat.turns)
    full = LLM(model_dir, snapkv=None, max_batch_size=1, max_kv_len=1100)
    for start, turn, out in zip(starts, chat.turns, outs):
        prompt = chat.token_ids[:start + turn["new_tokens"]]
        assert full.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids == out.token_ids
    assert chat.conversation_tokens == len(chat.token_ids) == starts[-1] + chat.turns[-1]["new_tokens"] + 11
    assert [m["role"] for m in chat.history] == ["system"] + ["user", "assistant"] * len(TURNS)
    assert chat.history[-1]["content"] == outs[-1].text


def test_fed_tokens_are_the_templated_conversation(model_dir):
    """Answers that end in the end-of-turn token: what the turns feed (plus the last answer's final token) is the
    template of the whole conversation, tokenized in one go."""
    llm = LLM(model_dir, max_batch_size=1, max_kv_len=600)
    tok = llm.tokenizer
    chat = llm.chat_session(system="You are terse.")
    answers = ["Paris is the capital.", "Rome, of course!", "42"]
    for user, answer in zip(TURNS, answers):  # each answer as the model would have sampled it, then folded in
        new = chat.new_tokens(user)
        reply = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_ids[0]]
        chat.token_ids += new + reply[:-1]
        chat.pending = reply[-1:]
        chat.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    rendered = tok.encode(tok.apply_chat_template(chat.history, add_generation_prompt=False),
                          add_special_tokens=False)
    fed = chat.token_ids + chat.pending
    assert rendered[:len(fed)] == fed and tok.decode(rendered[len(fed):]) == "\n"


def test_recompression_stays_in_the_slot_and_keeps_the_new_window(model_dir):
    window = 8
    llm = LLM(model_dir, snapkv=SnapKVConfig(budget=40, window=window, kernel=3), max_batch_size=2, max_kv_len=80)
    chat = llm.chat_session(reserve=10)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for text in TURNS:
        start = chat.conversation_tokens
        chat.send(text, params)
        turn = chat.turns[-1]
        new = turn["new_tokens"]
        assert chat.held_entries <= llm.runner.capacity
        assert int(llm.runner.cache.lengths[:, chat.slot].max()) == chat.held_entries
        if turn["compressed"]:
            assert chat.held_entries == 40 + 11  # the budget, then the answer's fed tokens
            newest = set(range(start + new - min(window, new), start + new))
            for positions in chat.positions:
                for row in positions.tolist():
                    assert newest <= set(row)
    assert sum(t["compressed"] for t in chat.turns) >= 3
    # every held entry is the one at its recorded position: layer 0's keys depend only on token and position

    class Keys:
        tail_queries = 1
        k = None

        def past(self, layer):
            return None

        def store(self, layer, q, k, v):
            if layer == 0:
                self.k = k[0]

    keys = Keys()
    with torch.no_grad():
        llm.model(torch.tensor([chat.token_ids]), ctx=keys)
    held = chat.positions[0]
    cached = llm.runner.cache.k[0, chat.slot, :, :held.shape[-1]]
    expected = keys.k.gather(1, held[..., None].expand(-1, -1, cached.shape[-1]))
    assert (cached - expected).abs().max().item() < 1e-4


def test_close_frees_the_slot_and_sessions_share_slots(model_dir):
    llm = LLM(model_dir, snapkv=SnapKVConfig(budget=64, window=8), max_batch_size=2, max_kv_len=200)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a, b = llm.chat_session(), llm.chat_session()
    with pytest.raises(ValueError, match="no free cache slot"):
        llm.chat_session()
    refused = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)[0]
    assert refused.finish_reason == "error" and "held by chat sessions" in refused.error
    a.send("hi", params)
    a.close()
    assert sorted(llm.scheduler.free_slots) == [a.slot] and llm.scheduler.reserved == 1
    with pytest.raises(ValueError, match="closed"):
        a.send("again", params)
    assert len(llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)[0].token_ids) == 4
    b.send("still here", params)  # the other conversation goes on
    c = llm.chat_session()
    assert c.slot == a.slot
    b.close(), c.close()
    assert sorted(llm.scheduler.free_slots) == [0, 1] and llm.scheduler.reserved == 0


def test_stream_closed_early_keeps_the_partial_answer(model_dir):
    llm = LLM(model_dir, snapkv=SnapKVConfig(budget=200, window=8), max_batch_size=1, max_kv_len=400)
    chat = llm.chat_session()
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    pieces = chat.stream("Tell me a long story.", params)
    first = next(pieces)
    pieces.close()
    assert chat.history[-1]["content"].startswith(first) and chat.turns[-1]["generated_tokens"] < 30
    out = chat.send("Go on.", params)
    assert len(out.token_ids) == 30 and len(chat.history) == 4


def test_reset_and_refusals(model_dir, tmp_path):
    llm = LLM(model_dir, snapkv=None, max_batch_size=1, max_kv_len=60)
    chat = llm.chat_session()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    chat.send("One.", params)
    with pytest.raises(ValueError, match="full cache"):
        for _ in range(5):
            chat.send("Another turn that makes the conversation longer than the slot.", params)
    chat.reset()
    assert chat.history == [] and chat.conversation_tokens == 0 and chat.held_entries == 0
    chat.send("Fresh start.", params)
    with pytest.raises(ValueError, match="non-empty"):
        chat.send("", params)
    chat.close()
    with pytest.raises(ValueError, match="adakv"):
        llm.chat_session(snapkv=SnapKVConfig(budget=32, window=8, policy="adakv"))
    assert llm.scheduler.reserved == 0  # a refused session gives its slot back
    mistral = LLM(tiny_model_dir(tmp_path, "mistral", vocab_size=49152, sliding_window=16), max_batch_size=1)
    with pytest.raises(ValueError, match="sliding window"):
        mistral.chat_session()


def test_full_history_selects_from_the_whole_conversation(model_dir):
    """With full_history every turn chooses among all the conversation's entries: layer 0 (whose keys and queries
    depend only on tokens and positions) keeps exactly what SnapKV keeps from one prefill of the conversation."""
    window = 8
    cfg = SnapKVConfig(budget=40, window=window, kernel=3)
    llm = LLM(model_dir, snapkv=cfg, max_batch_size=1, max_kv_len=80)
    chat = llm.chat_session(reserve=0, full_history=True)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for text in TURNS:
        start = chat.conversation_tokens
        chat.send(text, params)
    assert all(t["compressed"] for t in chat.turns) and chat.held_entries == 40 + 11
    prompt = chat.token_ids[:start + chat.turns[-1]["new_tokens"]]  # the last turn's candidates

    class Layer0:
        tail_queries = window

        def past(self, layer):
            return None

        def store(self, layer, q, k, v):
            if layer == 0:
                self.q, self.k = q, k

    full, upto = Layer0(), Layer0()
    with torch.no_grad():
        llm.model(torch.tensor([chat.token_ids]), ctx=full)
        llm.model(torch.tensor([prompt]), ctx=upto)
    archived = chat.archive[0][0]
    assert archived.shape[1] == chat.conversation_tokens
    assert (archived - full.k[0]).abs().max().item() < 1e-4  # every entry, in position order
    expected = llm.make_policy(cfg).select(upto.q, upto.k, 0)[0]
    assert torch.equal(chat.positions[0][:, :40], expected)
    assert chat.history_bytes == 2 * archived.nbytes * llm.config.num_layers

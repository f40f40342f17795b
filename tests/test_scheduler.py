"""engine.scheduler and the continuous-batching loop over it: slots are taken lowest-first and freed at once, a
request's tokens never depend on its slot or its companions (greedy exactly, seeded sampling too), abort frees a
slot for the next request, a request that cannot fit is refused with its numbers while the others finish, and
generate/stream calls from several threads or interleaved iterators become requests of one loop."""

from __future__ import annotations

import threading

import pytest
import torch

from engine import LLM, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Placement, Status
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir


class FakeSeq:
    def __init__(self, rid, n):
        self.request_id, self.prompt_token_ids, self.slot, self.status = rid, [0] * n, None, Status.WAITING
        self.placement = Placement()  # any free slot


def test_scheduler_lowest_slot_and_prefill_budget():
    sched = Scheduler(num_slots=3, prefill_token_budget=100)
    seqs = [FakeSeq(str(i), n) for i, n in enumerate((60, 30, 20, 500, 5))]
    for s in seqs:
        sched.add(s)
    assert [s.request_id for s in sched.admit()] == ["0", "1", "4"]  # oldest first within 100 tokens; 20 would not fit
    assert [s.slot for s in (seqs[0], seqs[1], seqs[4])] == [0, 1, 2] and max(sched.running) + 1 == 3
    assert sched.admit() == []  # no free slot
    sched.release(seqs[0])
    assert seqs[0].slot is None and max(sched.running) + 1 == 3
    assert [s.request_id for s in sched.admit()] == ["3"] and seqs[3].slot == 0  # the long one was owed a turn
    sched.release(seqs[1]), sched.release(seqs[4])
    assert max(sched.running) + 1 == 1 and sched.admit()[0].slot == 1
    assert sched.find("3") is seqs[3] and sched.find("9") is None


def test_short_requests_overtake_long_ones_but_never_starve_them():
    sched = Scheduler(num_slots=8, prefill_token_budget=512)
    order = []
    for i, n in enumerate((4096, 4096, 4096)):
        sched.add(FakeSeq(f"long{i}", n))
    order.append([s.request_id for s in sched.admit()])  # nothing short waits: a long prefill
    sched.add(FakeSeq("short0", 128))  # arrives during that prefill
    order.append([s.request_id for s in sched.admit()])  # -> next step, before the other long ones
    sched.add(FakeSeq("short1", 128))
    order.append([s.request_id for s in sched.admit()])  # the passed-over long one goes first now
    order.append([s.request_id for s in sched.admit()])
    order.append([s.request_id for s in sched.admit()])
    assert order == [["long0"], ["short0"], ["long1"], ["short1"], ["long2"]]


def test_admission_check_refuses_before_queueing():
    def check(seq):
        if len(seq.prompt_token_ids) > 10:
            raise ValueError("too long")

    sched = Scheduler(2, 100, check)
    with pytest.raises(ValueError, match="too long"):
        sched.add(FakeSeq("a", 11))
    assert not sched.has_unfinished()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "mistral", sliding_window=48)


def random_prompts(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 150, (count,), generator=g).tolist()
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("snapkv", [None, SnapKVConfig(budget=48, window=8, kernel=5)], ids=["full", "snapkv"])
def test_continuous_batching_equals_each_request_alone(tiny_path, snapkv):
    llm = LLM(tiny_path, snapkv=snapkv, max_batch_size=4)
    prompts = random_prompts(20)
    params = [SamplingParams(max_tokens=n, ignore_eos=True)
              for n in torch.randint(1, 40, (20,), generator=torch.Generator().manual_seed(1)).tolist()]
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [len(o.token_ids) for o in together] == [p.max_tokens for p in params]
    alone = LLM(tiny_path, snapkv=snapkv, max_batch_size=1)
    for ids, p, out in zip(prompts, params, together):
        assert out.token_ids == alone.generate(prompt_token_ids=[ids], sampling_params=p)[0].token_ids
    if snapkv is not None:
        assert sum(o.stats["kept_tokens"] < o.stats["prompt_tokens"] for o in together) >= 10  # really compressed


def test_seeded_sampling_independent_of_slot_and_companions(tiny_path):
    llm = LLM(tiny_path, max_batch_size=4)
    prompts = random_prompts(4, seed=2)
    mine = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=mine)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=t, top_k=k, seed=s, ignore_eos=True)
              for n, t, k, s in ((7, 1.0, 0, 1), (30, 0.0, 0, None), (12, 1.3, 5, 9))]
    for position in range(4):  # the request lands in every slot in turn, between other kinds of requests
        batch = others[:position] + [mine] + others[position:]
        ids = prompts[1:position + 1] + [prompts[0]] + prompts[position + 1:]
        assert llm.generate(prompt_token_ids=ids, sampling_params=batch)[position].token_ids == alone
    other_seed = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
    assert llm.generate(prompt_token_ids=[prompts[0]], sampling_params=other_seed)[0].token_ids != alone


def drain(llm, outputs):
    while llm.has_unfinished():
        for out in llm.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_step_api_abort_frees_the_slot_for_the_next_request(tiny_path):
    llm = LLM(tiny_path, max_batch_size=2)
    prompts = random_prompts(3, seed=3)
    params = SamplingParams(max_tokens=25, ignore_eos=True)
    expected = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    a, b, c = (llm.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts)
    outputs = {}
    for _ in range(3):
        for out in llm.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert set(outputs) == {a, b} and llm.scheduler.waiting[0].request_id == c  # two slots, c waits
    slot_of_a = llm.scheduler.find(a).slot
    assert llm.abort(a) and not llm.abort(a) and llm.scheduler.find(a) is None
    assert slot_of_a in llm.scheduler.free_slots
    for out in llm.step():  # c takes a's slot at once and decodes in the same step as b
        outputs.setdefault(out.request_id, []).append(out)
    assert llm.scheduler.find(c).slot == slot_of_a
    drain(llm, outputs)
    for rid, want in ((b, expected[1]), (c, expected[2])):
        final = outputs[rid][-1]
        assert final.finish_reason == "length" and final.token_ids == want
        assert [t for o in outputs[rid] for t in o.new_token_ids] == want
        assert "".join(o.new_text for o in outputs[rid]) == final.text == llm.tokenizer.decode(want)
    assert all(o.finish_reason is None for o in outputs[a])  # an aborted request just stops


def test_capacity_refusal_leaves_the_others_alone(tiny_path):
    llm = LLM(tiny_path, max_batch_size=2, max_kv_len=100)
    prompts = random_prompts(3, seed=4)
    fits = SamplingParams(max_tokens=100 - len(prompts[0]), ignore_eos=True)
    too_many = SamplingParams(max_tokens=101 - len(prompts[1]), ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=[fits, too_many, SamplingParams(max_tokens=5)])
    n = len(prompts[1])
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert outs[1].error.startswith(f"the request needs 101 cache entries ({n}-token prompt, {n} kept, max_tokens "
                                    f"{101 - n}) but a slot holds 100; lower max_tokens (-n) to at most {100 - n}")
    assert len(outs[0].token_ids) == fits.max_tokens and outs[0].error is None
    # a prompt whose kept entries alone fill the slot gets no negative max_tokens advice
    whole = llm.generate(prompt_token_ids=[list(range(3, 113))], sampling_params=SamplingParams(max_tokens=4))[0]
    assert whole.error == ("the request needs 114 cache entries (110-token prompt, 110 kept, max_tokens 4) but a "
                           "slot holds 100; its kept entries alone fill the slot: lower the SnapKV budget, shorten "
                           "the prompt, or build the engine with max_kv_len >= 114")
    assert outs[2].token_ids == llm.generate(prompt_token_ids=[prompts[2]],
                                             sampling_params=SamplingParams(max_tokens=5))[0].token_ids


def test_a_failing_request_fails_alone_and_the_engine_goes_on(tiny_path, monkeypatch):
    llm = LLM(tiny_path, max_batch_size=2)
    prompts = random_prompts(3, seed=5)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    real_prefill = llm.runner.prefill

    def prefill(seq):
        if seq.prompt_token_ids == prompts[1]:
            raise RuntimeError("out of memory (injected)")
        return real_prefill(seq)

    monkeypatch.setattr(llm.runner, "prefill", prefill)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert outs[1].error == "prefill failed: RuntimeError: out of memory (injected)"
    assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    assert not llm.scheduler.running and sorted(llm.scheduler.free_slots) == [0, 1]

    def decode(live):  # a shared step that fails takes its requests down, not the engine
        raise RuntimeError("device error (injected)")

    monkeypatch.setattr(llm.runner, "decode", decode)
    outs = llm.generate(prompt_token_ids=[prompts[0], prompts[2]], sampling_params=params)
    assert [o.finish_reason for o in outs] == ["error", "error"] and [len(o.token_ids) for o in outs] == [1, 1]
    assert outs[0].error == "decode step failed: RuntimeError: device error (injected)"
    monkeypatch.undo()
    assert llm.generate(prompt_token_ids=[prompts[2]], sampling_params=params)[0].token_ids == expected[2]


def test_threads_and_interleaved_streams_never_mix_outputs(tiny_chat_dir):
    """Text prompts through the chat template on a tiny random model with SmolLM2's vocabulary: what is tested is
    the loop, not the answers, so it only needs four different answers that a mix-up would show."""
    llm = LLM(tiny_chat_dir, max_batch_size=4)
    prompts = ["List the first ten prime numbers.", "What is the capital of France?",
               "Write a haiku about the sea.", "Name three colours."]
    params = SamplingParams(max_tokens=24)
    expected = {p: llm.generate(p, params, chat=True)[0].text for p in prompts}
    assert len(set(expected.values())) == len(prompts)  # a swap or a mix would change some thread's text
    batch_sizes = []
    decode = llm.runner.decode
    llm.runner.decode = lambda live: batch_sizes.append(len(live)) or decode(live)
    results, errors = {}, []
    start = threading.Barrier(len(prompts))

    def worker(prompt):
        try:
            start.wait(timeout=60)
            results[prompt] = llm.generate(prompt, params, chat=True)[0].text
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == expected
    assert max(batch_sizes) > 1  # the threads' requests really shared decode steps
    del llm.runner.decode
    # two streams consumed in turn, piece by piece: each gets exactly its own text
    streams = {p: llm.stream(p, params, chat=True) for p in prompts[:2]}
    pieces = {p: [] for p in streams}
    live = dict(streams)
    while live:
        for p, it in list(live.items()):
            piece = next(it, None)
            if piece is None:
                del live[p]
            else:
                pieces[p].append(piece)
    assert {p: "".join(x) for p, x in pieces.items()} == {p: expected[p] for p in prompts[:2]}
    # a stream dropped half-way aborts its request and frees its slot
    it = llm.stream(prompts[2], params, chat=True)
    next(it)
    it.close()
    assert not llm.has_unfinished() and len(llm.scheduler.free_slots) == 4

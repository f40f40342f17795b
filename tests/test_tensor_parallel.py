"""Tensor parallelism (parallel: shard, ranks, runner) on CPU: gloo, 2 processes.

Tiny random Llama (untied lm_head) and Mistral (tied, sliding window) models with 8 query heads and 4 kv heads
and SmolLM2's vocabulary (so text prompts and chat templates work):
- the shard a rank loads is exactly its slice of each weight (safetensors via get_slice, GGUF cut after reading,
  quantized weights with their scales);
- the sharded network's logits (a SnapKV prefill, then decode steps from the compressed cache) are within 1e-5
  of one rank's;
- the engine at tp=2 generates the same tokens as at tp=1 (greedy and seeded sampling, a batch larger than the
  slots, requests arriving mid-decode, a chat session) and SnapKV keeps the same positions per (layer, kv head);
- a size that does not divide the kv heads is refused; a worker that dies fails the call with a clear message,
  never a hang (snapkv-run, torchrun and snapkv-serve: test_tensor_parallel_cli.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine import LLM, SamplingParams
from engine.cache_views import DecodeView, PrefillView
from engine.kv_cache import KVCache
from parallel.ranks import RankFailure
from formats.loader import load_config, load_model
from parallel.shard import TensorParallel, shard_config
from quant.weights import take_part
from quant.weights import quantize_int4, quantize_int8
from snapkv.config import SnapKVConfig
from snapkv.policies import make_policy
from tests.conftest import ROOT, tiny_model_dir, write_gguf
from tests.test_server import free_port

SHAPE = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_attention_heads=8,
             num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=2048)
SNAPKV = SnapKVConfig(budget=48, window=8, kernel=5)
PY = sys.executable


def tp_models(base: Path) -> dict[str, Path]:
    return {"llama": tiny_model_dir(base / "llama", **SHAPE),
            "mistral": tiny_model_dir(base / "mistral", "mistral", sliding_window=100, tie_word_embeddings=True,
                                      **SHAPE)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tp_models(tmp_path_factory.mktemp("tp"))


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (length,), generator=g).tolist() for length in (150, 40, 96, 70)[:n]]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the property under test for a dead worker)."""
    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- sharding, in one process ------------------------------------------------------------------------------------

def test_a_size_that_does_not_divide_the_kv_heads_is_refused(models):
    cfg = load_config(models["llama"])
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not divide the model's 4 kv heads.*use one "
                                         r"of 1, 2, 4"):
        shard_config(cfg, 3)
    with pytest.raises(ValueError, match="does not divide the model's 4 kv heads"):
        LLM(models["llama"], tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(models["llama"], tensor_parallel_size=0)
    local = shard_config(cfg, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 128)


def expected_part(name: str, whole: torch.Tensor, rank: int, size: int, vocab_parallel=True) -> torch.Tensor:
    if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) or (
            name == "lm_head.weight" and vocab_parallel):
        return whole.chunk(size, 0)[rank]
    if "o_proj" in name or "down_proj" in name:
        return whole.chunk(size, 1)[rank]
    return whole


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_each_rank_loads_exactly_its_slices(models, kind):
    whole = dict(load_model(models[kind]).named_parameters(remove_duplicate=False))
    for rank in range(2):
        part = load_model(models[kind], shard=TensorParallel(rank, 2))
        assert part.config.num_kv_heads == 2 and part.lm_head.weight.shape[0] == SHAPE["vocab_size"] // 2
        for name, p in part.named_parameters(remove_duplicate=False):
            assert torch.equal(p, expected_part(name, whole[name], rank, 2)), name
        if kind == "mistral":  # tied: the lm_head part is a view of the embedding's rows, not a copy
            assert part.lm_head.weight.data_ptr() == part.model.embed_tokens.weight[rank * 24576].data_ptr()


def test_gguf_parts_are_cut_after_reading(models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models["llama"])
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype_for=lambda name: "Q8_0" if "blk" in name else "F32")
    whole = dict(load_model(path).named_parameters())  # dequantized in float32
    part = load_model(path, shard=TensorParallel(1, 2))
    for name, p in part.named_parameters():
        assert torch.equal(p, expected_part(name, whole[name], 1, 2)), name


def test_take_part_keeps_quantized_scales_with_their_columns():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for q in (quantize_int4(w), quantize_int8(w)):
        full = q.dequantize()
        assert torch.equal(take_part(q, 0, 32, 64).dequantize(), full[32:64])
        assert torch.equal(take_part(q, 1, 64, 128).dequantize(), full[:, 64:])
    with pytest.raises(ValueError, match="inside a quantization group of 32"):
        take_part(quantize_int4(w), 1, 16, 80)


# --- the sharded network, 2 processes ----------------------------------------------------------------------------

def snapkv_logits(model, ids: list[int], steps: int) -> torch.Tensor:
    """A SnapKV prefill of ids into a one-slot cache, then `steps` greedy decode steps: [steps + 1, V] logits."""
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 128, cfg.head_dim, track_positions=True)
    view = PrefillView(cache, 0, make_policy(SNAPKV, cfg.num_layers, cfg.sliding_window))
    with torch.inference_mode():
        out = [model(torch.tensor([ids]), ctx=view, last_only=True)[0, -1]]
        positions = torch.tensor([len(ids)])
        step = DecodeView(cache, positions, cfg.sliding_window)
        for _ in range(steps):
            step.span = 128
            out.append(model.decode(out[-1].argmax()[None], positions, step)[0])
            cache.advance(torch.ones(1, dtype=torch.long))
            positions += 1
    return torch.stack(out)


def _rank_logits(rank, size, port, model_dir, ids, steps, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    model = load_model(model_dir, shard=TensorParallel(rank, size, dist.group.WORLD))
    logits = snapkv_logits(model, ids, steps)
    if rank == 0:
        results.put(logits.numpy())  # by value: a shared tensor would die with this process
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_sharded_logits_match_one_rank_within_1e5(models, kind):
    ids = prompts(1)[0]
    reference = snapkv_logits(load_model(models[kind]), ids, steps=12)
    results = mp.get_context("spawn").SimpleQueue()
    ranks = mp.spawn(_rank_logits, args=(2, free_port(), str(models[kind]), ids, 12, results), nprocs=2, join=False)
    sharded = torch.from_numpy(results.get())  # before joining: the put waits for this read
    while not ranks.join():
        pass
    assert sharded.shape == reference.shape == (13, 49152)
    assert (sharded - reference).abs().max() < 1e-5
    assert reference.abs().max() > 0.5  # real logits, not near-zero ones that any code would match


# --- the engine at tp=2 against tp=1 -------------------------------------------------------------------------------

PARAMS = [SamplingParams(max_tokens=14, ignore_eos=True),
          SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=9, ignore_eos=True)]


def run_engine(llm: LLM) -> list:
    """Three requests through two slots (one waits for a slot), then a fourth that arrives mid-decode."""
    ps = prompts()
    first = [llm.add_request(prompt_token_ids=ids, sampling_params=p, return_kept=True)
             for ids, p in zip(ps[:3], PARAMS[:3])]
    outs = {}
    for _ in range(3):
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    late = llm.add_request(prompt_token_ids=ps[3], sampling_params=PARAMS[3], return_kept=True)
    while llm.has_unfinished():
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    return [outs[rid] for rid in first + [late]]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_engine_at_tp2_generates_and_keeps_what_tp1_does(models, kind):
    single = run_engine(LLM(models[kind], snapkv=SNAPKV, max_batch_size=2, max_kv_len=96))
    with deadline(180), LLM(models[kind], snapkv=SNAPKV, max_batch_size=2, max_kv_len=96,
                            tensor_parallel_size=2) as llm:
        assert llm.runner.cache.shape[2] == 2  # rank 0 holds 2 of the 4 kv heads
        sharded = run_engine(llm)
    for one, two in zip(single, sharded):
        assert one.finish_reason == "length" and two.token_ids == one.token_ids
        assert two.stats["kept_tokens"] == one.stats["kept_tokens"]
        assert len(two.kept) == 2 and all(torch.equal(a, b) for a, b in zip(one.kept, two.kept))
    kept = make_policy(SNAPKV, 2, 100 if kind == "mistral" else None).kept_length(150)
    assert kept < 60 and single[0].kept[0].shape == (4, kept)  # the 150-token prompt was compressed in every head
    assert not torch.equal(single[0].kept[0][0], single[0].kept[0][1])  # and the heads chose differently


def listening(pids: list[int]) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                found.add(fields[1])
    return found


LOOPBACK = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")


def test_chat_session_at_tp2_matches_tp1(models, monkeypatch):
    """Also: the ranks talk in frames (JSON and tensor bytes), never pickled objects, and every socket the group
    listens on is on the loopback (the rendezvous store, gloo's pairs)."""
    for name in ("broadcast_object_list", "gather_object", "all_gather_object", "scatter_object_list"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, **k: pytest.fail("a pickled object was sent"))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    turns = ["A first message that is long enough to be compressed by the small budget of this test, surely.",
             "A second question?", "A third."]
    answers = {}
    before = listening([os.getpid()])
    for size in (1, 2):
        with deadline(180), LLM(models["llama"], snapkv=SNAPKV, max_batch_size=1, max_kv_len=120,
                                tensor_parallel_size=size) as llm:
            if size == 2:
                sockets = listening([os.getpid(), llm.ranks.processes[0].pid]) - before
                assert sockets and all(address.startswith(LOOPBACK) for address in sockets), sockets
            with llm.chat_session(system="Be brief.", reserve=16) as chat:
                answers[size] = [chat.send(t, params).token_ids for t in turns]
                assert any(t["compressed"] for t in chat.turns[1:])  # a later turn re-selected among held entries
            if size == 2:
                with pytest.raises(ValueError, match="full_history sessions are not supported with tensor"):
                    llm.chat_session(full_history=True)
    assert answers[2] == answers[1]


def test_a_script_without_a_main_guard_is_told_what_to_do(models, tmp_path):
    """Spawned workers import the script again; without the guard they would start workers of their own."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from engine import LLM\nLLM({str(models['llama'])!r}, tensor_parallel_size=2)\n")
    run = subprocess.run([PY, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "bootstrapping phase" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "parallel.ranks.RankFailure: tensor-parallel rank 1 failed while starting: the script that starts "
        "LLM(tensor_parallel_size=...) must do it under `if __name__ == \"__main__\":` (each worker is a new "
        "process that imports the script again)")


def test_a_start_that_cannot_fit_is_a_plain_refusal_and_leaves_nothing_behind(models):
    with deadline(120):
        with pytest.raises(ValueError, match="the KV cache needs .* lower max_kv_len"):
            LLM(models["llama"], max_batch_size=1, max_kv_len=10**9, tensor_parallel_size=2)
        with LLM(models["llama"], max_batch_size=1, max_kv_len=256, tensor_parallel_size=2) as llm:  # starts again
            assert llm.generate(prompt_token_ids=prompts(1), sampling_params=SamplingParams(max_tokens=3))[0].token_ids


def test_a_dead_worker_fails_the_call_with_a_clear_message(models):
    with deadline(120):
        llm = LLM(models["llama"], snapkv=SNAPKV, max_batch_size=1, max_kv_len=96, tensor_parallel_size=2)
        worker = llm.ranks.processes[0]
        worker.kill()
        worker.join()
        with pytest.raises(RankFailure, match=r"tensor-parallel (prefill|decode step|release) failed: rank 1 died "
                                              r"\(killed by SIGKILL\); the engine has stopped"):
            llm.generate(prompt_token_ids=prompts(1), sampling_params=SamplingParams(max_tokens=4))
        assert "rank 1 died" in llm.failed
        with pytest.raises(RankFailure, match="rank 1 died"):  # and every later call says so at once
            llm.generate(prompt_token_ids=prompts(1), sampling_params=SamplingParams(max_tokens=4))
        llm.close()


# --- the commands -------------------------------------------------------------------------------------------------

def test_compiled_step_at_tp2_generates_what_eager_tp1_does(models):
    """torch.compile(fullgraph=True) of the decode step with its collectives traced (functional collectives): the
    CPU stand-in for capturing them in a CUDA graph, which needs shapes and no host syncs just the same."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = prompts(2)
    expected = LLM(models["llama"], snapkv=SNAPKV, max_batch_size=2, max_kv_len=96).generate(
        prompt_token_ids=ids, sampling_params=params)
    with deadline(300), LLM(models["llama"], snapkv=SNAPKV, max_batch_size=2, max_kv_len=96, compile=True,
                            tensor_parallel_size=2) as llm:
        outs = llm.generate(prompt_token_ids=ids, sampling_params=params)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]


def test_benchmark_counts_the_collectives_of_a_step(tmp_path):
    """benchmarks/tensor_parallel.py at the test shape: 2 layers x (o_proj + down_proj all-reduces) and,
    vocab-parallel, the logits' all-gather (every rank samples the same token from the same logits: no broadcast)."""
    from benchmarks.tensor_parallel import main

    out = tmp_path / "tp.md"
    main(["--shapes", "tiny-tp", "--steps", "2", "--batches", "1", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny-tp")]
    assert [(r[2].strip(), r[3].strip(), int(r[6])) for r in rows] == [
        ("1", "whole", 0), ("2", "vocab-parallel", 5), ("2", "replicated", 4)]
    assert all(float(r[4]) > 0 for r in rows) and float(rows[0][7]) == 0
    assert all(float(r[7]) > 0 for r in rows[1:])  # time in collectives, measured at tp=2 only

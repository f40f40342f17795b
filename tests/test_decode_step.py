"""engine.decode_step / model_runner: the static step compiles with fullgraph once per bucket and never again
across calls of any shape (the CPU stand-in for "capturable as a CUDA graph"), and equals eager token for token;
graphs are captured once per (bucket, sampling mode) when the engine is built and never while serving (a fake
graph on CPU; tests/test_cuda.py runs the real thing on a GPU). The flash-attn and CUDA stand-ins are in
tests/test_gpu_readiness.py."""

import torch

import engine.decode_step as decode_step
import engine.model_runner as model_runner
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
    greedy, bucket 2 sampled, bucket 2 greedy. The C++ kernels are scalar (as in test_sampler's compiled test):
    what is tested is one full graph per step, no recompiles and the eager tokens; vectorizing the sampled
    step's int64 hash costs tens of seconds of gcc and tests nothing of ours."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    path = tiny_model_dir(tmp_path, "llama")
    cfg = SnapKVConfig(budget=48, window=8)
    eager, compiled = LLM(path, snapkv=cfg, max_batch_size=2), LLM(path, snapkv=cfg, max_batch_size=2, compile=True)
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
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

    def fake_capture(fn, pool, device, warmup=2):
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

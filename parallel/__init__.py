"""parallel: tensor parallelism on torch.distributed. What a rank holds and the collectives as hooks (shard), the
process group with its workers and frames (ranks), and the engine on N ranks (runner), which it provides to
`LLM(tensor_parallel_size=N)` (`engine.wings`)."""

from engine import wings
from parallel.runner import start_engine

wings.provide("tensor_parallel", start_engine)

"""The engine's flags, declared once for snapkv-run, snapkv-chat and snapkv-serve, and the one place their LLM is
built: `@engine_options` adds the flags to a typer command, which receives them as `engine: EngineFlags`; and how
every command ends (`run_app`: a user's mistake is one line on stderr and exit code 2, never a traceback)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

import fastattn  # noqa: F401
import formats  # noqa: F401  the wings: a front end composes them (an installed package also finds them itself)
import parallel  # noqa: F401
import quant  # noqa: F401
import sessions  # noqa: F401
from engine.config import DEVICES, DTYPES, KV_DTYPES, EngineConfig
from engine.errors import EngineFailure
from quant.store import WEIGHTS_DTYPES
from snapkv.config import CHOICES, HELP, SnapKVConfig

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "SmolLM2-135M-Instruct"
SNAPKV = SnapKVConfig()  # the defaults of every SnapKV flag


class UserError(Exception):
    pass


def choices(name: str, values) -> type[Enum]:
    """A typer choice type from a tuple of strings (the library's own list, so the two never disagree)."""
    return Enum(name, {v: v for v in values}, type=str)


Pooling, GroupAgg, Policy = (choices(n, CHOICES[k]) for n, k in (("Pooling", "pooling"), ("GroupAgg", "group_agg"),
                                                                  ("Policy", "policy")))
Device, DType, WeightsDType, KVDType = (choices(n, v) for n, v in (("Device", DEVICES), ("DType", DTYPES),
                                                                   ("WeightsDType", WEIGHTS_DTYPES),
                                                                   ("KVDType", KV_DTYPES)))

# name -> (annotation, typer option): the flags every command that runs an engine takes
FLAGS = {
    "model": (Optional[Path], typer.Option(None, "--model", "-m", help="HF-style model directory or .gguf file.",
                                           show_default="weights/SmolLM2-135M-Instruct")),
    "budget": (int, typer.Option(SNAPKV.budget, help=HELP["budget"])),
    "no_snapkv": (bool, typer.Option(False, "--no-snapkv", help="Keep the full KV cache.")),
    "window": (int, typer.Option(SNAPKV.window, help=HELP["window"])),
    "kernel": (int, typer.Option(SNAPKV.kernel, help=HELP["kernel"])),
    "pooling": (Pooling, typer.Option(SNAPKV.pooling, help=HELP["pooling"])),
    "group_agg": (GroupAgg, typer.Option(SNAPKV.group_agg, "--group-agg", help=HELP["group_agg"])),
    "policy": (Policy, typer.Option(SNAPKV.policy, help=HELP["policy"])),
    "sink_tokens": (Optional[int], typer.Option(None, "--sink-tokens", help=HELP["sink_tokens"], show_default=False)),
    "device": (Device, typer.Option("cpu", help="Where to run.")),
    "dtype": (DType, typer.Option("auto", help="Weights and KV-cache dtype (auto: bfloat16 on a GPU, float16 where "
                                               "it has no bfloat16, float32 on CPU).")),
    "weights_dtype": (WeightsDType, typer.Option("auto", "--weights-dtype", help="How the weights are stored: "
                                                 "int4/int8 are weight-only quantized (smaller, faster decode; see "
                                                 "README); auto: a .gguf keeps its own quantization, anything else "
                                                 "is stored in --dtype.")),
    "kv_dtype": (KVDType, typer.Option("auto", "--kv-dtype", help="KV cache storage: int8 (a scale per token and kv "
                                       "head) or auto (--dtype).")),
    "cuda_graph": (bool, typer.Option(True, "--cuda-graph/--no-cuda-graph", help="On CUDA, replay the decode step "
                                      "as captured CUDA graphs (--no-cuda-graph: eager).")),
    "compile_step": (bool, typer.Option(False, "--compile", help="Run the decode step through torch.compile (a slow "
                                        "start; with CUDA graphs on, the compiled step is what gets captured).")),
    "prefill_chunk": (Optional[int], typer.Option(None, "--prefill-chunk", help="Prefill the prompt layer by layer "
                                                  "in chunks of this many tokens (bounds prefill memory).",
                                                  show_default="4096 on cuda, 512 on cpu")),
    "max_kv_len": (Optional[int], typer.Option(None, "--max-kv-len", help="Cache entries per slot.",
                                               show_default="the SnapKV budget + 1024, or the model's length")),
    "allow_longer_context": (bool, typer.Option(False, "--allow-longer-context", help="Accept prompts longer than "
                                                "the model's max_position_embeddings.")),
    "tensor_parallel": (int, typer.Option(1, "--tensor-parallel", help="Shard the model over this many processes "
                                          "(GPUs), each holding its share of the kv heads; it must divide the "
                                          "model's kv heads. Under torchrun, the number of processes torchrun "
                                          "starts (see README).")),
}


@dataclasses.dataclass
class EngineFlags:
    model: Optional[Path]
    budget: int
    no_snapkv: bool
    window: int
    kernel: int
    pooling: Enum
    group_agg: Enum
    policy: Enum
    sink_tokens: Optional[int]
    device: Enum
    dtype: Enum
    weights_dtype: Enum
    kv_dtype: Enum
    cuda_graph: bool
    compile_step: bool
    prefill_chunk: Optional[int]
    max_kv_len: Optional[int]
    allow_longer_context: bool
    tensor_parallel: int

    @property
    def model_path(self) -> Path:
        path = self.model or DEFAULT_MODEL
        if not path.exists():
            hint = " (run `make weights` to fetch the default model)" if self.model is None else ""
            raise UserError(f"model not found: {path}{hint}")
        return path

    @property
    def snapkv(self) -> SnapKVConfig | None:
        if self.no_snapkv:
            return None
        return SnapKVConfig(budget=self.budget, window=self.window, kernel=self.kernel, pooling=self.pooling.value,
                            group_agg=self.group_agg.value, policy=self.policy.value, sink_tokens=self.sink_tokens)

    def config(self, **overrides) -> EngineConfig:
        """The EngineConfig these flags say (overrides: what a command decides itself, e.g. max_batch_size)."""
        return EngineConfig(**{
            "device": self.device.value, "dtype": self.dtype.value, "snapkv": self.snapkv,
            "max_kv_len": self.max_kv_len, "cuda_graph": self.cuda_graph, "compile": self.compile_step,
            "prefill_chunk_size": self.prefill_chunk, "allow_longer_context": self.allow_longer_context,
            "weights_dtype": self.weights_dtype.value, "kv_dtype": self.kv_dtype.value,
            "tensor_parallel_size": self.tensor_parallel} | overrides)

    def build(self, **overrides):
        """The engine, with these flags and the command's overrides."""
        from engine import LLM

        return LLM(self.model_path, self.config(**overrides))


def engine_options(command):
    """Give a typer command the engine's flags: it is called with them as one `engine: EngineFlags`."""
    signature = inspect.signature(command)
    own = [p for name, p in signature.parameters.items() if name != "engine"]
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, (annotation, option) in FLAGS.items()]

    @functools.wraps(command)
    def with_engine(**kwargs):
        engine = EngineFlags(**{name: kwargs.pop(name) for name in FLAGS})
        return command(engine=engine, **kwargs)

    with_engine.__signature__ = signature.replace(parameters=[*own, *flags])  # what typer reads
    return with_engine


def run_app(command: typer.Typer, argv: list[str] | None) -> int:
    """Run a typer app the way every snapkv command ends: a user's mistake is one line on stderr and exit code
    2, Ctrl-C is one line and 130, never a traceback."""
    try:
        code = command(args=argv, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # usage errors: unknown option, bad value type, missing --prompt
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineFailure as e:  # a tensor-parallel rank died: not the user's mistake, still one line
        print(f"error: {e}", file=sys.stderr)
        # and out at once: with a peer gone, tearing down the process group's threads at interpreter exit
        # aborted the process now and then (1 run in 8: "terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns Ctrl-C into a return value of 130 when not in standalone mode
        print("error: interrupted", file=sys.stderr)
        return 130
    return code or 0

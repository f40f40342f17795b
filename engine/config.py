"""EngineConfig: every option of an engine, validated once for every front end (LLM(...), snapkv-run, -chat,
-serve build it from their flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snapkv.config import SnapKVConfig

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
KV_DTYPES = ("auto", "int8")


@dataclass
class EngineConfig:
    """device: cpu or cuda[:N]. dtype: of the activations, weights and KV cache ("auto": bfloat16 on a GPU that
    supports it, else float16; float32 on CPU). snapkv: the selection settings (None: the full cache).
    max_batch_size: cache slots, i.e. requests decoded together. max_kv_len: entries a slot holds (default: the
    SnapKV budget + 1024 new tokens, or the model's length for the full cache; a default never takes more than half
    the free memory). max_model_len / allow_longer_context: the positions a request may reach (past the model's
    max_position_embeddings only when allowed; RoPE extrapolates). cuda_graph: on CUDA, replay captured graphs
    (False: eager). compile: run the decode step through torch.compile (captured, with cuda_graph). prefill_chunk_size:
    query chunk of the layer-by-layer prefill, which bounds its memory (default 4096 on CUDA, 512 on CPU).
    weights_dtype: how the projections, embedding and lm_head are stored (quant.store: auto, float32, bfloat16,
    float16, int8, int4). kv_dtype: "auto" (the cache in dtype) or "int8" (quant.kv_int8). tensor_parallel_size:
    shard the model over this many processes, one GPU each (parallel)."""

    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "auto"
    snapkv: SnapKVConfig | None = None
    max_batch_size: int = 8
    max_kv_len: int | None = None
    max_model_len: int | None = None
    allow_longer_context: bool = False
    cuda_graph: bool = True
    compile: bool = False
    prefill_chunk_size: int | None = None
    weights_dtype: str = "auto"
    kv_dtype: str = "auto"
    tensor_parallel_size: int = 1
    torch_device: torch.device = field(init=False)
    torch_dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        if not isinstance(self.device, (str, torch.device)) or str(self.device).split(":")[0] not in DEVICES:
            raise ValueError(f"unsupported device {self.device!r}; use cpu or cuda")
        self.torch_device = torch.device(self.device)
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        dtype = resolve_dtype(self.dtype, self.torch_device)
        if dtype is None:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        self.torch_dtype = dtype
        if self.prefill_chunk_size is None:
            self.prefill_chunk_size = 4096 if self.torch_device.type == "cuda" else 512
        for name in ("max_batch_size", "tensor_parallel_size", "prefill_chunk_size", "max_kv_len"):
            value = getattr(self, name)
            if (value is not None or name != "max_kv_len") and (not isinstance(value, int) or
                                                                isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unsupported kv dtype {self.kv_dtype!r}; use one of {', '.join(KV_DTYPES)}")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype | None:
    """The torch dtype for a name or dtype ("auto": bfloat16 on CUDA where supported, else float16; float32 on
    CPU); None if it is not one the engine runs."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in DTYPES.values() else None

"""ModelConfig: the shape of a Llama/Mistral network (read from files by the formats wing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, {"rope_type": "linear", ...} or {"rope_type": "llama3", ...}
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def kv_bytes_per_token(self, dtype_bytes: int, entry_bytes: int | None = None) -> int:
        """Bytes of K and V one token needs across all layers, at `dtype_bytes` per element or `entry_bytes` per
        (layer, kv head) entry (a KVCache class's, e.g. int8 with its scales), plus the int32 original position
        a sliding-window model keeps."""
        per_entry = entry_bytes or 2 * self.head_dim * dtype_bytes
        return self.num_layers * self.num_kv_heads * (per_entry + (4 if self.sliding_window is not None else 0))

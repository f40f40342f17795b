"""ModelConfig: the shape of a Llama/Mistral network, read from an HF config.json or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_SCALING = ("linear", "llama3")


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

    def kv_bytes_per_token(self, dtype_bytes: int, int8: bool = False) -> int:
        """Bytes of K and V one token needs across all layers, at `dtype_bytes` per element, or int8 with a
        float32 scale for each of K and V (engine.kv_cache), plus the int32 original position of each entry that
        a sliding-window model keeps."""
        values = 2 * (self.head_dim + 4) if int8 else 2 * self.head_dim * dtype_bytes
        per_head = values + (4 if self.sliding_window is not None else 0)
        return self.num_layers * self.num_kv_heads * per_head

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        _check_fields(cfg, source)
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: architecture {arch or cfg.get('model_type')!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers 5 moved rope settings into rope_parameters; older configs use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope or None
        scaling = _normalize_rope_scaling(scaling, source)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None
        return cls(
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            sliding_window=window,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the model config ({e})") from None
        return cls.from_dict(cfg, source=str(path))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], source: str = "GGUF") -> "ModelConfig":
        """Build from GGUF metadata (key -> python value), as models.loader reads it."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: llama "
                             f"({', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key, default=None):
            return fields.get(f"llama.{key}", default)

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        if heads is None or hidden is None or get("block_count") is None:
            raise ValueError(f"{source}: GGUF metadata lacks llama.attention.head_count/embedding_length/block_count")
        vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
        scaling = None
        if fields.get("llama.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = fields.get("tokenizer.ggml.eos_token_id")
        window = get("attention.sliding_window")
        return cls(
            hidden_size=hidden,
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv") or heads,
            head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
            intermediate_size=get("feed_forward_length"),
            vocab_size=vocab,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            sliding_window=window,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings="output.weight" not in fields.get("_tensor_names", ()),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [eos],
            architecture="MistralForCausalLM" if window else "LlamaForCausalLM",
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config.json that transformers loads as the same network."""
        cfg = {
            "architectures": [self.architecture],
            "model_type": "mistral" if self.architecture == "MistralForCausalLM" else "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids or None,
            "torch_dtype": "float32",
        }
        if self.architecture == "MistralForCausalLM":
            cfg["sliding_window"] = self.sliding_window
        return cfg


_REQUIRED_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_OPTIONAL_NUMBERS = ("rms_norm_eps", "rope_theta")


def _check_fields(cfg: Any, source: str) -> None:
    """A config.json that parses but is not a model config gets one line that names the field, not a traceback."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object with the model's fields, got a {type(cfg).__name__}")
    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        value = cfg.get(key)
        if value is None and key in _OPTIONAL_INTS:
            continue
        if key not in cfg:
            raise ValueError(f"{source}: the field {key!r} is missing; a Llama/Mistral config.json needs "
                             f"{', '.join(_REQUIRED_INTS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: {key} must be a positive integer (got {value!r})")
    for key in _OPTIONAL_NUMBERS:
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{source}: {key} must be a positive number (got {value!r})")
    if cfg["hidden_size"] % cfg["num_attention_heads"] and cfg.get("head_dim") is None:
        raise ValueError(f"{source}: hidden_size ({cfg['hidden_size']}) is not a multiple of num_attention_heads "
                         f"({cfg['num_attention_heads']}) and no head_dim is given")


def _normalize_rope_scaling(scaling: dict[str, Any] | None, source: str) -> dict[str, Any] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ValueError(f"{source}: rope scaling {kind!r} is not supported; supported: none, "
                         f"{', '.join(SUPPORTED_ROPE_SCALING)}")
    out = {"rope_type": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        out["low_freq_factor"] = float(scaling["low_freq_factor"])
        out["high_freq_factor"] = float(scaling["high_freq_factor"])
        out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return out

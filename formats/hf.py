"""HF model directories: the model's shape from config.json and the tokenizer from tokenizer.json (or a
sentencepiece tokenizer.model) with tokenizer_config.json, chat_template.jinja and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from engine.tokenizer import Tokenizer
from formats.tokenizers import sentencepiece_backend
from models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_SCALING = ("linear", "llama3")


def hf_model_config(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The model's shape from an HF config.json's fields; a field that is missing or wrong is named."""
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
    return ModelConfig(
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

def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config ({e})") from None
    return hf_model_config(cfg, source=str(path))


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


def hf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of an HF directory: tokenizer.json (or a sentencepiece tokenizer.model), its named tokens
    and chat template from tokenizer_config.json / chat_template.jinja, the stop ids of generation_config.json."""
    config = _read_json(path / "tokenizer_config.json")
    model_config = _read_json(path / "config.json")
    generation_config = _read_json(path / "generation_config.json")
    if (path / "tokenizer.json").is_file():
        backend, defaults = Backend.from_file(str(path / "tokenizer.json")), {}
        # transformers 5 ignores tokenizer_config's add_bos/eos_token here: tokenizer.json's post-processor
        # (Llama's prepends <s>) is the one truth, so it is kept as it is.
        add_bos, add_eos = None, False
    elif (path / "tokenizer.model").is_file():
        backend, defaults = sentencepiece_backend(path / "tokenizer.model")
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    else:
        raise ValueError(f"no tokenizer found in {path}: looked for tokenizer.json and tokenizer.model "
                         "(copy the model's tokenizer files there, or pass its .gguf file)")

    def token(name: str) -> str | None:
        value = config.get(name)
        if isinstance(value, dict):  # older configs store an AddedToken as {"content": ..., ...}
            value = value.get("content")
        token_id = model_config.get(f"{name}_id", generation_config.get(f"{name}_id"))
        if value is None and isinstance(token_id, int):
            value = backend.id_to_token(token_id)
        return value if value is not None else defaults.get(name)

    # A chat_template.jinja file (what transformers 5 saves) wins over the config entry, as in transformers.
    template_file = path / "chat_template.jinja"
    template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                else config.get("chat_template"))
    if isinstance(template, list):  # several named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    # generation_config.json lists every stop id of instruct models (Llama 3: <|end_of_text|>, <|eot_id|>).
    stop_ids = _as_list(model_config.get("eos_token_id")) + _as_list(generation_config.get("eos_token_id"))
    return Tokenizer(backend, bos_token=token("bos_token"), eos_token=token("eos_token"), unk_token=token("unk_token"),
               pad_token=token("pad_token"), add_bos_token=add_bos, add_eos_token=add_eos,
               chat_template=template, extra_eos_ids=stop_ids)


def _as_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e

"""Tokenizers rebuilt from a vocabulary: a GGUF file's metadata (no tokenizer.json inside) and a sentencepiece
tokenizer.model, built the way transformers builds them (parity tests compare ids with AutoTokenizer), and an
engine tokenizer written back out as tokenizer.json + tokenizer_config.json (snapkv-convert).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from engine.tokenizer import Tokenizer
from formats.gguf import read_gguf_metadata

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (same numbering as sentencepiece's piece types)
_SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

# Byte-level vocabularies whose merges were learned on a pre-split other than GPT-2's (llama.cpp's
# `tokenizer.ggml.pre`); without the right split, merges across word boundaries come out differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}
_PRE_SPLITS["tekken"] = _TEKKEN_SPLIT


def read_gguf_tokenizer(path: Path) -> Tokenizer:
    return gguf_tokenizer(read_gguf_metadata(path))


def gguf_tokenizer(fields: dict) -> Tokenizer:
    """A GGUF file's vocabulary rebuilt as the backend transformers' GGUF loader builds."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if kind not in _SUPPORTED_GGUF_MODELS or not tokens:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: "
                         f"{', '.join(_SUPPORTED_GGUF_MODELS)}. Use an HF directory with tokenizer.json instead")
    types, merges = fields.get("tokenizer.ggml.token_type") or [], fields.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, merges)
    else:
        backend = _sentencepiece_bpe(tokens, fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens), merges)
    _add_typed_tokens(backend, tokens, types, byte_level=kind == "gpt2")
    if split := _PRE_SPLITS.get(fields.get("tokenizer.ggml.pre")):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    name = {key: tokens[i] if isinstance(i := fields.get(f"tokenizer.ggml.{key}_token_id"), int) else None
            for key in ("bos", "eos", "unknown", "padding")}
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise (older files have no flag).
    add_bos = fields.get("tokenizer.ggml.add_bos_token", True if kind == "llama" else None)
    return Tokenizer(backend, bos_token=name["bos"], eos_token=name["eos"], unk_token=name["unknown"],
               pad_token=name["padding"], add_bos_token=add_bos,
               add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
               chat_template=fields.get("tokenizer.chat_template"))


def save_hf_files(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads as this tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token,
              "add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
              "clean_up_tokenization_spaces": False, "chat_template": tokenizer.chat_template}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _byte_level_bpe(tokens: list[str], merges: list[str] | None) -> Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp may store a token in plain UTF-8 instead of the byte alphabet; respell it so BPE can reach it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in merges] if merges is not None else _derive_merges(vocab)
    backend = Backend(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], merges: list[str] | None = None) -> Backend:
    """transformers' LlamaTokenizer: sentencepiece BPE replayed as HF BPE with byte fallback and a ▁ prefix."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ")) for m in merges] if merges is not None
              else _derive_merges(vocab, dict(zip(tokens, scores))))
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # "first": only the text's start gets the dummy ▁, not each chunk after a special token (legacy=False).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def sentencepiece_backend(path: Path) -> tuple[Backend, dict]:
    """A sentencepiece tokenizer.model as an HF BPE backend, and its bos/eos/unk/pad pieces."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    tokens, scores = [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)]
    # The python binding cannot tell user-defined pieces apart (that needs protobuf); Llama/Mistral have none.
    backend = _sentencepiece_bpe(tokens, scores)
    # Metaspace skips the dummy ▁ when the text already starts with a space; sentencepiece (and Llama/Mistral's
    # own tokenizer.json) always adds it, so " hi" -> "▁▁hi". Match sentencepiece here, the file's reference.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    _add_typed_tokens(backend, tokens, [_CONTROL if sp.is_control(i) else 1 for i in range(n)], byte_level=False)
    piece = {name: sp.id_to_piece(i) if (i := getattr(sp, f"{name}_id")()) >= 0 else None
             for name in ("bos", "eos", "unk", "pad")}
    return backend, {f"{name}_token": p for name, p in piece.items()}


def _add_typed_tokens(backend: Backend, tokens: list[str], types: list[int], byte_level: bool) -> None:
    # Control tokens (<|im_start|>, </s>) must match whole in text and be skippable on decode: special added
    # tokens. In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp mislabel and
    # transformers skips it, so do we. User-defined tokens match whole but are ordinary text on decode.
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
                                if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)])
    vocab = backend.get_vocab(with_added_tokens=True)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                        if kind == _USER_DEFINED and t in vocab])


def _derive_merges(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: every split of a token into two tokens, ranked by the merged token's score
    (best first), else by its id. Ties break exactly as transformers' `generate_merges` does."""
    rank = scores if scores is not None else vocab
    merges = []
    for token, score in rank.items():
        pairs = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE vocabularies are spelled in it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # control bytes and space get the next free code points
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}

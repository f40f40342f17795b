"""Tokenizer: text <-> token ids and the chat prompt for one model, read from an HF directory or a GGUF file.

Everything runs on a `tokenizers.Tokenizer` (Rust) backend. A GGUF file carries no tokenizer.json, only its
vocabulary as metadata, so we rebuild the backend the way transformers' GGUF loader does: parity tests compare
ids against `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, and any deviation would make them disagree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from engine.errors import InvalidRequest
from models.loader import read_gguf_metadata

LONG_TEXT = 16_384  # characters; a longer text takes milliseconds or more to tokenize
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


class Tokenizer:
    """encode/decode/apply_chat_template for one model. Attributes: bos_token_id, eos_token_ids (every id that ends
    generation), add_bos_token (encode prepends BOS), chat_template, vocab_size (added tokens included)."""

    def __init__(self, backend: _Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool = False, chat_template: str | None = None, extra_eos_ids: Sequence[int] = ()):
        self._backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        # Named tokens must be special added tokens, or decode(skip_special_tokens=True) would print them.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None and t not in added]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named)])
        self.bos_token_id = bos_id = None if bos_token is None else backend.token_to_id(bos_token)
        eos_id = None if eos_token is None else backend.token_to_id(eos_token)
        self.eos_token_ids = list(dict.fromkeys([i for i in (eos_id, *extra_eos_ids) if i is not None]))
        # As transformers: a flag rebuilds the post-processor, None keeps tokenizer.json's own one.
        if add_bos_token is not None or backend.post_processor is None:
            _set_post_processor(backend, bos_token if add_bos_token else None, eos_token if add_eos_token else None)
        # Read the flags back from what encode really does, so save_hf_files writes the truth.
        self.add_bos_token = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
        self.add_eos_token = eos_id is not None and backend.encode("").ids[-1:] == [eos_id]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = None

    # ---- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
            return cls.from_gguf_fields(read_gguf_metadata(path))
        if not path.is_dir():
            raise ValueError(f"{path} does not exist; pass a model directory or a .gguf file")
        config = _read_json(path / "tokenizer_config.json")
        model_config = _read_json(path / "config.json")
        generation_config = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            backend, defaults = _Backend.from_file(str(path / "tokenizer.json")), {}
            # transformers 5 ignores tokenizer_config's add_bos/eos_token here: tokenizer.json's post-processor
            # (Llama's prepends <s>) is the one truth, so it is kept as it is.
            add_bos, add_eos = None, False
        elif (path / "tokenizer.model").is_file():
            backend, defaults = _from_sentencepiece_model(path / "tokenizer.model")
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
        return cls(backend, bos_token=token("bos_token"), eos_token=token("eos_token"), unk_token=token("unk_token"),
                   pad_token=token("pad_token"), add_bos_token=add_bos, add_eos_token=add_eos,
                   chat_template=template, extra_eos_ids=stop_ids)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
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
        return cls(backend, bos_token=name["bos"], eos_token=name["eos"], unk_token=name["unknown"],
                   pad_token=name["padding"], add_bos_token=add_bos,
                   add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"))

    # ---- use ----------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        if len(text) > LONG_TEXT:  # the batch call lets go of the GIL: other threads run while it tokenizes
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass plain prompts (chat=False / --no-chat)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        # Like transformers' special_tokens_map: a token the model lacks is undefined (renders empty), not "None".
        named = dict(bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                     pad_token=self.pad_token)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in named.items() if v is not None})
        except jinja2.TemplateError as e:  # the template's raise_exception(): e.g. roles that do not alternate
            raise ValueError(f"the chat template rejected these messages: {e}") from e

    def save_hf_files(self, out_dir: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads as this tokenizer."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out_dir / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "clean_up_tokenization_spaces": False, "chat_template": self.chat_template}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_text(text: str, what: str = "the text") -> None:
    """Refuse what the tokenizer cannot take: a non-string, or a string that is not valid Unicode (a lone UTF-16
    surrogate, as a JSON escape like \\ud800 can produce)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{what} must be a string (got {type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{what} is not valid Unicode: character {e.start} is a lone surrogate "
                             f"(U+{ord(text[e.start]):04X}); send UTF-8 text") from None


def _set_post_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """transformers' update_post_processor: BOS/EOS around every sequence; a token not in the vocab is dropped."""
    bos, eos = (t if t is not None and backend.token_to_id(t) is not None else None for t in (bos, eos))
    single = f"{f'{bos}:0 ' if bos else ''}$A:0{f' {eos}:0' if eos else ''}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _byte_level_bpe(tokens: list[str], merges: list[str] | None) -> _Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp may store a token in plain UTF-8 instead of the byte alphabet; respell it so BPE can reach it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in merges] if merges is not None else _derive_merges(vocab)
    backend = _Backend(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], merges: list[str] | None = None) -> _Backend:
    """transformers' LlamaTokenizer: sentencepiece BPE replayed as HF BPE with byte fallback and a ▁ prefix."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ")) for m in merges] if merges is not None
              else _derive_merges(vocab, dict(zip(tokens, scores))))
    backend = _Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # "first": only the text's start gets the dummy ▁, not each chunk after a special token (legacy=False).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _from_sentencepiece_model(path: Path) -> tuple[_Backend, dict]:
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


def _add_typed_tokens(backend: _Backend, tokens: list[str], types: list[int], byte_level: bool) -> None:
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


def _compile_template(source: str):
    # Same environment as transformers' apply_chat_template, so templates render byte-identically; sandboxed
    # because chat templates come with downloaded models.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # jinja's escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.x templates date the prompt
    return env.from_string(source)


def _as_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e

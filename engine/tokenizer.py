"""Tokenizer: text <-> token ids and the chat prompt for one model, on a `tokenizers.Tokenizer` (Rust) backend
(read from a model's files by the formats wing: tokenizer.json, tokenizer.model or a GGUF's vocabulary)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from engine import wings
from engine.errors import InvalidRequest

LONG_TEXT = 16_384  # characters; a longer text takes milliseconds or more to tokenize


class Tokenizer:
    """encode/decode/apply_chat_template for one model. Attributes: bos_token_id, eos_token_ids (every id that ends
    generation), add_bos_token (encode prepends BOS), chat_template, vocab_size (added tokens included)."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool = False, chat_template: str | None = None, extra_eos_ids: Sequence[int] = ()):
        self.backend = backend
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
        """The tokenizer of a model directory or .gguf file (read by the formats wing)."""
        return wings.need("checkpoints", "reading a tokenizer").load_tokenizer(Path(path))

    # ---- use ----------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        if len(text) > LONG_TEXT:  # the batch call lets go of the GIL: other threads run while it tokenizes
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

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


def _set_post_processor(backend: Backend, bos: str | None, eos: str | None) -> None:
    """transformers' update_post_processor: BOS/EOS around every sequence; a token not in the vocab is dropped."""
    bos, eos = (t if t is not None and backend.token_to_id(t) is not None else None for t in (bos, eos))
    single = f"{f'{bos}:0 ' if bos else ''}$A:0{f' {eos}:0' if eos else ''}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


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

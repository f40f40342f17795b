"""engine.detokenizer: streamed text equals a one-shot decode, stops exactly at stop strings, costs O(1) a token."""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from formats.tokenizers import _sentencepiece_bpe

WORDS = ("the quick brown fox jumps over a lazy dog naïve café 日本語 🙂 emoji 🎉 Здравствуй мир "
         "façade 漢字とひらがな 👨‍👩‍👧 résumé ünïcödé, token. window\n").split(" ")


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def stream(tokenizer, ids, stop=(), skip_special_tokens=True):
    """Feed ids one at a time, taking new text after each; returns the detokenizer and the released pieces."""
    detok = IncrementalDetokenizer(tokenizer, stop=stop, skip_special_tokens=skip_special_tokens)
    pieces = []
    for i in ids:
        detok.add(i)
        assert "\ufffd" not in detok.text  # incomplete characters wait for their next byte
        pieces.append(detok.take_new_text())
        if detok.stopped:
            break
    detok.finish()
    pieces.append(detok.take_new_text())
    return detok, pieces


@pytest.fixture(scope="module")
def smol(smol_dir):
    return Tokenizer.from_path(smol_dir)


@pytest.fixture(scope="module")
def spm():
    """A Llama-style sentencepiece BPE (▁ spaces, byte fallback, decoder strips one leading space), built by the
    engine's own `_sentencepiece_bpe` from merges trained on a few lines."""
    trainer_backend = Backend(models.BPE(unk_token="<unk>"))
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    lines = [random_text(12, seed).encode("latin-1", "ignore").decode("latin-1") for seed in range(200)]
    trainer_backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    model = json.loads(trainer_backend.to_str())["model"]
    trained = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *trained]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    backend = _sentencepiece_bpe(tokens, [0.0] * len(tokens), merges)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_long_multibyte_generation_streams_the_one_shot_decode(smol):
    text = random_text(250)
    ids = smol.encode(text)
    assert len(ids) >= 300
    # Characters really are split across tokens here, so the wait-for-whole-characters path runs.
    assert sum("\ufffd" in smol.decode([i]) for i in ids) > 20
    detok, pieces = stream(smol, ids)
    assert "".join(pieces) == detok.text == smol.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert not detok.stopped


def test_finish_flushes_an_incomplete_character(smol):
    ids = smol.encode("ok 🎉")[:-1]  # the emoji is three tokens: stop before its last byte
    detok = IncrementalDetokenizer(smol)
    for i in ids:
        detok.add(i)
    assert detok.text == "ok" and detok.take_new_text() == "ok"  # the emoji's first bytes wait
    detok.finish()
    assert detok.text == smol.decode(ids) == "ok \ufffd"
    assert detok.take_new_text() == " \ufffd"


@pytest.mark.parametrize("stop", ["café 日本", "🎉 emoji 漢", "\n token", "ünïcödé, wind"])
def test_stop_string_split_across_tokens(smol, stop):
    middle = "naïve café 日本語 🎉 emoji 漢字 résumé ünïcödé, window\n token"
    full = f"{random_text(60, seed=1)} {middle} {random_text(60)}"
    ids = smol.encode(full)
    assert stop in full and not any(stop in smol.decode([i]) for i in ids)
    detok, pieces = stream(smol, ids, stop=["never appears", stop])
    assert detok.stopped
    assert detok.text == full[:full.index(stop)]
    assert "".join(pieces) == detok.text  # no released piece held any of the stop string
    assert not any(stop in "".join(pieces[:k]) for k in range(len(pieces)))
    detok.add(ids[0])  # stopped: further tokens change nothing
    assert detok.text == full[:full.index(stop)] and detok.take_new_text() == ""


def test_earliest_of_several_stop_strings_wins(smol):
    # Both complete with the token " fox"; the one starting first decides where text ends.
    detok, pieces = stream(smol, smol.encode("the quick brown fox jumps"), stop=["own fox", "brown fox"])
    assert detok.stopped and detok.text == "".join(pieces) == "the quick "


def test_stop_prefix_is_held_back_then_released(smol):
    ids = smol.encode("Hello User and more")
    detok = IncrementalDetokenizer(smol, stop=[" User:"])
    released = ""
    for i in ids:
        detok.add(i)
        released += detok.take_new_text()
        if detok.text == "Hello User":
            assert released == "Hello"  # " User" may begin " User:"
    assert not detok.stopped and released == "Hello User and more"
    detok.finish()
    assert detok.text == released + detok.take_new_text() == "Hello User and more"


def test_stop_at_the_very_end_and_hold_at_finish(smol):
    detok, pieces = stream(smol, smol.encode("the answer is 42.</answer>"), stop=["</answer>"])
    assert detok.stopped and detok.text == "".join(pieces) == "the answer is 42."
    # A possible stop-string start is released once the sequence ends without it.
    detok, pieces = stream(smol, smol.encode("the answer is 42.</ans"), stop=["</answer>"])
    assert not detok.stopped and detok.text == "".join(pieces) == "the answer is 42.</ans"


def test_special_tokens_in_sentencepiece_output(spm):
    eos = spm.eos_token_ids[0]
    first, second = spm.encode("the quick fox"), spm.encode("over a lazy dog")
    assert spm.decode([first[-1]]) == "fox"  # the decoder strips the leading ▁ of a decoded string
    for ids in (first + [eos] + second, [eos] + first + [eos, eos] + second + [eos]):
        for skip in (True, False):
            detok, pieces = stream(spm, ids, skip_special_tokens=skip)
            assert "".join(pieces) == detok.text == spm.decode(ids, skip_special_tokens=skip)
    assert spm.decode(first + [eos] + second) == "the quick fox over a lazy dog"


def test_sentencepiece_byte_fallback(spm):
    text = random_text(80, seed=2)
    ids = spm.encode(text)
    assert sum("\ufffd" in spm.decode([i]) for i in ids) > 10  # CJK, Cyrillic, emoji: unseen, so bytes
    detok, pieces = stream(spm, ids)
    assert "".join(pieces) == detok.text == spm.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_cost_per_token_is_independent_of_length(smol):
    ids = smol.encode(random_text(1500, seed=3))[:2000]
    assert len(ids) == 2000
    decoded = 0
    decode = smol.decode

    def counting_decode(token_ids, skip_special_tokens=True):
        nonlocal decoded
        decoded += len(token_ids)
        return decode(token_ids, skip_special_tokens)

    smol.decode = counting_decode
    try:
        detok, _ = stream(smol, ids, stop=["never appears"])
    finally:
        del smol.decode
    assert detok.text == decode(ids)
    assert decoded <= 8 * len(ids)  # decoding every prefix would pass len(ids)**2 / 2 = 2,000,000 ids


def test_stop_must_be_a_list_of_strings(smol):
    with pytest.raises(ValueError, match="non-empty strings"):
        IncrementalDetokenizer(smol, stop="</s>")
    with pytest.raises(ValueError, match="non-empty strings"):
        IncrementalDetokenizer(smol, stop=[""])

"""engine.tokenizer: ids, text and chat prompts identical to HF transformers (and to sentencepiece itself)."""

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from engine.tokenizer import Tokenizer
from formats.tokenizers import gguf_tokenizer, save_hf_files

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

SMOL = Path(__file__).resolve().parents[1] / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "",
    "Hello world",
    "hello world",
    " leading space",
    "trailing space ",
    "   ",
    "two  spaces   three    four",
    "tab\tseparated\t\tvalues",
    "line one\nline two\n\nline four\r\nwindows",
    "def square(x: int) -> int:\n    return x ** 2  # squares\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
    "12345 67890 3.14159 1,000,000 2024-01-31",
    "café naïve façade Ünïcödé résumé",
    "漢字とひらがな、中文测试。",
    "Здравствуй, мир! Γειά σου κόσμε",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "almost <|im_start special but not quite |>",
    "don't won't it's I'm they'll we've",
    "URL https://example.com/a?b=c&d=e#frag",
    "\n\n\n",
    "x" * 200,
    "Mixed\u00a0nbsp\u200bzero width and \u2581 the sentencepiece space",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke\nwith a newline."},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "漢字 🤖"}],
]


def assert_same_as(ours: Tokenizer, ref, texts=TEXTS):
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def assert_same_chat(ours: Tokenizer, ref):
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def write_gguf(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- SmolLM2 (byte-level BPE GGUF) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    if not SMOL.is_file():
        pytest.skip(f"{SMOL} missing: run `make weights` to fetch SmolLM2-135M-Instruct")
    ref = transformers.AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    return Tokenizer.from_path(SMOL), ref


def test_smollm2_gguf_matches_transformers(smol):
    ours, ref = smol
    assert_same_as(ours, ref)
    assert ours.encode("<|im_start|>user")[0] == 1  # control tokens match whole, not as '<', '|', ...
    assert ours.decode([1, 28120, 2]) == "hello"  # and decode drops them


def test_smollm2_special_ids(smol):
    ours, ref = smol
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, [2], 49152)
    assert ours.vocab_size == len(ref)
    assert ours.add_bos_token is False and ours.encode("hi") == ref.encode("hi")


def test_smollm2_chat_template_matches_transformers(smol):
    ours, ref = smol
    assert "<|im_start|>" in ours.chat_template
    assert_same_chat(ours, ref)
    prompt = ours.apply_chat_template(CONVERSATIONS[0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


# Block tags on their own lines, loop controls, tojson on non-ASCII: sensitive to the jinja environment's settings.
JINJA_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = none %}
{%- endif %}
{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant') }}
    {% endif %}
    {% if message['content'] == 'b' %}{% continue %}{% endif %}
    [{{ message['role'] | upper }}] {{ message['content'] | tojson }}
{% endfor %}
{% if system %}(system: {{ system }}){% endif %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ eos_token }}"""


def test_chat_template_environment_matches_transformers(smol):
    _, ref = smol
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.chat_template": JINJA_TEMPLATE}
    ours = gguf_tokenizer(fields)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, chat_template=JINJA_TEMPLATE, tokenize=False,
                                               add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_save_hf_files_round_trip(smol, tmp_path):
    ours, ref = smol
    save_hf_files(ours, tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same_as(ours, reloaded)
    assert_same_chat(ours, reloaded)
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (1, 2)
    again = Tokenizer.from_path(tmp_path)
    assert_same_as(again, ref)
    assert_same_chat(again, ref)
    assert (again.bos_token_id, again.eos_token_ids, again.vocab_size) == (1, [2], 49152)


def test_hf_directory_fallbacks(smol, tmp_path):
    """Ids from config.json / generation_config.json, AddedToken-dict configs, chat_template.jinja precedence."""
    ours, ref = smol
    save_hf_files(ours, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["bos_token"], config["eos_token"]
    config["unk_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text(JINJA_TEMPLATE)
    loaded = Tokenizer.from_path(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.unk_token) == (1, [2, 0], "<|endoftext|>")
    assert loaded.chat_template == JINJA_TEMPLATE
    assert loaded.apply_chat_template(CONVERSATIONS[1]) == ref.apply_chat_template(
        CONVERSATIONS[1], chat_template=JINJA_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert_same_as(loaded, ref, TEXTS[:8])


# ---- a sentencepiece (llama) vocabulary --------------------------------------------------------------------------
SPM_TEXTS = [t for t in TEXTS if "<|" not in t] + ["hello</s>world", "<s> quick fox", "call <tool> now", "ë"]


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    """A Llama-style sentencepiece BPE model (byte fallback, no normalization), as tokenizer.model and as GGUF."""
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog hello world token model engine cache attention window "
             "budget kernel café naïve snap prefill decode 漢字").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}." for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=360, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<tool>"], minloglevel=2)
    directory, gguf_dir = tmp_path_factory.mktemp("spm"), tmp_path_factory.mktemp("spm_gguf")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    kinds[sp.piece_to_id("<tool>")] = 4  # user-defined: matched whole, but plain text on decode
    writer = gguf.GGUFWriter(str(gguf_dir / "tiny.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    # transformers reads a model config from the same file, so it needs the llama shape keys and one tensor.
    for key, value in dict(block_count=1, context_length=64, embedding_length=8, feed_forward_length=16,
                           head_count=2, head_count_kv=2, layer_norm_rms_eps=1e-5, vocab_size=n,
                           rope_dimension_count=4).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    write_gguf(writer)
    return directory, gguf_dir / "tiny.gguf", sp  # apart: transformers would prefer tokenizer.model to the gguf


def test_spm_gguf_matches_transformers(spm_files):
    _, gguf_path, _ = spm_files
    ours = Tokenizer.from_path(gguf_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert_same_as(ours, ref, SPM_TEXTS)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos_token) == (1, [2], True)
    assert ours.encode("hello")[0] == 1 and ours.encode("hello", add_special_tokens=False)[0] != 1
    assert ours.chat_template is None
    assert ours.decode(ours.encode("call <tool> now")) == "call <tool> now"


def test_spm_model_dir_matches_sentencepiece(spm_files):
    directory, _, sp = spm_files
    ours = Tokenizer.from_path(directory)  # the directory holds only tokenizer.model
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, [2], sp.get_piece_size())
    for text in SPM_TEXTS:
        if "<s>" in text or "</s>" in text:  # sentencepiece never matches control tokens in text; HF does
            continue
        if "<tool>" in text:  # sentencepiece's Python API cannot say which pieces are user-defined
            continue
        expected = sp.encode(text)
        assert ours.encode(text) == [1] + expected, text
        assert ours.decode([1] + expected) == sp.decode(expected), text


def test_spm_save_hf_files_round_trip(spm_files, tmp_path):
    _, gguf_path, _ = spm_files
    ours = Tokenizer.from_path(gguf_path)
    save_hf_files(ours, tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same_as(ours, reloaded, SPM_TEXTS)
    assert_same_as(Tokenizer.from_path(tmp_path), reloaded, SPM_TEXTS)
    assert reloaded.encode("hello")[0] == 1  # BOS survives: tokenizer.json's post-processor carries it


# ---- errors a user can cause -------------------------------------------------------------------------------------
def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json and tokenizer\.model"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope")


def test_unknown_gguf_tokenizer_model(tmp_path):
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'.*gpt2, llama"):
        gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]", "a"]})
    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "llama")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "a"])
    write_gguf(writer)
    with pytest.raises(ValueError, match="'t5'"):
        Tokenizer.from_path(tmp_path / "t5.gguf")


def test_chat_template_errors():
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
              "tokenizer.ggml.merges": ["a b"]}
    plain = gguf_tokenizer(fields)
    assert plain.encode("abba") == [2, 1, 0]
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    strict = gguf_tokenizer({**fields, "tokenizer.chat_template": "{{ raise_exception('roles!') }}"})
    with pytest.raises(ValueError, match="roles!"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])

"""formats (loader, gguf, hf, convert): sharded safetensors, GGUF quant types against transformers' GGUF loader,
and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from formats.loader import load_model
from tests.conftest import save_tiny, tiny_hf_model, write_gguf


def test_sharded_directory_loads_identical_tensors(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=False)
    single = load_model(save_tiny(hf, tmp_path / "single"))
    save_tiny(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    sharded = load_model(tmp_path / "sharded")
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dtype_cast_and_tied_head(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    model = load_model(save_tiny(hf, tmp_path), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QUANTS)
def test_gguf_matches_transformers_gguf_loader(qtype, tmp_path):
    """Each quant type: our dequantized, un-permuted weights give the logits transformers gets from the file."""
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype_for=lambda name: qtype)
    ours = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4
    if qtype == "F32":  # lossless: the loader must give back exactly the HF weights (permutation undone)
        assert torch.equal(ours.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)
        assert torch.equal(ours.model.layers[1].self_attn.k_proj.weight, hf.model.layers[1].self_attn.k_proj.weight)


def test_gguf_unsupported_quant_type_names_tensor(tmp_path):
    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512, vocab_size=256)
    path = write_gguf(tmp_path / "t.gguf", hf, qtype_for=lambda n: "TQ1_0" if "down_proj" in n else "F32")
    with pytest.raises(ValueError, match=r"t\.gguf: tensor blk\.0\.ffn_down\.weight uses quantization TQ1_0"):
        load_model(path)


def test_gguf_truncated(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "t.gguf", hf)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.gguf: not a readable GGUF file, truncated or corrupt"):
        load_model(path)


def test_safetensors_truncated(tmp_path):
    save_tiny(tiny_hf_model("llama"), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file, truncated or corrupt"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    hf = tiny_hf_model("llama")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_tiny(hf, tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    hf = tiny_hf_model("llama")
    save_tiny(hf, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has "
                                         r"shape .* the config needs"):
        load_model(tmp_path)


def test_no_weights_and_missing_shard(tmp_path):
    save_tiny(tiny_hf_model("llama"), tmp_path / "m", max_shard_size="40KB")
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    shards[0].unlink()
    with pytest.raises(ValueError, match=f"lists shard {shards[0].name}, which is missing"):
        load_model(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights found"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such model file or directory"):
        load_model(tmp_path / "nope")


def test_convert_command_errors_are_one_line(tmp_path, capsys):
    from formats import convert as convert_gguf

    assert convert_gguf.main([]) == 2
    assert "usage: snapkv-convert IN.gguf OUT_DIR" in capsys.readouterr().err
    assert convert_gguf.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing.gguf'}: no such GGUF file"]

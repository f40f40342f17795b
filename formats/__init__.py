"""formats: where weights come from. HF directories (config.json, safetensors, tokenizer.json or a sentencepiece
tokenizer.model) and GGUF files (config, tensors, int8/int4 blocks, the tokenizer rebuilt from the vocabulary),
and snapkv-convert. Provides the engine's loader of configs, tokenizers and weights (`engine.wings`)."""

from engine import wings
from formats import loader

wings.provide("checkpoints", loader)

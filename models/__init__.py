"""Llama/Mistral networks, their configs and weight loaders (safetensors, GGUF)."""

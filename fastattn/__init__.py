"""fastattn: flash-attn and split-KV decode paths on CUDA (fastattn.paths), registered with models.attention."""

from fastattn.paths import register

register()

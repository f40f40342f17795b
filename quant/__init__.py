"""quant: weight-only int8/int4 layers swapped in for the float ones at load (`--weights-dtype`, quant.store) and
the int8 KV cache (`--kv-dtype int8`), which it provides to the engine (`engine.wings`)."""

from engine import wings
from quant.kv_int8 import Int8KVCache

wings.provide("kv_int8", Int8KVCache)

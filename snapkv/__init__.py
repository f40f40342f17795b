"""SnapKV: choose, per layer and kv head, which prompt entries the KV cache keeps. No model code here."""

from snapkv.config import SnapKVConfig
from snapkv.policies import (TOVA, AdaKV, FullCache, KeyNorm, PyramidKV, SelectionPolicy, SnapKV, StreamingLLM,
                             make_policy)
from snapkv.select import snapkv_scores, snapkv_select

__all__ = ["SnapKVConfig", "SelectionPolicy", "FullCache", "StreamingLLM", "SnapKV", "AdaKV", "PyramidKV", "TOVA",
           "KeyNorm", "make_policy", "snapkv_scores", "snapkv_select"]

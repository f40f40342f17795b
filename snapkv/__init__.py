"""SnapKV: choose, per layer and kv head, which prompt entries the KV cache keeps. No model code here."""

from snapkv.alternatives import TOVA, AdaKV, KeyNorm, PyramidKV, StreamingLLM
from snapkv.config import SnapKVConfig
from snapkv.policies import FullCache, SelectionPolicy, SnapKV, make_policy
from snapkv.select import snapkv_scores

__all__ = ["SnapKVConfig", "SelectionPolicy", "FullCache", "StreamingLLM", "SnapKV", "AdaKV", "PyramidKV", "TOVA",
           "KeyNorm", "make_policy", "snapkv_scores"]

"""The selection policies SnapKV is compared with, behind the same interface (snapkv.policies): `streaming`
(StreamingLLM: attention sinks + the most recent tokens), `adakv` and `pyramidkv` (SnapKV's votes with per-head or
per-layer budgets, snapkv.allocation), `tova` (the last token's attention) and `keynorm` (the lowest key norms)."""

from __future__ import annotations

import math

import torch

from snapkv.allocation import ADAKV_CAP, adakv_mask, mask_positions, pyramid_budgets
from snapkv.config import SnapKVConfig
from snapkv.policies import POLICY_CLASSES, Compressing, SnapKV
from snapkv.select import snapkv_scores


class StreamingLLM(Compressing):
    def choose(self, q, k, budget):
        b, hkv, t, _ = k.shape
        sinks = self.cfg.sinks
        idx = torch.cat([torch.arange(sinks, device=k.device), torch.arange(t - budget + sinks, t, device=k.device)])
        return idx.expand(b, hkv, budget)


class PyramidKV(SnapKV):
    def __init__(self, cfg: SnapKVConfig, num_layers: int = 1, sliding_window: int | None = None):
        super().__init__(cfg, num_layers, sliding_window)
        w = cfg.window
        self.budgets = [w + n for n in pyramid_budgets(cfg.budget - w, num_layers)]

    def layer_budget(self, layer: int) -> int:
        return self.budgets[layer]


class AdaKV(SnapKV):
    def most_per_head(self) -> int:
        w = self.cfg.window
        return w + int(ADAKV_CAP * (self.cfg.budget - w))

    def choose(self, q, k, budget):
        scores = self.with_sinks(snapkv_scores(q, k, self.cfg))
        picks = mask_positions(adakv_mask(scores, budget - self.cfg.window))
        # each row: its picks (then -1 padding), the window moved in front of the padding
        window = self.window_positions(k, picks.shape[:2])
        keep = torch.cat([picks, window], dim=-1)
        return keep.gather(-1, torch.sort((keep < 0).to(torch.int8), dim=-1, stable=True).indices)


class TOVA(Compressing):
    """Oren et al.: the last prompt token's attention, averaged over all query heads of the layer, ranks every
    position (one choice for all kv heads of the layer, as in the paper and kvpress); the last token stays."""

    queries_needed = 1

    def choose(self, q, k, budget):
        b, hkv, t, d = k.shape
        group = q.shape[1] // hkv
        last = q[:, :, -1:].float().view(b, hkv, group, d)
        attention = (torch.einsum("bhgd,bhtd->bhgt", last, k.float()) / math.sqrt(d)).softmax(dim=-1)
        scores = attention.mean(dim=(1, 2))[:, None].expand(b, hkv, t).clone()
        scores[..., -1] = float("inf")
        return self.top(scores, budget)


class KeyNorm(Compressing):
    """Devoto et al. (kvpress's KnormPress): keys with the smallest L2 norm draw the most attention; keep those."""

    def choose(self, q, k, budget):
        return self.top(-k.float().norm(dim=-1), budget)


POLICY_CLASSES.update(streaming=StreamingLLM, adakv=AdaKV, pyramidkv=PyramidKV, tova=TOVA, keynorm=KeyNorm)

"""What SnapKV kept, for people: the kept data as JSON, and the self-contained HTML page (plus a PNG heatmap)
that `snapkv-run --show-kept` writes. The page is drawn by web/kept_view.js, the same script the server's page
at / uses, inlined here with the JSON, so the static file and the live page draw the same thing. Input is the
per-layer kept positions that `LLM.generate(..., return_kept=True)` returns. A front-end module beside cli.py:
the snapkv/ package stays pure tensor code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import web

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>What SnapKV kept</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; }}
{css}</style></head><body>
<h1>What SnapKV kept</h1>
<div id="kept"><noscript>This page draws the kept view with JavaScript; the data is in the kept-data element
below.</noscript></div>
<script type="application/json" id="kept-data">{data}</script>
<script>
{script}</script>
<script>KeptView.render(document.getElementById("kept"),
                        JSON.parse(document.getElementById("kept-data").textContent));</script>
</body></html>
"""


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """The text each token adds. Decoding with a little left context keeps multi-byte characters whole."""
    pieces = []
    for i in range(len(ids)):
        start = max(0, i - 8)
        before = decode(list(ids[start:i]))
        pieces.append(decode(list(ids[start:i + 1]))[len(before):])
    return pieces


def runs(positions: Sequence[int]) -> list[list[int]]:
    """Sorted positions as half-open [start, end) runs: [0, 1, 2, 7] -> [[0, 3], [7, 8]]."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def kept_data(tokenizer, prompt_ids: Sequence[int], kept: Sequence[torch.Tensor],
              completion_ids: Sequence[int] = (), stats: dict | None = None) -> dict:
    """The JSON the kept view draws (and the server sends as `snapkv.kept`): the prompt's tokens, and per layer
    and kv head the kept prompt positions as [start, end) runs; the memory the request held against the full
    cache's, and the answer's token ids (what a comparison of two answers needs)."""
    stats = stats or {}
    rows = [[runs(sorted(row[row >= 0].tolist())) for row in layer] for layer in kept]
    return {"prompt_tokens": len(prompt_ids), "layers": len(kept), "kv_heads": int(kept[0].shape[0]),
            "token_ids": list(prompt_ids),
            "tokens": token_pieces(lambda ids: tokenizer.decode(ids, skip_special_tokens=False), prompt_ids),
            "runs": rows, "completion_token_ids": list(completion_ids),
            "kv_bytes": stats.get("kv_bytes"), "full_kv_bytes": stats.get("full_kv_bytes")}


def layer_shares(data: dict) -> np.ndarray:
    """[layers, prompt_tokens]: per layer, the share of kv heads that kept each prompt position."""
    shares = np.zeros((data["layers"], data["prompt_tokens"]))
    for layer, heads in enumerate(data["runs"]):
        for head in heads:
            for start, end in head:
                shares[layer, start:end] += 1
    return shares / data["kv_heads"]


def render_page(data: dict) -> str:
    # "<" escaped inside the JSON, so no "</script>" in the document can end the data element early
    embedded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return PAGE.format(css=web.read("kept_view.css"), data=embedded, script=web.read("kept_view.js"))


def render_heatmap(shares: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length = shares.shape
    fig, ax = plt.subplots(figsize=(min(18, 4 + length / 150), 2 + layers / 6))
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("prompt position")
    ax.set_ylabel("layer")
    ax.set_title("Share of kv heads that kept each prompt position")
    fig.colorbar(image, ax=ax, label="kept share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_kept_report(path: str | Path, data: dict) -> tuple[Path, Path]:
    """Write PATH (HTML) and PATH with a .png suffix (heatmap) from kept_data's JSON; returns both paths."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(data), encoding="utf-8")
    png = path.with_suffix(".png")
    render_heatmap(layer_shares(data), png)
    return path, png


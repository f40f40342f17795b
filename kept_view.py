"""What SnapKV kept, for people: a self-contained HTML page of the prompt, each token shaded by the share of
(layer, kv head) pairs that kept it, and a PNG heatmap of layers x prompt positions (matplotlib). Input is the
per-layer kept positions that `LLM.generate(..., return_kept=True)` returns. A front-end module beside cli.py:
the snapkv/ package stays pure tensor code."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Sequence

import torch

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>What SnapKV kept</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; line-height: 1.6; }}
.prompt {{ font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }}
.prompt span {{ border-radius: 2px; }}
.legend span {{ padding: 0 0.6em; }}
</style></head><body>
<h1>What SnapKV kept</h1>
<p>{summary}</p>
<p class="legend">share of (layer, kv head) pairs that kept a token:
<span style="background: rgba(255,140,0,0)">0%</span><span style="background: rgba(255,140,0,0.25)">25%</span>
<span style="background: rgba(255,140,0,0.5)">50%</span><span style="background: rgba(255,140,0,0.75)">75%</span>
<span style="background: rgba(255,140,0,1)">100%</span></p>
<div class="prompt">{tokens}</div>
</body></html>
"""


def kept_fractions(kept: Sequence[torch.Tensor], prompt_len: int) -> torch.Tensor:
    """[layers, prompt_len]: per layer, the share of kv heads whose kept positions include each prompt position."""
    rows = []
    for layer in kept:
        hits = torch.zeros(layer.shape[0], prompt_len + 1)  # the last column takes the -1 padding of short rows
        hits.scatter_(1, layer.long().masked_fill(layer < 0, prompt_len), 1.0)
        rows.append(hits[:, :prompt_len].mean(0))
    return torch.stack(rows)


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """The text each token adds. Decoding with a little left context keeps multi-byte characters whole."""
    pieces = []
    for i in range(len(ids)):
        start = max(0, i - 8)
        before = decode(list(ids[start:i]))
        pieces.append(decode(list(ids[start:i + 1]))[len(before):])
    return pieces


def render_html(pieces: Sequence[str], share: torch.Tensor, summary: str) -> str:
    spans = []
    for pos, (piece, s) in enumerate(zip(pieces, share.tolist())):
        text = html.escape(piece).replace("\n", "\u21b5\n")
        spans.append(f'<span style="background: rgba(255,140,0,{s:.2f})" title="position {pos}: kept by '
                     f'{s:.0%}">{text}</span>')
    return PAGE.format(summary=html.escape(summary), tokens="".join(spans))


def render_heatmap(fractions: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length = fractions.shape
    fig, ax = plt.subplots(figsize=(min(18, 4 + length / 150), 2 + layers / 6))
    image = ax.imshow(fractions.numpy(), aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("prompt position")
    ax.set_ylabel("layer")
    ax.set_title("Share of kv heads that kept each prompt position")
    fig.colorbar(image, ax=ax, label="kept share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_kept_report(path: str | Path, tokenizer, prompt_ids: Sequence[int],
                      kept: Sequence[torch.Tensor]) -> tuple[Path, Path]:
    """Write PATH (HTML) and PATH with a .png suffix (heatmap); returns both paths."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    fractions = kept_fractions(kept, len(prompt_ids))
    share = fractions.mean(0)
    kept_per_head = kept[0].shape[1]
    summary = (f"{len(prompt_ids)} prompt tokens; {kept_per_head} kept per layer and kv head "
               f"({len(prompt_ids) / kept_per_head:.2f}x compression) over {len(kept)} layers x "
               f"{kept[0].shape[0]} kv heads. Hover a token to see its share.")
    pieces = token_pieces(lambda ids: tokenizer.decode(ids, skip_special_tokens=False), prompt_ids)
    path.write_text(render_html(pieces, share, summary), encoding="utf-8")
    png = path.with_suffix(".png")
    render_heatmap(fractions, png)
    return path, png

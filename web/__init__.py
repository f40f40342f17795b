"""The page snapkv-serve shows at `/`: plain HTML, CSS and JavaScript shipped in the package, no build step,
nothing fetched from another host. index.html and page.js are the chat (a document, questions, answers streamed
from /v1/chat/completions, the full-cache-against-SnapKV comparison, visible errors); kept_view.js and
kept_view.css draw what SnapKV kept, here and in the file `snapkv-run --show-kept` writes (kept_view.py)."""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent
# what the server hands out under /web/, with its media type (nothing else in this folder is served)
ASSETS = {"page.js": "text/javascript", "page.css": "text/css", "kept_view.js": "text/javascript",
          "kept_view.css": "text/css"}


def read(name: str) -> str:
    return (DIR / name).read_text(encoding="utf-8")

"""The seam through which wings add to the engine. The core names no wing: a wing provides what it adds here when
it is imported (formats: loading checkpoints; quant: the int8 KV cache; parallel: tensor-parallel ranks;
sessions: chat sessions), and the installed wings are imported through the `snapkv.wings` entry points
(pyproject.toml) the first time an engine needs one."""

from __future__ import annotations

from importlib.metadata import entry_points

PROVIDED: dict[str, object] = {}
_loaded = False


def provide(name: str, part: object) -> None:
    PROVIDED[name] = part


def load_installed() -> None:
    """Import every installed wing (once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for entry in entry_points(group="snapkv.wings"):
            entry.load()


def need(name: str, what: str):
    """What the wing that provides `name` registered; a clear error if no installed wing does."""
    if name not in PROVIDED:
        load_installed()
    if name not in PROVIDED:
        raise ValueError(f"{what} needs the wing that provides {name!r}, which is not installed: install this "
                         "package (pip install -e .) or import its wing")
    return PROVIDED[name]

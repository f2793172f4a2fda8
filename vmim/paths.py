"""Host paths: which lies inside which."""

from __future__ import annotations


def is_under(path: str, top: str) -> bool:
    """path is top or lies below it (both absolute and normalised: no symlink is resolved)."""
    return path == top or path.startswith(top.rstrip("/") + "/")

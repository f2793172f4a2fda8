"""Text output of the fleet's client: the few helpers it needs, kept here so that the fleet
does not depend on where the command line keeps its own."""

from __future__ import annotations

from typing import Sequence, TextIO

PROG = "vmimagemanager"


def safe(text: str) -> str:
    """A name as it can be printed: undecodable bytes as \\x escapes, newlines escaped."""
    return (text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            .replace("\n", "\\n"))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    for r in [list(headers), *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")

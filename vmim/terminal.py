"""What reaches the admin's terminal and logs, made text at one depth. Names and lines come
from guests (file names), from local users (the command line of a lock's holder) and from the
fleet (a worker's report, anything that can publish to a client's reply queue): a terminal
takes their controls for commands (an OSC 52 sequence writes the clipboard, others retitle,
hide or rewrite what is shown), and a newline in them would start a line of its own.

- `EscapingStream` wraps stdout and stderr for a whole run (vmim.frontend): every control but
  newline and tab is written as a \\x escape, whatever code path wrote it.
- `safe()` is for one-line fields (a table's cell, a plan's step): newlines escaped too.
- `OneLineRecord` is every log record (vmim.frontend.setup_logging installs it): its message
  is one line whatever it quotes, and the lines of its traceback are indented under it, so a
  line that starts in the first column is always the first line of a record."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
from typing import Any, Iterable, Iterator, TextIO

#: what a terminal takes for a command, not text: C0 controls but newline and tab, DEL, C1
#: (0x9b is a CSI)
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]
             if chr(c) not in "\n\t"}
#: and Unicode's bidirectional overrides and isolates, which make a terminal show the text
#: after them in another order than it is ("Trojan Source"): a guest's file name holding
#: U+202E would reverse the rest of a warning's line
_CONTROLS.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]})
#: any of them, newline and tab too: what a name (a host's, a box's) never holds
CONTROL_CHARACTER = re.compile("[\n\t" + "".join(map(chr, _CONTROLS)) + "]")
CONTINUATION = "  "  # what a record's lines after its first begin with


def undecodable_escaped(text: str) -> str:
    """Bytes that were not UTF-8 (in names from the command line or the disk) as \\x escapes,
    and so are terminal controls other than newline and tab (ESC, BEL, CR, CSI...)."""
    return text.encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace").translate(_CONTROLS)


def safe(text: str) -> str:
    """A value as one line of text: undecodable bytes and controls as \\x escapes, newlines
    as \\n."""
    return undecodable_escaped(text).replace("\n", "\\n")


class EscapingStream:
    """A text stream that writes what it is given with its controls escaped (newline and tab
    kept). The wrapped stream is `unescaped`, for the one writer that means a control: the
    progress line's carriage return."""

    def __init__(self, stream: TextIO):
        self.unescaped = stream

    def write(self, text: str) -> int:
        self.unescaped.write(undecodable_escaped(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self.unescaped, name)


def escaping(stream: TextIO) -> TextIO:
    """stream, escaping (once)."""
    if isinstance(stream, EscapingStream):
        return stream
    return EscapingStream(stream)  # type: ignore[return-value]


def unescaped(stream: TextIO) -> TextIO:
    """The stream under an EscapingStream (progress writes its carriage return there)."""
    return getattr(stream, "unescaped", stream)


@contextlib.contextmanager
def escaped_stderr() -> Iterator[None]:
    """sys.stderr escaping for the time of a run: tracebacks, warnings, every write."""
    saved = sys.stderr
    sys.stderr = wrapped = escaping(saved)
    try:
        yield
    finally:
        if sys.stderr is wrapped:  # not replaced since (a test's capture, a run in a thread)
            sys.stderr = saved


def continuation(text: str) -> str:
    """Lines after a record's first, indented under it (and escaped)."""
    return "\n".join(CONTINUATION + undecodable_escaped(line)
                     for line in text.rstrip("\n").split("\n"))


class OneLineRecord(logging.LogRecord):
    """A log record whose message is one line (newlines and controls escaped) and whose
    traceback, when it has one, is indented: whatever formatter or handler writes it, a
    client's text (a routing key, a field's value) cannot forge a line of the log."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.exc_info and self.exc_info[0] is not None:
            # formatters use exc_text when it is set: the traceback as our lines
            self.exc_text = continuation("".join(traceback.format_exception(*self.exc_info)))
        if self.stack_info:
            self.stack_info = continuation(self.stack_info)

    def getMessage(self) -> str:
        return safe(super().getMessage())


def one_line_records() -> None:
    """Every log record of this process a OneLineRecord."""
    if logging.getLogRecordFactory() is not OneLineRecord:
        logging.setLogRecordFactory(OneLineRecord)

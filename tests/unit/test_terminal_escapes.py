"""A guest's file names reach the terminal of the admin who runs vmimagemanager: in errors
(cpio's files of 4 GiB or more are named), in the lines of commands, in a fleet worker's lines.
A name may hold ESC, BEL, CSI (0x9b) and other controls: an OSC 52 sequence writes the admin's
clipboard, others retitle, hide or rewrite what is shown. Every message goes out with controls
as \\x escapes (newlines and tabs kept), whatever its source."""

from __future__ import annotations

import io
import os

import pytest

from vmim import frontend, terminal
from vmim.archive.cpio import CpioFormat
from vmim.errors import VmimError

HOSTILE = "evil\x1b]52;c;cm0gLXJmIC8K\x07\x1b[2K\r\x9b31m\x7f"


def test_messages_escape_terminal_controls():
    shown = terminal.undecodable_escaped(f"line one {HOSTILE}\n\tline two\n")
    assert not any(c in shown for c in "\x1b\x07\r\x9b\x7f")
    assert "\\x1b]52;c;" in shown and "\\x9b" in shown
    assert shown.endswith("\n\tline two\n")


def test_bidirectional_overrides_are_escaped_too():
    """U+202E makes a terminal show the rest of the line reversed ("Trojan Source")."""
    shown = terminal.safe("tar: ./\u202etxt.exe: Warning \u2066x\u2069")
    assert not any(c in shown for c in "\u202e\u2066\u2069")
    assert "\\u202e" in shown and "\\u2066" in shown
    assert terminal.CONTROL_CHARACTER.search("host\u202e1")
    assert terminal.safe("é ü 日本") == "é ü 日本"  # other text is text


@pytest.mark.skipif(os.geteuid() != 0, reason="the cpio store's survey runs in the sandbox")
def test_a_guest_name_in_an_error_reaches_stderr_escaped(tmp_path, monkeypatch):
    """cpio's refusal names the guest's files of 4 GiB or more, as the guest named them."""
    with open(tmp_path / HOSTILE, "wb") as fh:
        fh.truncate(5 << 30)  # sparse
    with pytest.raises(VmimError) as info:
        CpioFormat("bzip2", "cpio.bz2").check_tree(str(tmp_path), "extract of box 'b1'")
    assert "\x1b" in str(info.value)  # the name as it is (the JSON document keeps it)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)

    def fails():
        raise info.value

    assert frontend.run_invocation(fails, io.StringIO()) == info.value.exit_code
    assert "\x1b" not in err.getvalue() and "\x07" not in err.getvalue()
    assert "\\x1b]52;c;" in err.getvalue()
    os.unlink(tmp_path / HOSTILE)

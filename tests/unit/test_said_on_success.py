"""What a command says on its way to success (GNU tar, rsync, cpio exit 0 after warning) is
logged as warnings — under the box it ran for, so that with -j the admin knows which slot a
warning is about."""

from __future__ import annotations

import logging
import tempfile
import threading
from typing import IO

from vmim import stages


def said(text: str) -> IO[bytes]:
    err = tempfile.TemporaryFile()
    err.write(text.encode())
    return err


def test_a_warning_is_logged_under_the_box_of_its_thread(caplog):
    caplog.set_level(logging.WARNING)

    def run(box: str) -> None:
        with stages.box_context(box):
            stages.said_on_success(["/usr/bin/tar", "-x"],
                                   said(f"/usr/bin/tar: ./etc/{box}: Cannot set ACL\n"))

    threads = [threading.Thread(target=run, args=(b,)) for b in ("web1", "web2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stages.said_on_success(["rsync"], said("rsync: outside any box\n"))
    lines = sorted(r.getMessage() for r in caplog.records)
    assert lines == ["box web1: tar: ./etc/web1: Cannot set ACL",
                     "box web2: tar: ./etc/web2: Cannot set ACL",
                     "rsync: outside any box"], lines


def test_more_than_ten_lines_are_counted_under_the_box(caplog):
    caplog.set_level(logging.WARNING)
    with stages.box_context("db1"):
        stages.said_on_success(["cpio"], said("".join(f"cpio: w{i}\n" for i in range(12))))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and lines[-1] == "box db1: cpio: (2 more lines like these)", lines
    assert all(line.startswith("box db1: cpio: ") for line in lines), lines

"""gzip images are decompressed by igzip (ISA-L) where it is installed: it must read what pigz
reads and refuse what pigz refuses, the proof and the unpack alike (both use it)."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

from vmim.archive import decompressor

DATA = b"member one\n" * 1000
MORE = b"member two\n" * 1000


def _streams():
    one, two = gzip.compress(DATA), gzip.compress(MORE)
    bad = bytearray(one)
    bad[len(bad) // 2] ^= 0xFF
    return {
        "one member": one,
        "concatenated members": one + two,
        "truncated": one[: len(one) // 2],
        "damaged": bytes(bad),
        "bytes after the last member": one + b"garbage\n",
        "empty": b"",
        "not gzip": b"plain text, not gzip\n",
    }


def _run(argv, data):
    r = subprocess.run(argv, input=data, capture_output=True)
    return r.returncode != 0, r.stdout if r.returncode == 0 else None


@pytest.mark.skipif(not (shutil.which("igzip") and shutil.which("pigz")),
                    reason="needs igzip (Debian: isal) and pigz")
@pytest.mark.parametrize("case", list(_streams()))
def test_igzip_reads_and_refuses_what_pigz_does(case):
    data = _streams()[case]
    assert _run(["igzip", "-dc"], data) == _run(["pigz", "-dc"], data)


@pytest.mark.skipif(not shutil.which("igzip"), reason="needs igzip (Debian: isal)")
def test_igzip_is_the_gzip_decompressor_where_installed():
    argv = decompressor("gzip")
    assert argv[0] == "igzip"
    assert _run(argv, gzip.compress(DATA) + gzip.compress(MORE)) == (False, DATA + MORE)

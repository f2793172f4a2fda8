"""Image digests: BLAKE3 for new archives, the sha256 of 1.0 images still checked."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import pytest

from vmim import digest
from vmim.errors import StateError


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "golden"
    path.write_bytes(b"an archive, " * 100_000)
    return path


def test_the_sha256_of_a_file_is_hashlibs(image):
    assert digest.of_file(str(image), "sha256") == hashlib.sha256(image.read_bytes()).hexdigest()


def test_blake3_of_a_whole_file_equals_the_streamed_digest(image):
    pytest.importorskip("blake3")
    h = digest.new("blake3")
    data = image.read_bytes()
    for i in range(0, len(data), 1 << 16):
        h.update(data[i:i + (1 << 16)])
    assert digest.tagged(h) == f"blake3:{digest.of_file(str(image), 'blake3')}"
    assert digest.preferred() == "blake3"


def test_a_tagged_digest_becomes_the_metadata_key_of_its_algorithm():
    assert digest.as_meta("blake3:ab12") == {"blake3": "ab12"}
    assert digest.as_meta("sha256:cd34") == {"sha256": "cd34"}
    assert digest.as_meta("ef56") == {"sha256": "ef56"}  # a bare hex is a sha256, as 1.0 gave


def test_an_image_with_the_sha256_of_1_0_is_proven_by_it(image):
    meta = {"format": "tar.zst", "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}
    assert digest.check_recorded(str(image), meta, "image 'golden'") is True


def test_a_digest_mismatch_refuses_the_image_with_exit_4(image):
    meta = {"sha256": hashlib.sha256(b"another image").hexdigest()}
    with pytest.raises(StateError) as exc:
        digest.check_recorded(str(image), meta, "image 'golden'")
    assert exc.value.exit_code == 4
    assert "image 'golden' is corrupt" in str(exc.value)
    assert "sha256 digest differs" in str(exc.value) and "not touched" in str(exc.value)


def test_blake3_is_checked_before_sha256(image):
    pytest.importorskip("blake3")
    right = digest.of_file(str(image), "blake3")
    meta = {"blake3": right, "sha256": "0" * 64}  # a wrong sha256 is not what is checked
    assert digest.check_recorded(str(image), meta, "image 'golden'") is True
    with pytest.raises(StateError, match="blake3 digest differs"):
        digest.check_recorded(str(image), {"blake3": "0" * 64}, "image 'golden'")


def test_no_digest_recorded_leaves_the_proof_to_a_full_read(image):
    assert digest.check_recorded(str(image), None, "image 'golden'") is False
    assert digest.check_recorded(str(image), {"format": "tgz"}, "image 'golden'") is False


def test_a_blake3_digest_without_the_blake3_package_falls_back_with_a_warning(
        image, monkeypatch, caplog):
    monkeypatch.setattr(digest, "_blake3", None)  # a host where the package is not installed
    assert digest.preferred() == "sha256"
    with caplog.at_level(logging.WARNING, logger="vmim.digest"):
        assert digest.check_recorded(str(image), {"blake3": "0" * 64}, "image 'g'") is False
    assert "blake3" in caplog.text and "full read" in caplog.text
    h = digest.new()
    h.update(b"x")
    assert digest.tagged(h) == f"sha256:{hashlib.sha256(b'x').hexdigest()}"


def test_a_check_in_its_own_thread_answers_whether_the_digest_matches(image):
    algorithm = digest.preferred()
    right = digest.of_file(str(image), algorithm)
    assert digest.Check(str(image), algorithm, right).matches() is True
    assert digest.Check(str(image), algorithm, "0" * 64).matches() is False
    # a file that cannot be read is no match (the caller proves the image again, says why)
    assert digest.Check(str(image) + ".gone", algorithm, right).matches() is False


def test_a_check_called_off_stops_between_its_pieces(image):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(digest.Cancelled):
        digest.of_file(str(image), digest.preferred(), cancel)
    right = digest.of_file(str(image), digest.preferred())
    check = digest.Check(str(image), digest.preferred(), right)
    assert check.cancel() is True
    check._thread.join(1)
    assert not check._thread.is_alive()
    # called off before its end: no answer, so no match; after: the right digest matches
    cancelled = isinstance(check._error, digest.Cancelled)
    assert check.matches() is (not cancelled)


def test_a_check_whose_read_hangs_is_left_behind_after_a_bounded_wait(tmp_path, monkeypatch,
                                                                      caplog):
    """The end of a run waits CANCEL_WAIT for a check it called off, not for ever: a read of
    the image that hangs (a FIFO with no writer stands for a store on a dead NFS server)
    leaves the daemon thread behind, with a warning; it ends when the read returns."""
    monkeypatch.setattr(digest, "CANCEL_WAIT", 0.2)
    fifo = tmp_path / "image"
    os.mkfifo(fifo)
    check = digest.Check(str(fifo), digest.preferred(), "0" * 64)
    started = time.monotonic()
    assert check.cancel() is False
    assert 0.2 <= time.monotonic() - started < 5
    assert "did not stop within" in caplog.text
    assert check._thread.is_alive() and check._thread.daemon
    with open(fifo, "wb"):  # the read returns: the thread sees it was called off and ends
        pass
    check._thread.join(5)
    assert not check._thread.is_alive()
    assert isinstance(check._error, digest.Cancelled)

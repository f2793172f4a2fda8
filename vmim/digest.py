"""Image digests: what the store records for an archive and what a restore checks it against.

New archives are hashed with BLAKE3 (the `blake3` package: SIMD, and several threads when it
reads a whole file) as they are written; a restore proves them by it in a fraction of the
time of sha256. Images stored by 1.0 carry a sha256 and still verify by it. Where the
`blake3` package is missing, new archives get a sha256, and an image that carries only a
BLAKE3 digest is proven by a full read of its structure instead (with a warning).

The metadata key names the algorithm: {"blake3": HEX} or {"sha256": HEX}. A digest passed
around in the program is "ALGORITHM:HEX" (`tagged`); a bare HEX is a sha256 (as 1.0 wrote it).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import threading
from typing import Any, Dict, Optional, Tuple

from vmim import signals
from vmim.errors import StateError

log = logging.getLogger(__name__)

_blake3: Any
try:  # a kept library (PyPI: blake3); without it everything still works with sha256
    import blake3 as _blake3_module

    _blake3 = _blake3_module
except ImportError:  # pragma: no cover - depends on the host
    _blake3 = None

#: the metadata keys of the digests this tool knows, the one preferred for checking first
ALGORITHMS = ("blake3", "sha256")
#: bytes read per step when hashing a whole file
CHUNK = 4 * 1024 * 1024


def available(algorithm: str) -> bool:
    return algorithm == "sha256" or (algorithm == "blake3" and _blake3 is not None)


def preferred() -> str:
    """The algorithm new archives are hashed with."""
    return "blake3" if available("blake3") else "sha256"


def new(algorithm: Optional[str] = None) -> Any:
    """A hasher (update(), hexdigest(), name) for streaming data through, single-threaded: the
    data passes in 1 MiB pieces, on its way to the file, while both cores compress."""
    algorithm = algorithm or preferred()
    if algorithm == "blake3":
        assert _blake3 is not None
        return _blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest {algorithm!r}")


def tagged(hasher: Any) -> str:
    """'ALGORITHM:HEX' of a hasher made by new()."""
    name = "blake3" if _blake3 is not None and isinstance(hasher, _blake3.blake3) else "sha256"
    return f"{name}:{hasher.hexdigest()}"


def split(value: str) -> Tuple[str, str]:
    """(algorithm, hex) of a tagged digest; a bare hex is a sha256."""
    algorithm, sep, hexdigest = value.partition(":")
    return (algorithm, hexdigest) if sep else ("sha256", value)


def as_meta(value: str) -> Dict[str, str]:
    """The metadata entry for a tagged digest: {"blake3": HEX} or {"sha256": HEX}."""
    algorithm, hexdigest = split(value)
    return {algorithm: hexdigest}


def of_file(path: str, algorithm: str, cancel: Optional[threading.Event] = None) -> str:
    """The hex digest of a whole file, read in CHUNK pieces into one buffer (memory stays
    flat: mapping the whole file would count all of it in the RSS). BLAKE3 hashes each piece
    on every core. With cancel: Cancelled once it is set (checked between the pieces).

    The buffer is anonymous memory of its own, page-aligned: a bytearray of this size is
    malloc'd 16 bytes into its page, and the kernel's copy from the page cache into such a
    buffer ran at a fifth of its speed on these machines (596 MB: 0.31-0.37 s against 0.06 s
    page-aligned, the whole digest 0.52 s against 0.19 s; bench/restore.py, 2026-12-07)."""
    if algorithm == "blake3":
        assert _blake3 is not None
        h = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
    else:
        h = new(algorithm)
    with mmap.mmap(-1, CHUNK) as buf, memoryview(buf) as view, \
            open(path, "rb", buffering=0) as fh, signals.waiting():
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(path)
            n = fh.readinto(view)
            if not n:
                return str(h.hexdigest())
            with view[:n] as piece:
                h.update(piece)


class Cancelled(Exception):
    """A Check was called off (the run ended before it needed the answer)."""


class Check:
    """The digest of a file checked in a thread of its own, so that the run can prepare what
    changes nothing meanwhile (map and mount the slot, read its filesystem, try its re-make:
    vmim.steps.proof.verify). `matches()` waits for the answer; `cancel()` calls it off. A
    signal never lands in the thread: the main thread waits for it inside signals.waiting()."""

    def __init__(self, path: str, algorithm: str, expected: str) -> None:
        self.path, self.algorithm, self.expected = path, algorithm, expected
        self._cancel = threading.Event()
        self._done = threading.Event()  # waited on, not the thread (join: bpo-45274 in 3.9)
        self._found: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="vmim-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._found = of_file(self.path, self.algorithm, self._cancel)
        except BaseException as exc:  # noqa: BLE001 — given to the thread that asks
            self._error = exc
        finally:
            self._done.set()

    def matches(self) -> bool:
        """Wait for the digest: True when it is the expected one; False when it differs or
        the file could not be read (the caller proves the image again, and says why)."""
        with signals.waiting():
            self._done.wait()
        if self._error is not None:
            log.debug("the digest of %s could not be computed: %s", self.path, self._error)
            return False
        return self._found == self.expected

    def cancel(self) -> bool:
        """Call the check off and wait for its thread (one CHUNK of hashing, unless the read
        of the image hangs: then the run ends without it, a daemon thread). True when it
        ended."""
        self._cancel.set()
        if self._done.wait(CANCEL_WAIT):
            return True
        log.warning("the digest check of %s did not stop within %d s: left behind", self.path,
                    CANCEL_WAIT)
        return False


#: how long the end of a run waits for a digest check it called off
CANCEL_WAIT = 10


def recorded(meta: Optional[Dict[str, Any]]) -> Optional[Tuple[str, str]]:
    """(algorithm, hex) of the digest in an image's metadata that this host can check, the
    preferred one first; None when there is none."""
    for algorithm in ALGORITHMS:
        value = (meta or {}).get(algorithm)
        if value and available(algorithm):
            return algorithm, str(value)
    return None


def check_recorded(path: str, meta: Optional[Dict[str, Any]], what: str) -> bool:
    """Prove an image by the digest recorded when it was stored: True when it matches,
    StateError (exit 4) when it differs, False when there is none to check (then the caller
    proves it by a full read)."""
    found = recorded(meta)
    if found is None:
        missing = [a for a in ALGORITHMS if (meta or {}).get(a) and not available(a)]
        if missing:
            log.warning("%s carries a %s digest, but the Python package '%s' is not installed: "
                        "proving it by a full read instead", what, missing[0], missing[0])
        return False
    algorithm, expected = found
    if of_file(path, algorithm) != expected:
        raise StateError(f"{what} is corrupt: its {algorithm} digest differs from the one "
                         "recorded when it was stored; the slot was not touched")
    return True

"""A job's lease: a fleet worker runs each job with VMIM_LEASE naming a file it touches while it
holds the job (connected to the broker, not frozen). Before every step the run checks the file
is fresh; a stale one means the worker lost the job, which the broker may have handed to another
worker: the run stops there, as after a failure (the disk released, the domain not started).
A command run by hand has no lease and is not affected."""

from __future__ import annotations

import os
import time

from vmim.errors import OperationError

ENV_LEASE = "VMIM_LEASE"
ENV_TTL = "VMIM_LEASE_TTL"
DEFAULT_TTL = 20.0


class LeaseLost(OperationError):
    """The fleet job's lease expired: it may be running elsewhere (exit 1)."""


def check() -> None:
    path = os.environ.get(ENV_LEASE)
    if not path:
        return
    ttl = float(os.environ.get(ENV_TTL) or DEFAULT_TTL)
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        age = float("inf")
    if age > ttl:
        raise LeaseLost(f"this fleet job's lease expired ({age:.0f} s without word from its "
                        f"worker, more than {ttl:.0f} s): the broker may have handed it to "
                        "another worker; stopping before the next step")


def renew(path: str) -> None:
    """The worker: the job is still ours."""
    with open(path, "a"):
        pass
    os.utime(path)

"""`python -m vmim.fleet.child ARGS`: exactly `python -m vmim ARGS`, except that the run gets
SIGTERM when the worker that started it dies (it then cleans up as after any SIGTERM: releases
the disk, leaves the domain down), so a killed worker never leaves a job running unseen."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> int:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    from vmim.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""`python -m vmim.fleet.child --config WORKER_CFG`, the command a fleet worker runs for each
job and list: the typed run (vmim.invocation.BoxRun, as JSON) comes on stdin, never as a
command line; it runs as the local command would (`vmim.commands`, the same per-slot lock,
steps and cleanup) with --json --local and the worker's own config, and its process gets
SIGTERM when the worker that started it dies (it then cleans up as after any SIGTERM:
releases the disk, leaves the domain down), so a killed worker never leaves a job running
unseen."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from vmim.invocation import Invocation

PR_SET_PDEATHSIG = 1
#: the exit code of a child whose worker was gone before it could start: as after SIGTERM
EXIT_WORKER_GONE = 143
MAX_INPUT = 1 << 20


def read_invocation(text: str, config: str) -> Invocation:
    """The invocation a worker hands over: the run from `text`, read strictly, run here with
    the worker's config, always --json and --local."""
    from vmim.errors import ProtocolError
    from vmim.invocation import BoxRun, Invocation

    try:
        data = json.loads(text, parse_constant=lambda c: float("nan"))
    except ValueError as exc:
        raise ProtocolError(f"the worker's run is not JSON: {exc}") from None
    run = BoxRun.from_dict(data, what="the worker's run")
    return Invocation(replace(run, options=replace(run.options, json=True)), config=config,
                      local=True)


def main(argv: List[str]) -> int:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    from vmim.fleet.protocol import ENV_WORKER

    worker = os.environ.get(ENV_WORKER)
    if worker is not None and worker != str(os.getppid()):
        # the worker died before the prctl above: no SIGTERM would come, the run would be
        # nobody's (the broker gives its job to another worker)
        sys.stderr.write(f"vmimagemanager: the worker that started this run (pid {worker}) "
                         "is gone: not running it\n")
        return EXIT_WORKER_GONE
    from vmim.frontend import run_invocation

    if len(argv) != 2 or argv[0] != "--config":
        sys.stderr.write("usage: python -m vmim.fleet.child --config WORKER_CFG < RUN.json\n")
        return 2
    text = sys.stdin.read(MAX_INPUT)
    return run_invocation(lambda: read_invocation(text, argv[1]), want_json=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

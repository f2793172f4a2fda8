"""What one command is asked to do, as typed values: `BoxRun` (the request and the options a
run of it needs) is what crosses process boundaries — a fleet job carries it, a worker hands
it to its child as JSON — and `Invocation` adds what only the local command line decides
(config file, logging, broker). cli.py builds an Invocation once; nothing below it sees an
argparse Namespace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from vmim.plan import REQUEST_FIELDS, Request

OPTION_FIELDS = ("dry_run", "print_xml", "json", "jobs", "lock_wait", "timeout", "core",
                 "verbose", "quiet")
WEEK = 7 * 24 * 3600


@dataclass(frozen=True)
class RunOptions:
    """The options of a box run (the command line's --dry-run, --lock-wait, ...)."""

    dry_run: bool = False
    print_xml: bool = False
    json: bool = False
    jobs: int = 1
    lock_wait: int = 0
    timeout: Optional[int] = None
    core: Optional[int] = None
    verbose: int = 0
    quiet: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in OPTION_FIELDS}

    @classmethod
    def from_dict(cls, data: Any, what: str = "the options") -> RunOptions:
        from vmim.fields import Fields

        f = Fields(data, what, OPTION_FIELDS)
        return cls(dry_run=f.boolean("dry_run"), print_xml=f.boolean("print_xml"),
                   json=f.boolean("json"), jobs=f.integer("jobs", 1, low=1, high=256),
                   lock_wait=f.integer("lock_wait", 0, low=0, high=WEEK),
                   timeout=f.integer("timeout", None, low=0, high=WEEK, nullable=True),
                   core=f.integer("core", None, low=1, high=4096, nullable=True),
                   verbose=f.integer("verbose", 0, low=0, high=5),
                   quiet=f.integer("quiet", 0, low=0, high=5))


@dataclass(frozen=True)
class BoxRun:
    """A request and the options to run it with: what a fleet job and a worker's child carry."""

    request: Request = field(default_factory=Request)
    options: RunOptions = field(default_factory=RunOptions)

    def to_dict(self, fields: Sequence[str] = REQUEST_FIELDS) -> Dict[str, Any]:
        return {"request": self.request.to_dict(fields), "options": self.options.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, fields: Sequence[str] = REQUEST_FIELDS,
                  what: str = "the run") -> BoxRun:
        from vmim.fields import Fields

        f = Fields(data, what, ("request", "options"))
        return cls(Request.from_dict(f.object("request"), fields, f"{what}: request"),
                   RunOptions.from_dict(f.object("options"), f"{what}: options"))


@dataclass(frozen=True)
class Invocation:
    """One command line: the run plus what only this machine's command decides. Never sent."""

    run: BoxRun
    config: Optional[str] = None
    connect: Optional[str] = None
    print_config: Optional[str] = None
    log_config: Optional[str] = None
    syslog: Optional[str] = None
    broker: Optional[str] = None
    local: bool = False
    lvm: bool = False
    #: warnings about the command line, said once logging is set up (never by a fleet worker)
    notes: Tuple[str, ...] = ()

    @property
    def request(self) -> Request:
        return self.run.request

    @property
    def options(self) -> RunOptions:
        return self.run.options

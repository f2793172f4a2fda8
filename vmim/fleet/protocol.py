"""What travels through the broker: names of exchanges and queues, the job message, the
connection (TLS, heartbeat), and the job's command line rebuilt from the client's options."""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit, urlunsplit

from vmim.errors import HostEnvironmentError, UsageError

VERSION = 1
JOBS = "vmim.jobs"  # direct, durable: routing key box.<HostName>, or "any"
CONTROL = "vmim.control"  # fanout: fleet lists
ANY_QUEUE = "vmim.any"
ANY_KEY = "any"
ENV_BROKER = "VMIM_BROKER"
HEARTBEAT = 10  # seconds; the broker drops a silent peer after about twice this
CONNECT_TIMEOUT = 5.0

#: options that only make sense on the client, or that a job must not carry to a worker
CLIENT_ONLY = ("config", "connect", "print_config", "log_config", "syslog", "broker", "local",
               "json", "lock_wait")


def box_key(box: str) -> str:
    return f"box.{box}"


def box_queue(host: str, box: str) -> str:
    """A queue per slot, named by host first so that a host's user can be limited to
    `^vmim\\.host\\.<host>\\.` (docs/fleet.md)."""
    return f"vmim.host.{host}.box.{box}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and re.fullmatch(r"[0-9a-f]{32}", job_id) is not None


@dataclass(frozen=True)
class BrokerSpec:
    url: str
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    @property
    def shown(self) -> str:
        """The URL without its password, for messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))


def connection(spec: BrokerSpec, heartbeat: int = HEARTBEAT) -> Any:
    """A kombu connection with publisher confirms (a mandatory publish that no queue takes
    comes back before the confirm) and, for amqps://, TLS with the configured CA/cert/key."""
    try:
        import kombu
    except ImportError:
        raise HostEnvironmentError("the fleet needs the Python package kombu "
                                   "(Debian: python3-kombu; pip install kombu)") from None
    ssl_opt: Any = None
    if spec.url.startswith("amqps://"):
        ctx = ssl.create_default_context(cafile=spec.ca)
        if spec.cert:
            ctx.load_cert_chain(spec.cert, spec.key)
        ssl_opt = ctx
    elif spec.ca or spec.cert:
        raise UsageError(f"broker_ca/broker_cert are set but the broker URL {spec.shown} is not "
                         "amqps://")
    return kombu.Connection(spec.url, heartbeat=heartbeat, ssl=ssl_opt,
                            connect_timeout=CONNECT_TIMEOUT,
                            transport_options={"confirm_publish": True})


def connect(conn: Any) -> None:
    """Connect now: one attempt and one immediate retry (kombu's connect() waits 2 s first)."""
    conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0)


def encode(body: Dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


def job_argv(args: argparse.Namespace, boxes: List[str]) -> List[str]:
    """The command line a worker runs for a job: the client's box actions and lists, without
    the client-only options (the worker adds its own --config, --json and --lock-wait)."""
    from vmim.cli import FORMAT_FLAGS

    argv: List[str] = []
    for b in boxes:
        argv += ["-b", b]
    for flag, on in (("-k", args.kill), ("-d", args.down), ("--mount", args.mount)):
        if on:
            argv.append(flag)
    for e in args.extract:
        argv += ["-e", e]
    for d in args.extract_directory:
        argv += ["--extract-directory", d]
    for s in args.store:
        argv += ["-s", s]
    for r in args.restore:
        argv += ["-r", r]
    for i in args.insert:
        argv += ["-i", i]
    for flag, on in (("--release", args.release), ("-u", args.up),
                     ("--dry-run", args.dry_run), ("--print-xml", args.print_xml),
                     ("--disk-image", args.disk_image)):
        if on:
            argv.append(flag)
    for _short, long, fmt, _text in FORMAT_FLAGS:
        if args.format == fmt:
            argv.append(long)
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.core is not None:
        argv += ["--core", str(args.core)]
    if args.jobs != 1:
        argv += ["--jobs", str(args.jobs)]
    argv += ["-v"] * args.verbose + ["-q"] * args.quiet
    return argv


def list_argv(lists: List[str]) -> List[str]:
    flags = {"boxes": "-l", "images": "-L", "inserts": "--list-inserts", "free": "-f",
             "locked": "-m"}
    return [flags[w] for w in lists]


def checked_argv(argv: Any) -> List[str]:
    """A job's argv as a worker accepts it: strings that parse, with no client-only option
    (a job must not choose the worker's config, write files or reconfigure logging)."""
    from vmim.cli import build_parser

    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise UsageError("the job's argv is not a list of strings")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, --version: they would print here and end the worker
        raise UsageError("a fleet job may not carry --help or --version") from None
    defaults = build_parser().parse_args([])
    for name in CLIENT_ONLY:
        if getattr(args, name, None) != getattr(defaults, name, None):
            raise UsageError(f"a fleet job may not carry --{name.replace('_', '-')}")
    return argv


def child_command(argv: List[str], config: str, lock_wait: float) -> List[str]:
    """The local command a worker runs for a job (vmim.fleet.child: `python -m vmim` that ends
    with its worker)."""
    return [sys.executable, "-m", "vmim.fleet.child", *argv, "--json", "--local",
            "--config", config, "--lock-wait", str(max(0, int(lock_wait)))]


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("VMIM_BROKER", None)
    return env


def connection_errors() -> tuple:
    """What a lost or refused broker connection raises (socket, AMQP and kombu errors)."""
    errors: tuple = (OSError, EOFError)
    try:
        import amqp
        import kombu.exceptions

        errors += (amqp.exceptions.ConnectionError, amqp.exceptions.RecoverableConnectionError,
                   kombu.exceptions.OperationalError, kombu.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return errors


def refusals() -> tuple:
    """What a broker's refusal raises: 403 access refused, 404 not found and the like."""
    try:
        import amqp

        return (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)
    except ImportError:  # pragma: no cover
        return ()

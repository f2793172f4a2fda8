"""`vmimagemanager worker`: the command that serves a host's slots to the fleet — its
options, its config and broker — then runs vmim.fleet.worker.Worker until SIGTERM."""

from __future__ import annotations

import argparse
import socket
from typing import List

from vmim import fleet
from vmim.errors import EXIT_USAGE, VmimError
from vmim.fleet import protocol, transport
from vmim.terminal import safe


def build_parser() -> argparse.ArgumentParser:
    from vmim.frontend import ArgParser
    from vmim.output import PROG

    p = ArgParser(prog=f"{PROG} worker",
                description="Serve this host's slots to the fleet: run the box actions and "
                "lists that clients send through RabbitMQ (docs/fleet.md). Runs in the "
                "foreground; SIGTERM stops taking jobs, lets the running ones finish, exits 0.")
    p.add_argument("-c", "--config", metavar="PATH",
                   help="config file (else $VMIM_CFG, else /etc/vmimagemanager/vmimagemanager.cfg)")
    p.add_argument("--broker", metavar="URL",
                   help="broker URL (else $VMIM_BROKER, else broker in the config)")
    p.add_argument("--host-name", metavar="NAME",
                   help="this host's name in the fleet (default: the machine's host name)")
    p.add_argument("--heartbeat", type=int, default=protocol.HEARTBEAT, metavar="S",
                   help=f"AMQP heartbeat in seconds (default {protocol.HEARTBEAT}): a worker silent for "
                   "about twice this loses its jobs to other workers, and aborts them itself")
    p.add_argument("--print-permissions", action="store_true",
                   help="print the rabbitmqctl commands that give this host's broker user "
                   "(named as the host) and a client user their permissions, and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    p.add_argument("--syslog", nargs="?", const="/dev/log", metavar="SOCKET",
                   help="also log to syslog (default socket /dev/log)")
    return p


def main(argv: List[str]) -> int:
    from vmim.terminal import escaped_stderr

    with escaped_stderr():  # every control but newline and tab escaped (vmim.terminal)
        return _main(argv)


def _main(argv: List[str]) -> int:
    from vmim import config as config_mod
    from vmim.frontend import setup_logging
    from vmim.output import PROG

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    except VmimError as exc:
        import sys

        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    try:
        setup_logging(args.verbose, args.quiet, None, args.syslog)
        cfg = config_mod.load(args.config)
        host = args.host_name or socket.gethostname()
        problem = protocol.host_name_problem(host)
        if problem:
            given = "--host-name" if args.host_name else \
                "the machine's host name: give --host-name"
            raise VmimError(f"host name {safe(host)!r} ({given}): {problem}")
        if args.print_permissions:
            from vmim.fleet.permissions import commands

            print("\n".join(commands(host, cfg.slot_names)))
            return 0
        url = fleet.broker_url(args.broker, cfg)
        if not url:
            raise VmimError("no broker: give --broker URL, set $VMIM_BROKER, or broker in "
                            f"[vmim.local] of {cfg.path}")
        spec = transport.BrokerSpec(url, cfg.broker_ca, cfg.broker_cert, cfg.broker_key)
        from vmim.fleet.worker import Worker

        worker = Worker(cfg, spec, host, args.heartbeat)
        return worker.run()
    except VmimError as exc:
        import sys

        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code if exc.exit_code != 1 else EXIT_USAGE

"""Command line: the argparse front end. It parses the command line into one Invocation
(typed: vmim/invocation.py) and hands it to vmim.frontend.run_invocation, the one place that
turns errors into a line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence, TextIO, Tuple

from vmim import __version__
from vmim.errors import (
    UsageError,
)
from vmim.frontend import ArgParser, run_invocation
from vmim.invocation import BoxRun, Invocation, RunOptions
from vmim.output import PROG
from vmim.plan import ANY_FREE, BOX_PLACEHOLDER, PIPELINE, Request, Transfer

log = logging.getLogger("vmim")

FORMAT_FLAGS = (
    ("-y", "--rsync", "rsync", "rsync tree (the default for store and extract)"),
    ("-z", "--tgz", "tgz", "tar + gzip (pigz when present)"),
    ("-w", "--cpio-bzip", "cpio.bz2", "cpio (newc) + bzip2 (lbzip2 when present)"),
    (None, "--zstd", "tar.zst", "tar + zstd -T0"),
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog=PROG,
        description="Re-image libvirt virtual machines: stop a slot's domain, mount its root "
        "filesystem, store or restore an image, insert or extract archives, start it again. "
        "Actions run per box in a fixed order: kill, down, mount, extract, store, restore, "
        "insert, release, redefine, swap, up. A slot an action mounted stays mounted unless "
        "--release or -u is given.",
        epilog="Exit codes: 0 success, 1 operation failed, 2 usage, 3 config invalid, "
        "4 state conflict (unknown box or image, domain running), 5 slot locked, "
        "6 external command failed, 7 environment (tool missing, not root, libvirt "
        "unreachable), 8 cleanup incomplete, 130/143 interrupted.",
        add_help=False,  # -h sits in the "options" group below: one options section, not two
    )

    g = p.add_argument_group("boxes")
    g.add_argument("-b", "--box", action="append", default=[], metavar="BOX",
                   help=f"slot to act on; repeatable. '{ANY_FREE}' claims one free slot")

    g = p.add_argument_group("actions (run per box in this order)")
    g.add_argument("-k", "--kill", action="store_true", help="force the domain off now")
    g.add_argument("-d", "--down", action="store_true",
                   help="graceful shutdown; forced off after --timeout")
    g.add_argument("--mount", action="store_true",
                   help="map and mount the slot's root filesystem (the domain must be shut off)")
    g.add_argument("-e", "--extract", action="append", default=[], metavar="NAME[:DIR]",
                   help="archive guest directory DIR into the inserts store as NAME")
    g.add_argument("--extract-directory", action="append", default=[], metavar="DIR",
                   help="directory for the n-th -e NAME without :DIR (paired by position)")
    g.add_argument("-s", "--store", action="append", default=[], metavar="NAME",
                   help="store the slot's filesystem as image NAME ({box} is replaced by the box)")
    g.add_argument("-r", "--restore", action="append", default=[], metavar="NAME",
                   help="replace the slot's filesystem with image NAME")
    g.add_argument("-i", "--insert", action="append", default=[], metavar="NAME[:DIR]",
                   help="unpack insert NAME at guest directory DIR (default /); repeatable, in order")
    g.add_argument("--release", action="store_true", help="unmount and unmap the slot's disk")
    g.add_argument("--redefine", action="store_true",
                   help="replace libvirt's definition of the domain with the one the config "
                   "makes through libvirt.xsl (the domain must be shut off)")
    g.add_argument("--swap", action="store_true",
                   help="make the image staged on the slot's standby disk the domain's disk "
                   "(shut down first; -u swaps a staged image in by itself)")
    g.add_argument("-u", "--up", action="store_true",
                   help="release, define the domain if libvirt lacks it, start it; a slot "
                   "with a staged image swaps it in first")
    g.add_argument("--stage", action="store_true",
                   help="-r and -i work on the slot's standby disk while its domain runs; "
                   "the next -u swaps it in (docs/guide.md)")

    g = p.add_argument_group("lists")
    g.add_argument("-l", "--list-boxes", action="store_true",
                   help="slots (config and libvirt) with domain state and disk")
    g.add_argument("-L", "--list-images", action="store_true",
                   help="images: name, format, size, date")
    g.add_argument("--list-inserts", action="store_true", help="inserts and extracts")
    g.add_argument("-f", "--list-free", "--free", action="store_true",
                   help="slots free for work: configured, shut off, not locked, not mounted")
    g.add_argument("-m", "--list-locked", "--locked", action="store_true", help="locked slots")

    g = p.add_argument_group("format for store and extract (restore and insert detect it)")
    fx = g.add_mutually_exclusive_group()
    for short, long, fmt, text in FORMAT_FLAGS:
        names = [n for n in (short, long) if n]
        fx.add_argument(*names, dest="format", action="store_const", const=fmt, help=text)

    g = p.add_argument_group("options")
    g.add_argument("-h", "--help", action="help", help="show this help and exit")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g.add_argument("-c", "--config", metavar="PATH",
                   help="config file (else $VMIM_CFG, else /etc/vmimagemanager/vmimagemanager.cfg)")
    g.add_argument("--connect", metavar="URI",
                   help="libvirt URI to connect to, as virsh's --connect (overrides vmemulator)")
    g.add_argument("-p", "--print-config", nargs="?", const="-", metavar="FILE",
                   help="print the effective configuration in the current format (to FILE)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output; repeatable")
    g.add_argument("-q", "--quiet", action="count", default=0, help="less log output; repeatable")
    g.add_argument("--log-config", metavar="FILE",
                   help="logging.config file (else $VMIM_LOG_CONF); overrides -v/-q")
    g.add_argument("--syslog", nargs="?", const="/dev/log", metavar="SOCKET",
                   help="also log every step to syslog (default socket /dev/log), for cron")
    g.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    g.add_argument("--dry-run", action="store_true",
                   help="print each box's plan and change nothing; exit with the code the run "
                   "would end with when the current state decides it (else 0)")
    g.add_argument("--timeout", type=_non_negative_int, metavar="S",
                   help="graceful shutdown timeout in seconds (default: the slot's timeout, 180)")
    g.add_argument("--lock-wait", type=_non_negative_int, default=0, metavar="S",
                   help="wait up to S seconds for a slot another command holds (default 0)")
    g.add_argument("-C", "--core", "--cpu", type=_positive_int, metavar="N",
                   help="vCPUs for the domain at start")
    g.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="boxes worked on in parallel (default 1)")
    g.add_argument("--print-xml", action="store_true",
                   help="print the domain XML that -u would define for a box libvirt does not know")
    g.add_argument("--disk-image", action="store_true",
                   help="store/restore the whole disk (qcow2 in the store) instead of the tree")
    g = p.add_argument_group("fleet (many hosts through RabbitMQ: docs/fleet.md)")
    g.add_argument("--broker", metavar="URL",
                   help="send box actions and lists to the fleet's broker (amqp:// or amqps://) "
                   "instead of running them here (else $VMIM_BROKER, else broker in the config); "
                   f"'{PROG} worker --help' serves a host's slots")
    g.add_argument("--local", action="store_true",
                   help="run here even when a broker is configured")
    g.add_argument("--lvm", action="store_true", help=argparse.SUPPRESS)  # 0.3: parsed, ignored
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _split_transfer(text: str, flag: str) -> Tuple[str, Optional[str]]:
    name, sep, directory = text.partition(":")
    if not name:
        raise UsageError(f"{flag} '{text}': the archive NAME is empty")
    if sep and not directory:
        raise UsageError(f"{flag} '{text}': the directory after ':' is empty")
    return name, (directory if sep else None)


def _check_names(req: Request) -> None:
    """Image, insert and extract names are checked before anything else (exit 2): a name such
    as ../x is refused before a slot is mounted or released."""
    from vmim.store import validate_name

    named = [("image", req.store), ("image", req.restore),
             *(("insert", t.name) for t in req.inserts),
             *(("extract", t.name) for t in req.extracts)]
    for what, name in named:
        if name:
            validate_name(name.replace(BOX_PLACEHOLDER, "box"), what)


def make_request(args: argparse.Namespace) -> Request:
    """Validate the parsed arguments into a Request (usage errors exit 2)."""
    boxes: List[str] = []
    for name in args.box:
        if not name:
            raise UsageError("-b needs a box name")
        if name not in boxes:
            boxes.append(name)

    if len(args.store) > 1:
        raise UsageError("-s/--store is given more than once; store one image per command")
    if len(args.restore) > 1:
        raise UsageError("-r/--restore is given more than once; restore one image per command")
    store = args.store[0] if args.store else None
    restore = args.restore[0] if args.restore else None
    for flag, value in (("-s", store), ("-r", restore)):
        if value is not None and not value:
            raise UsageError(f"{flag} needs an image name")

    inserts = []
    for text in args.insert:
        name, directory = _split_transfer(text, "-i")
        inserts.append(Transfer(name, directory or "/"))

    extracts = []
    pending = list(args.extract_directory)
    for text in args.extract:
        name, directory = _split_transfer(text, "-e")
        if directory is None:
            if not pending:
                raise UsageError(
                    f"-e {name}: no directory to extract; write -e {name}:DIR "
                    "or add --extract-directory DIR"
                )
            directory = pending.pop(0)
        extracts.append(Transfer(name, directory))
    if pending:
        raise UsageError(
            f"--extract-directory {pending[0]} has no -e NAME to pair with "
            "(each -e NAME without :DIR takes the next --extract-directory)"
        )

    wanted = {
        "kill": args.kill, "down": args.down, "mount": args.mount,
        "extract": bool(extracts), "store": store is not None,
        "restore": restore is not None, "insert": bool(inserts),
        "release": args.release, "redefine": args.redefine, "swap": args.swap,
        "up": args.up,
    }
    req = Request(
        boxes=tuple(boxes), actions=tuple(a for a in PIPELINE if wanted[a]),
        lists=tuple(name for name, flag in (
            ("boxes", args.list_boxes), ("images", args.list_images),
            ("inserts", args.list_inserts), ("free", args.list_free),
            ("locked", args.list_locked)) if flag),
        store=store, restore=restore, inserts=tuple(inserts), extracts=tuple(extracts),
        format=args.format, disk_image=args.disk_image, stage=args.stage)
    _check_names(req)
    problem = req.combination_problem()
    if problem:
        raise UsageError(problem)
    if args.print_xml and not req.boxes:
        raise UsageError("--print-xml needs -b BOX")
    if req.actions and not req.boxes:
        raise UsageError(f"{', '.join(req.actions)} needs at least one box: add -b BOX")
    if not req.actions and not req.lists and not args.print_xml and args.print_config is None:
        if req.boxes:
            raise UsageError("no action given for the box(es): add -u, -d, -s NAME, -r NAME, ... "
                             f"(see '{PROG} --help')")
        raise UsageError(f"nothing to do: give an action or a list such as -l (see '{PROG} --help')")
    if len(req.boxes) > 1:
        if req.store is not None and BOX_PLACEHOLDER not in req.store:
            raise UsageError(f"-s {req.store} with {len(req.boxes)} boxes would store them all "
                             f"under one name: put {BOX_PLACEHOLDER} in the name")
        for t in req.extracts:
            if BOX_PLACEHOLDER not in t.name:
                raise UsageError(f"-e {t.name} with {len(req.boxes)} boxes would extract them "
                                 f"all under one name: put {BOX_PLACEHOLDER} in the name")
    return req


def make_invocation(args: argparse.Namespace) -> Invocation:
    """The whole command line as typed values: the request, the options of its run, and what
    only this machine decides (config, logging, broker). Nothing below cli.py sees `args`."""
    options = RunOptions(dry_run=args.dry_run, print_xml=args.print_xml, json=args.json,
                         jobs=args.jobs, lock_wait=args.lock_wait, timeout=args.timeout,
                         core=args.core, verbose=args.verbose, quiet=args.quiet)
    req = make_request(args)
    notes: Tuple[str, ...] = ()
    if req.format and not (req.store is not None or req.extracts):
        notes = (f"format option {req.format} has no effect without -s or -e (restore and "
                 "insert detect the format)",)
    return Invocation(BoxRun(req, options), config=args.config,
                      connect=args.connect, print_config=args.print_config,
                      log_config=args.log_config, syslog=args.syslog, broker=args.broker,
                      local=args.local, lvm=args.lvm, notes=notes)


def main(argv: Optional[Sequence[str]] = None, stdout: Optional[TextIO] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # the fleet's worker: a command of its own (vmim/fleet/service.py)
        from vmim.fleet import service

        return service.main(argv[1:])
    want_json = "--json" in argv  # before parsing: a usage error gets its JSON document too

    def parse() -> Invocation:
        return make_invocation(build_parser().parse_args(argv))

    return run_invocation(parse, stdout, want_json)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()

"""Regenerate the files made from the config key table and the parser: `make docs`."""

from __future__ import annotations

import argparse
import os
from typing import List

from vmim import __version__, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_CODES = [
    ("0", "success"),
    ("1", "an operation failed"),
    ("2", "usage: the command line is wrong"),
    ("3", "the configuration is invalid or missing; every problem is listed"),
    ("4", "state conflict: unknown box or image, domain running, disk busy, corrupt image"),
    ("5", "the slot is locked by another command, or no slot is free (retry later)"),
    ("6", "an external command failed"),
    ("7", "environment: a tool missing, not root, libvirt unreachable"),
    ("8", "cleanup incomplete: something is still mounted or mapped; the message says how to "
          "release it"),
    ("130, 143", "interrupted by SIGINT, or by SIGTERM or SIGHUP"),
]

EXAMPLES = [
    ("List slots with their domain state, and images with their formats:",
     "vmimagemanager -l\nvmimagemanager -L"),
    ("Reset web1 to the image golden, add its certificates, boot it:",
     "vmimagemanager -b web1 -r golden -i certs -u"),
    ("Store web1 as a tar.zst image named after the day:",
     "vmimagemanager -b web1 --zstd -s web1-$(date +%F) -u"),
    ("Take a free slot for a batch job, and pull its build results out afterwards:",
     "box=$(vmimagemanager -q -b any-free -r builder -u)\n"
     "vmimagemanager -q -b \"$box\" -d -e results-$box:/srv/build/out --release"),
    ("Restore a box on whichever host of the fleet owns it, and list every host's slots:",
     "vmimagemanager --broker amqps://ci@mq.example.org/ -b web7 -r golden -u\n"
     "vmimagemanager --broker amqps://ci@mq.example.org/ -l"),
    ("Convert a 0.2 configuration to the current format:",
     "vmimagemanager --config old.cfg --print-config new.cfg"),
]


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def render_man() -> str:
    """docs/vmimagemanager.1: every flag, config key, exit code and file, with examples."""
    from vmim.cli import build_parser

    parser = build_parser()
    out: List[str] = [
        f'.TH VMIMAGEMANAGER 1 "" "vmimagemanager {__version__}" "User Commands"',
        ".SH NAME",
        "vmimagemanager \\- re\\-image libvirt virtual machines fast and repeatably",
        ".SH SYNOPSIS",
        ".B vmimagemanager",
        "[\\fB\\-b\\fR \\fIBOX\\fR]... [\\fIactions\\fR] [\\fIformat\\fR] [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        _roff(parser.description or ""),
        ".PP",
        _roff("A slot is a libvirt domain and the disk holding its root filesystem. Store, "
              "restore, insert and extract stop a running domain first and leave the slot "
              "mounted unless --release or -u is given. A step that fails aborts that box: its "
              "disk is released and its domain is not started."),
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        out.append(f".SH {_roff(group.title.upper() if group.title else 'OPTIONS')}")
        for a in actions:
            names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
            if a.metavar or (a.nargs not in (0,) and not isinstance(a, (
                    argparse._StoreTrueAction, argparse._CountAction, argparse._StoreConstAction,
                    argparse._VersionAction, argparse._HelpAction))):
                names += f" \\fI{_roff(str(a.metavar or a.dest.upper()))}\\fR"
            out += [".TP", names, _roff(a.help or "")]
    from vmim.fleet.worker import build_parser as worker_parser

    wp = worker_parser()
    out += [".SH WORKER", ".B vmimagemanager worker", "[\\fIoptions\\fR]", ".PP",
            _roff(wp.description or ""), ".PP",
            _roff("Jobs arrive through RabbitMQ (see docs/fleet.md); each runs as the local "
                  "command would, under the same per-slot lock, one job per slot at a time.")]
    for a in wp._actions:
        if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
            continue
        names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
        if a.metavar:
            names += f" \\fI{_roff(str(a.metavar))}\\fR"
        out += [".TP", names, _roff(a.help or "")]
    out += [".SH CONFIGURATION",
            _roff(f"Read from --config PATH, else $VMIM_CFG, else {config.DEFAULT_CONFIG_PATH}. "
                  "The current format has a [vmim.local] section and one [vmim.vm.NAME] section "
                  "per slot, with JSON values (a bare value is a string); the legacy 0.2 format "
                  "([VmImageManager], vm_slot_enabled) is read too. Slot keys marked (inherit) "
                  "may be set in [vmim.local] as defaults.")]
    for scope, title in (("local", "[vmim.local]"), ("slot", "[vmim.vm.NAME]")):
        out += [".SS " + _roff(title)]
        for k in config.KEYS:
            if k.scope != scope:
                continue
            also = [*k.aliases, *k.legacy]
            text = k.help + (f" Also: {', '.join(also)}." if also else "")
            if k.default not in (None, ()):
                text += f" Default: {config._ini_value(k.default)}."
            if scope == "slot" and k.inherit:
                text += " (inherit)"
            out += [".TP", f"\\fB{_roff(k.ini)}\\fR", _roff(text)]
    out += [".SH EXIT STATUS"]
    for code, text in EXIT_CODES:
        out += [".TP", f"\\fB{_roff(code)}\\fR", _roff(text)]
    out += [".SH ENVIRONMENT",
            ".TP", "\\fBVMIM_CFG\\fR", "Configuration file, when --config is not given.",
            ".TP", "\\fBVMIM_BROKER\\fR", _roff("Broker URL of the fleet, when --broker is "
                                                "not given (before broker in the config)."),
            ".TP", "\\fBVMIM_LOG_CONF\\fR", _roff("logging.config file, when --log-config is "
                                                  "not given."),
            ".SH FILES",
            ".TP", _roff(config.DEFAULT_CONFIG_PATH), "The configuration.",
            ".TP", _roff("/etc/vmimagemanager/libvirt.xsl"),
            _roff("An administrator's stylesheet for domain definition (else the shipped one)."),
            ".TP", _roff("/run/lock/vmimagemanager/BOX.lock"), "Per\\-slot locks (lockdir).",
            ".TP", _roff("IMAGES/.vmim/NAME.json"), "Per\\-image metadata: format, size, sha256.",
            ".SH EXAMPLES"]
    for text, cmd in EXAMPLES:
        out += [".PP", _roff(text), ".PP", ".nf", ".RS", _roff(cmd), ".RE", ".fi"]
    out += [".SH SEE ALSO", "virsh(1), rsync(1), tar(1), cpio(1)"]
    return "\n".join(out) + "\n"


GENERATED = {
    "docs/config.md": config.render_reference,
    "vmimagemanager.cfg.template": config.render_template,
    "docs/vmimagemanager.1": render_man,
}


def main() -> None:
    for rel, render in GENERATED.items():
        with open(os.path.join(ROOT, rel), "w", encoding="utf-8") as fh:
            fh.write(render())
        print(f"wrote {rel}")


if __name__ == "__main__":
    main()

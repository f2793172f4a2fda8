"""Regenerate the files made from the config key table and the parser: `make docs`."""

from __future__ import annotations

import argparse
import functools
import os
import re
from typing import List, Tuple

from vmim import __version__, config, keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_CODES = [
    ("0", "success"),
    ("1", "an operation failed"),
    ("2", "usage: the command line is wrong"),
    ("3", "the configuration is invalid or missing; every problem is listed"),
    ("4", "state conflict: unknown box or image, domain running, disk busy, an image not proven "
          "restorable (the slot untouched), -u on a slot whose restore did not finish"),
    ("5", "the slot is locked by another command, or no slot is free (retry later)"),
    ("6", "an external command failed; also a full disk, whatever wrote: a store that fills "
          "the store's filesystem (the previous image of that name is kept), a restore that "
          "fills the slot's (marked incomplete)"),
    ("7", "environment: a tool missing, not root, libvirt unreachable, a lock or state "
          "directory another user could write"),
    ("8", "cleanup incomplete: something is still mounted or mapped; the message says how to "
          "release it"),
    ("130, 143", "interrupted by SIGINT, or by SIGTERM or SIGHUP"),
]
EXIT_NOTE = ("With --dry-run the command exits with the code the real run would end with when "
             "the current state already decides it: 3 (the configuration lacks a store or disk "
             "the request needs), 4 (an unknown or unusable image or insert, --mount on a running "
             "domain, a slot mounted while its domain runs, -u on an incomplete slot), 5 (the "
             "slot is locked, or no slot is free), 8 (its disk is mounted in another mount "
             "namespace); else 0.")

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
    """Plain text as roff: backslashes and hyphens escaped, `code` in bold, no leading dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _tp(term: str, text: str) -> str:
    return f".TP\n\\fB{_roff(term)}\\fR\n{_roff(text)}"


def _man_parser() -> argparse.ArgumentParser:
    """The command's own parser, with what the man page says in sections of its own removed."""
    from vmim.cli import build_parser

    parser = build_parser()
    parser.epilog = None  # the exit codes: EXIT STATUS below
    # One line per paragraph whatever $COLUMNS says: man fills the lines, and the committed
    # files must not depend on the terminal that made them.
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=10000)  # type: ignore[assignment]
    return parser


_SLOT_TEXT = ("A slot is a libvirt domain and the disk holding its root filesystem. Store, "
              "restore, insert and extract stop a running domain first and leave the slot "
              "mounted unless --release or -u is given. A step that fails aborts that box: its "
              "disk is released and its domain is not started.")


def _extra_sections(parser: argparse.ArgumentParser) -> List[Tuple[str, str]]:
    """The sections the parser cannot give: configuration keys, exit codes, files, examples."""
    config_lines = [_roff(
        f"Read from --config PATH, else $VMIM_CFG, else {config.DEFAULT_CONFIG_PATH}. "
        "The current format has a [vmim.local] section and one [vmim.vm.NAME] section "
        "per slot, with JSON values (a bare value is a string); the legacy 0.2 format "
        "([VmImageManager], vm_slot_enabled) is read too. Slot keys marked (inherit) "
        "may be set in [vmim.local] as defaults. The package installs a template with "
        f"every key as {config.DEFAULT_CONFIG_PATH}; a source tree has it as "
        "vmimagemanager.cfg.template.")]
    for scope, title in (("local", "[vmim.local]"), ("slot", "[vmim.vm.NAME]")):
        config_lines.append(".SS " + _roff(title))
        for k in config.KEYS:
            if k.scope != scope:
                continue
            also = [*k.aliases, *k.legacy]
            text = k.help + (f" Also: {', '.join(also)}." if also else "")
            if k.default not in (None, ()):
                text += f" Default: {config.ini_value(k.default)}."
            if scope == "slot" and k.inherit:
                text += " (inherit)"
            config_lines.append(_tp(k.ini, text))
    examples = []
    for text, cmd in EXAMPLES:
        examples += [".PP", _roff(text), ".PP", ".nf", ".RS", _roff(cmd), ".RE", ".fi"]
    return [
        ("synopsis", ".B vmimagemanager\n"
                     "[\\fB\\-b\\fR \\fIBOX\\fR]... [\\fIactions\\fR] [\\fIformat\\fR] "
                     "[\\fIoptions\\fR]"),
        ("description", _roff(parser.description or "") + "\n.PP\n" + _roff(_SLOT_TEXT)),
        ("configuration", "\n".join(config_lines)),
        ("exit status", "\n".join(_tp(code, text) for code, text in EXIT_CODES) + "\n.PP\n"
         + _roff(EXIT_NOTE)),
        ("worker", _worker_section()),
        ("environment", "\n".join([
            _tp("VMIM_CFG", "Configuration file, when --config is not given."),
            _tp("VMIM_BROKER", "Broker URL of the fleet, when --broker is not given (before "
                "broker in the config)."),
            _tp("VMIM_LOG_CONF", "logging.config file, when --log-config is not given.")])),
        ("files", "\n".join([
            _tp(config.DEFAULT_CONFIG_PATH, "The configuration (a conffile of the package)."),
            _tp("/usr/share/vmimagemanager/vmimagemanager.cfg.template",
                "Every configuration key, commented: the file to copy from (pip installs it under "
                "its prefix)."),
            _tp("/etc/vmimagemanager/libvirt.xsl",
                "An administrator's stylesheet for domain definition (else the shipped one, "
                "/usr/share/vmimagemanager/libvirt.xsl)."),
            _tp(f"{keys.default('lockdir')}/BOX.lock", "Per-slot locks (lockdir)."),
            _tp("IMAGES/.vmim/NAME.json",
                "Per-image metadata: format, size, digest (BLAKE3 or sha256).")])),
        ("examples", "\n".join(examples)),
        ("see also", "virsh(1), rsync(1), tar(1), cpio(1)"),
    ]


def _worker_section() -> str:
    """`vmimagemanager worker`: a command of its own, with its own parser."""
    from vmim.fleet.service import build_parser as worker_parser

    wp = worker_parser()
    lines = [".B vmimagemanager worker", "[\\fIoptions\\fR]", ".PP", _roff(wp.description or ""),
             ".PP", _roff("Jobs arrive through RabbitMQ (see docs/fleet.md); each runs as the local "
                          "command would, under the same per-slot lock, one job per slot at a "
                          "time.")]
    for a in wp._actions:
        if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
            continue
        names = ", ".join(a.option_strings) + (f" {a.metavar}" if a.metavar else "")
        lines.append(_tp(names, a.help or ""))
    return "\n".join(lines)


def render_man() -> str:
    """docs/vmimagemanager.1 by argparse-manpage: every flag from the parser, then the config
    keys, exit codes, files and examples."""
    from argparse_manpage.manpage import Manpage

    parser = _man_parser()
    sections = _extra_sections(parser)
    parser.description = None  # in the DESCRIPTION section above, with the slot paragraph
    man = Manpage(parser)
    man.source = f"vmimagemanager {__version__}"
    man.manual = "User Commands"
    man.date = ""  # reproducible: the version says which release the page belongs to
    man.description = "re-image libvirt virtual machines fast and repeatably"
    for heading, content in sections:
        man.add_section(heading, "=", content)
    # argparse-manpage leaves out -h/--help; the page names every flag of --help.
    return str(man).replace(".SH OPTIONS\n", ".SH OPTIONS\n.TP\n\\fB\\-h\\fR, \\fB\\-\\-help\\fR\n"
                            "show the help and exit\n\n", 1)


#: -b completes the slot names of the configuration the command line would read.
_BOXES_BASH = r"""
# -b: 'any-free' and the HostName of every slot in the configuration the command would read
# (--config given earlier on the line, else $VMIM_CFG, else the default path).
_vmimagemanager_boxes() {
  local i cfg=()
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "${COMP_WORDS[i]}" in
      -c|--config) cfg=(--config "${COMP_WORDS[i+1]}") ;;
    esac
  done
  compgen -W "any-free $("${COMP_WORDS[0]}" "${cfg[@]}" -q --print-config 2>/dev/null |
    sed -n 's/^HostName = "\(.*\)"$/\1/p')" -- "$1"
}
"""


def render_completion() -> str:
    """completions/vmimagemanager: bash completion by shtab; file names for the path options,
    slot names for -b."""
    import shtab

    parser = _man_parser()
    for action in parser._actions:
        if action.dest in ("config", "print_config", "log_config"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.dest == "box":
            action.complete = {"bash": "_vmimagemanager_boxes",  # type: ignore[attr-defined]
                               "preamble": {"bash": _BOXES_BASH}}
    return str(shtab.complete(parser, shell="bash"))


# --------------------------------------------------------------------------- config


def _type_text(k: config.Key) -> str:
    if k.type == "choice":
        return " | ".join(f'"{c}"' for c in k.choices)
    return {"str": "string", "path": "absolute path", "int": "integer", "bool": "boolean",
            "list": "list of strings", "size": "size (\"20G\" or bytes)"}[k.type]


def _default_text(k: config.Key) -> str:
    if k.default is None or k.default == ():
        return "—"
    return f"`{config.ini_value(k.default)}`"


def render_reference() -> str:
    """docs/config.md: the config reference, generated from the key table."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated from vmim/keys.py KEYS by `make docs`; do not edit by hand -->",
        "",
        "The file is found at `--config PATH`, else `$VMIM_CFG`, else "
        f"`{config.DEFAULT_CONFIG_PATH}`.",
        "",
        "**Current format** (0.3): a `[vmim.local]` section and one `[vmim.vm.NAME]` section per "
        "slot (NAME is free text). Values are JSON (`\"text\"`, `1`, `[\"a\", \"b\"]`, `true`); a "
        "bare unquoted value is taken as a string. No value holds a control character (a JSON "
        "`\\u0001`, a newline, a bidirectional override): it is a config error, exit 3. "
        "A comment is a line of its own starting with "
        "`#` or `;`. After a JSON value, ` ; note` is dropped (as 0.3 did) and ` # note` is an "
        "error (`mount = \"/srv/mnt\"  # note`); after a bare value both are part of the value. "
        "Key names are case-insensitive. `%(key)s` "
        "interpolation works as in Python's configparser; write a literal `%` as `%%`. "
        "Slot keys marked *inherit* may also be set in `[vmim.local]`, as the default for every slot.",
        "",
        "**Legacy format** (0.2): a `[VmImageManager]` section with plain values and one section per "
        "slot, which is a slot only when `vm_slot_enabled` is `yes`, `y`, `on` or `1`; HostName "
        "defaults to the section name. Legacy spellings are read as the keys they became "
        "(listed under *also*). `vmimagemanager --print-config` prints any configuration "
        "in the current format.",
        "",
        "Unknown and obsolete keys are warned about (file, section, key) and ignored. Invalid "
        "values, a slot without HostName, a HostName with `/` (or `.`, `..`), two slots with one "
        "HostName, one disk or one mount point (or one mount point inside another's), and a "
        "section or a key written twice (both lines are named) are errors: "
        "all of them are reported together and the command exits with code 3.",
        "",
        "## `[vmim.local]`",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for k in config.KEYS:
        if k.scope == "local":
            out.append(_ref_row(k))
    out += ["", "## Slot sections `[vmim.vm.NAME]`", "",
            "| key | type | default | meaning |", "|---|---|---|---|"]
    for k in config.KEYS:
        if k.scope == "slot":
            out.append(_ref_row(k))
    out += ["", "## Obsolete keys (warned about, ignored)", "", "| key | why |", "|---|---|"]
    for name, why in config.OBSOLETE_KEYS.items():
        out.append(f"| `{name}` | {why} |")
    return "\n".join(out) + "\n"


def _ref_row(k: config.Key) -> str:
    also = [*k.aliases, *k.legacy]
    meaning = k.help
    if also:
        meaning += " *Also:* " + ", ".join(f"`{a}`" for a in also) + "."
    if k.scope == "slot" and k.inherit:
        meaning += " *inherit*"
    return f"| `{k.ini}` | {_type_text(k)} | {_default_text(k)} | {meaning} |"


def render_template() -> str:
    """vmimagemanager.cfg.template: every key, commented, generated from the key table."""
    out = [
        "# vmimagemanager configuration template (generated from the key table by `make docs`).",
        f"# Copy to {config.DEFAULT_CONFIG_PATH} and edit. Values are JSON: \"text\", 1, [\"a\"], true;",
        "# a bare value is taken as a string. Every key is shown commented out with its default;",
        "# a key that has none is shown with an example value, after '(no default) for example:'.",
        "# A comment is a line of its own (after a value, ' ; note' is dropped, ' # note' an error).",
        "# docs/config.md explains each key.",
        "",
        f"[{config.LOCAL_SECTION}]",
    ]
    for k in config.KEYS:
        if k.scope == "local" or (k.scope == "slot" and k.inherit):
            out += _template_key(k)
    out += [
        "",
        "# Slots: none is active until you write one (`vmimagemanager -l` lists the host's",
        "# libvirt domains meanwhile). Two examples; remove the '#' of a section and its keys.",
        "#",
        "# A slot whose disk image has a partition table; the root filesystem is partition 1.",
        f"#[{config.SLOT_PREFIX}1]",
        '#HostName = "web1"',
        '#HostDisk = "/var/lib/libvirt/images/web1.img"',
        "#partition = 1",
        "",
        "# A slot whose root filesystem is a whole device or file.",
        f"#[{config.SLOT_PREFIX}2]",
        '#HostName = "build2"',
        '#root = "/dev/vg0/build2-root"',
        "",
        "# Every slot key, commented out.",
        f"#[{config.SLOT_PREFIX}example]",
    ]
    for k in config.KEYS:
        if k.scope == "slot":
            out += _template_key(k)
    return "\n".join(out) + "\n"


def _template_key(k: config.Key) -> List[str]:
    lines = [f"# {line}" for line in _wrap(k.help, 88)]
    if k.default is None or k.default == ():
        example = {"str": '""', "path": '"/path"', "int": "1", "size": '"20G"', "list": '["..."]',
                   "bool": "false", "choice": f'"{k.choices[0]}"' if k.choices else '""'}[k.type]
        lines.append("# (no default) for example:")
    else:
        example = config.ini_value(k.default)
    lines.append(f"#{k.ini} = {example}")
    return lines


def _wrap(text: str, width: int) -> List[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


GENERATED = {
    "docs/config.md": render_reference,
    "vmimagemanager.cfg.template": render_template,
    "docs/vmimagemanager.1": render_man,
    "completions/vmimagemanager": render_completion,
}


def main() -> None:
    for rel, render in GENERATED.items():
        with open(os.path.join(ROOT, rel), "w", encoding="utf-8") as fh:
            fh.write(render())
        print(f"wrote {rel}")


if __name__ == "__main__":
    main()

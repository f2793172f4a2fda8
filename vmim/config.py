"""Configuration: INI file → frozen dataclasses, current (0.3) and legacy (0.2) formats.

One table of keys (`KEYS`) drives parsing, defaults, `--print-config`, the template and
the config reference in docs/. Every problem is collected and reported at once, each with
file, section and key (exit 3).

This module finds, loads and parses the file and renders `--print-config`; the typed values
are in vmim.configtypes, the reading of one section's keys in vmim.configread, the assembly
and checks of slots in vmim.configcheck. Other modules take the names of `__all__` from here.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
from typing import Any, List, Mapping, Optional

from vmim.configcheck import build_slot, check_slots
from vmim.configread import (
    Collector,
    check_duplicates,
    convert_section,
    is_slot_section,
    key_of,
    one_line,
    parse_size,
    read_section,
)
from vmim.configtypes import (
    LEGACY_SECTION,
    LOCAL_SECTION,
    SLOT_PREFIX,
    STANDBY_MOUNT_SUFFIX,
    Config,
    Slot,
)
from vmim.errors import ConfigError
from vmim.keys import KEYS, OBSOLETE_KEYS, Key, default

#: what other modules and tests take from here: the typed values, the key table, the size parser
__all__ = ["DEFAULT_CONFIG_PATH", "ENV_CONFIG", "KEYS", "LEGACY_SECTION", "LOCAL_SECTION",
           "OBSOLETE_KEYS", "SLOT_PREFIX", "STANDBY_MOUNT_SUFFIX", "TEMPLATE_NAME", "Config", "Key",
           "Slot", "find_config_path", "ini_value", "load", "parse", "parse_size", "render_config",
           "template_path"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/vmimagemanager/vmimagemanager.cfg"
ENV_CONFIG = "VMIM_CFG"


# --------------------------------------------------------------------------- lookup


def find_config_path(cli_path: Optional[str], environ: Mapping[str, str] = os.environ) -> str:
    """--config, else $VMIM_CFG, else the default path; exit 3 if the file is missing."""
    if cli_path:
        path, origin = cli_path, "--config"
    elif environ.get(ENV_CONFIG):
        path, origin = environ[ENV_CONFIG], f"${ENV_CONFIG}"
    else:
        path, origin = DEFAULT_CONFIG_PATH, "the default path"
    if os.path.isdir(path):
        raise ConfigError(f"configuration file '{path}' (from {origin}) is a directory; "
                          "give the file in it")
    if not os.path.isfile(path) and origin == "--config" and "://" in path:
        raise ConfigError(f"configuration file '{path}' (from --config) was not found: -c is "
                          "--config here (the 0.2 spelling); for a libvirt URI (virsh's "
                          f"-c) write --connect {path}")
    if not os.path.isfile(path):
        template = template_path()
        copy = (f"copy the template {template} there and edit it, or " if template else
                f"{TEMPLATE_NAME} shows every key; ")
        raise ConfigError(
            f"configuration file '{path}' (from {origin}) was not found; "
            f"{copy}give one with --config or ${ENV_CONFIG}"
        )
    return path


TEMPLATE_NAME = "vmimagemanager.cfg.template"


def template_path() -> str:
    """The configuration template as installed (package or pip prefix), else the source tree's."""
    import sys

    for candidate in (os.path.join(sys.prefix, "share", "vmimagemanager", TEMPLATE_NAME),
                      os.path.join("/usr/share/vmimagemanager", TEMPLATE_NAME),
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   TEMPLATE_NAME)):
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    return ""


def load(cli_path: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> Config:
    path = find_config_path(cli_path, environ)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)


# --------------------------------------------------------------------------- parsing


def parse(text: str, path: str = "<config>") -> Config:
    """Parse configuration text; raise ConfigError listing every problem."""
    cp = configparser.ConfigParser(strict=False, interpolation=configparser.BasicInterpolation())
    cp.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        cp.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: malformed INI: {one_line(str(exc))}") from None

    col = Collector(path)
    twice = check_duplicates(text, cp, col)
    sections = cp.sections()
    current = [s for s in sections if s == LOCAL_SECTION or s.startswith(SLOT_PREFIX)]
    legacy = LEGACY_SECTION in sections
    if current:
        fmt = "current"
        if legacy:
            col.warn(LEGACY_SECTION, None, "legacy section ignored: the file also has "
                     f"[{LOCAL_SECTION}]/[{SLOT_PREFIX}*] sections")
    elif legacy:
        fmt = "legacy"
    else:
        raise ConfigError(
            f"{path}: no [{LOCAL_SECTION}] or [{SLOT_PREFIX}NAME] sections "
            f"(nor a legacy [{LEGACY_SECTION}] section): not a vmimagemanager configuration"
        )

    global_section = LOCAL_SECTION if fmt == "current" else LEGACY_SECTION
    local_raw = read_section(cp, global_section, col) if cp.has_section(global_section) else {}
    local_vals = convert_section(local_raw, global_section, fmt, col, is_local=True)

    slot_sections: List[str] = []
    for s in sections:
        if s == global_section:
            continue
        if fmt == "current":
            if s.startswith(SLOT_PREFIX):
                slot_sections.append(s)
            elif s != LEGACY_SECTION:
                col.warn(s, None, "section is not used (not [vmim.local] or [vmim.vm.NAME])")
        else:
            slot_sections.append(s)

    slot_defaults = {k: v for k, v in local_vals.items() if key_of(k).scope == "slot"}
    slots: List[Slot] = []
    used = {global_section}
    for s in slot_sections:
        raw = read_section(cp, s, col)
        if not is_slot_section(raw, fmt):
            log.debug("%s: [%s] is not an enabled slot", path, s)
            continue
        used.add(s)
        vals = convert_section(raw, s, fmt, col, is_local=False)
        slot = build_slot(s, fmt, vals, slot_defaults, local_vals, col)
        if slot is not None:
            slots.append(slot)

    for section, key, msg in twice:  # in a section that is not used (0.2's [AvailalableHosts]
        # lists hosts, some twice): nothing depends on which value wins
        if section in used:
            col.error(section, key, msg)
        else:
            col.warn(section, key, f"{msg.split(';')[0]} in a section that is not used")
    slots = check_slots(slots, col)
    if col.errors:
        raise ConfigError(col.errors)
    for w in col.warnings:
        log.warning("%s", w)

    return Config(
        path=path,
        format=fmt,
        uri=local_vals.get("uri", default("uri")),
        mount_prefix=local_vals.get("mount_prefix", default("mount_prefix")),
        lockdir=local_vals.get("lockdir", default("lockdir")),
        statedir=local_vals.get("statedir", default("statedir")),
        broker=local_vals.get("broker"),
        broker_ca=local_vals.get("broker_ca"),
        broker_cert=local_vals.get("broker_cert"),
        broker_key=local_vals.get("broker_key"),
        vmlist=tuple(local_vals.get("vmlist", ())),
        slots=tuple(slots),
        defaults=_defaults_view(slot_defaults),
        warnings=tuple(col.warnings),
    )


def _defaults_view(slot_defaults: Mapping[str, Any]) -> Mapping[str, Any]:
    """Slot defaults from [vmim.local], with vminserts and vmextracts standing in for each other."""
    d = dict(slot_defaults)
    d.setdefault("vminserts", d.get("vmextracts"))
    d.setdefault("vmextracts", d.get("vminserts"))
    return d


# --------------------------------------------------------------------------- output


def ini_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def render_config(cfg: Config) -> str:
    """The effective configuration in the current format (defaults filled in)."""
    lines = [f"# effective configuration read from {cfg.path} ({cfg.format} format)", "",
             f"[{LOCAL_SECTION}]"]
    local_attrs = {"uri": cfg.uri, "mount_prefix": cfg.mount_prefix, "lockdir": cfg.lockdir,
                   "statedir": cfg.statedir, "broker": cfg.broker, "broker_ca": cfg.broker_ca,
                   "broker_cert": cfg.broker_cert, "broker_key": cfg.broker_key,
                   "vmlist": cfg.vmlist}
    for k in KEYS:
        if k.scope == "local":
            if local_attrs[k.attr] is None:
                continue
            lines.append(f"{k.ini} = {ini_value(local_attrs[k.attr])}")
        elif k.inherit and cfg.defaults.get(k.attr) is not None:
            lines.append(f"{k.ini} = {ini_value(cfg.defaults[k.attr])}")
    for s in cfg.slots:
        section = s.section if s.section.startswith(SLOT_PREFIX) else SLOT_PREFIX + s.section
        lines += ["", f"[{section}]"]
        for k in KEYS:
            if k.scope != "slot" or k.attr == "enabled":
                continue
            value = getattr(s, k.attr)
            if value is None or value == ():
                continue
            lines.append(f"{k.ini} = {ini_value(value)}")
    return "\n".join(lines) + "\n"

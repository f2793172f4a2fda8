"""Reading a configuration file's sections: each written key looked up in the key table
(current names, aliases, 0.2 names) and its text converted to a typed value, every problem
collected with file, section and key. vmim.config assembles the slots from what this reads."""

from __future__ import annotations

import configparser
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vmim.configtypes import LOCAL_SECTION
from vmim.keys import BY_SCOPE, FALSE_WORDS, KEYS, LEGACY_NAMES, OBSOLETE_KEYS, TRUE_WORDS, Key
from vmim.terminal import CONTROL_CHARACTER


class Collector:
    """The errors and warnings of one file, each prefixed with file, section and key."""

    def __init__(self, path: str):
        self.path = path
        self.errors: List[str] = []
        self.warnings: List[str] = []

    def where(self, section: str, key: Optional[str] = None) -> str:
        return f"{self.path}: [{section}]" + (f" {key}" if key else "")

    def error(self, section: str, key: Optional[str], msg: str) -> None:
        self.errors.append(f"{self.where(section, key)}: {msg}")

    def warn(self, section: str, key: Optional[str], msg: str) -> None:
        self.warnings.append(f"{self.where(section, key)}: {msg}")


def check_duplicates(text: str, cp: configparser.ConfigParser,
                     col: Collector) -> List[Tuple[str, str, str]]:
    """A section written twice (configparser would merge them silently): an error naming both
    lines. A key written twice in a section: returned as (section, key, message), an error
    where the section is used."""
    twice: List[Tuple[str, str, str]] = []
    sections: Dict[str, int] = {}
    keys: Dict[str, int] = {}
    section: Optional[str] = None
    in_value = False
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0].isspace() and in_value:
            continue  # a continuation line of a value
        m = cp.SECTCRE.match(stripped)
        if m:
            section, keys, in_value = m.group("header"), {}, False
            if section in sections:
                col.error(section, None, f"section written twice (lines {sections[section]} "
                          f"and {lineno}); merge them into one")
            sections.setdefault(section, lineno)
            continue
        m = cp.OPTCRE.match(stripped)  # the default delimiters, as parse() uses
        if m is None or section is None:
            continue  # configparser has reported it
        in_value = True
        key = cp.optionxform(m.group("option").rstrip())
        if key in keys:
            twice.append((section, key, f"written twice in this section (lines {keys[key]} and "
                          f"{lineno}); keep one"))
        keys.setdefault(key, lineno)
    return twice


def is_slot_section(raw: Mapping[str, str], fmt: str) -> bool:
    """Whether a section is a slot: current format unless disabled, legacy only when enabled."""
    text = raw.get("vm_slot_enabled")
    if text is None:
        return fmt == "current"
    ok, value = convert_value(key_of("enabled"), text, fmt)
    return bool(value) if ok else True  # an invalid value is reported as an error later


def key_of(attr: str) -> Key:
    for k in KEYS:
        if k.attr == attr:
            return k
    raise KeyError(attr)


def one_line(text: str) -> str:
    return " ".join(text.split())


def read_section(cp: configparser.ConfigParser, section: str, col: Collector) -> Dict[str, str]:
    """Raw strings of the keys written in this section (DEFAULT keys included)."""
    out: Dict[str, str] = {}
    for name in cp.options(section):
        try:
            out[name] = cp.get(section, name)
        except (configparser.InterpolationError, ValueError) as exc:
            col.error(section, name, f"bad %-interpolation ({one_line(str(exc))}); write a literal % as %%")
    return out


def convert_section(raw: Mapping[str, str], section: str, fmt: str, col: Collector,
                     *, is_local: bool) -> Dict[str, Any]:
    """Map written keys to key-table attributes with typed values; warn about unknown ones."""
    vals: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    for name, text in raw.items():
        key = _lookup(name, fmt, is_local)
        if key is None:
            if name in OBSOLETE_KEYS:
                col.warn(section, name, f"obsolete key ignored ({OBSOLETE_KEYS[name]})")
            elif is_local and name in BY_SCOPE["slot"] and not BY_SCOPE["slot"][name].inherit:
                col.warn(section, name, "is a per-slot key and has no default here; ignored")
            elif not is_local and fmt == "current" and name in BY_SCOPE["local"]:
                col.warn(section, name, f"is a key of [{LOCAL_SECTION}], not of a slot; "
                         "ignored here")
            else:
                col.warn(section, name, "unknown key ignored" + _did_you_mean(name, is_local))
            continue
        if key.attr in seen:
            col.warn(section, name, f"also given as '{seen[key.attr]}'; this one wins")
        seen[key.attr] = name
        ok, value = convert_value(key, text, fmt)
        if not ok:
            col.error(section, name, value)
            continue
        if value is None:
            continue
        vals[key.attr] = value
    return vals


def _did_you_mean(name: str, is_local: bool) -> str:
    """'; did you mean HostDisk?' for a misspelt key (the key table's spelling), else ''."""
    import difflib

    spelling: Dict[str, str] = {}
    for k in KEYS:
        if k.scope == "slot" or is_local:
            for n in (k.ini, *k.aliases):
                spelling.setdefault(n.lower(), n)
    close = difflib.get_close_matches(name.lower(), list(spelling), n=1, cutoff=0.75)
    return f"; did you mean {spelling[close[0]]}?" if close else ""


def _lookup(name: str, fmt: str, is_local: bool) -> Optional[Key]:
    scopes = ("local", "slot") if is_local else ("slot",)
    for scope in scopes:
        key = BY_SCOPE[scope].get(name)
        if key is not None and (scope == "local" or not is_local or key.inherit):
            return key
    key = LEGACY_NAMES.get(name)
    if key is not None and (is_local or key.scope == "slot"):
        return key
    return None


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> Optional[int]:
    """Bytes from 1073741824, "1G", "1 GiB", "512M", "1.5T" (powers of 1024), rounded up to
    whole MiB, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        return None
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        return None
    return -(-size // (1 << 20)) << 20  # whole MiB: partition tables and loop devices want it


def _inline_comment(text: str) -> str:
    """The '# ...' or '; ...' after a complete JSON value (`"/srv/x"   # a note`), else ''."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return ""
    m = re.match(r"\s+([#;].*)", text[end:], re.S)
    return m.group(1) if m else ""


def convert_value(key: Key, text: str, fmt: str) -> Tuple[bool, Any]:
    """Return (True, value) — value None meaning 'not set' — or (False, error message)."""
    text = text.strip()
    if fmt == "current":
        try:
            value: Any = json.loads(text)
        except ValueError:
            comment = _inline_comment(text)
            if comment.startswith(";"):  # 0.3's SafeConfigParser dropped ' ; ...': so do we
                value = json.JSONDecoder().raw_decode(text)[0]
            elif comment:
                return False, (f"a comment after the value ({json.dumps(comment)}): the INI "
                               "format takes it as part of the value; put the comment on a "
                               "line of its own")
            else:
                value = text  # a bare value is taken as a string
    else:
        value = text
        if len(text) >= 2 and text[0] == text[-1] == '"':
            value = text[1:-1]
    if value is None or value == "" or value == []:
        return True, None

    t = key.type
    if t in ("str", "path", "choice"):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            return False, f"expected a string, got {json.dumps(value)}"
        if not isinstance(value, str):
            value = text  # a bare number is text for a string key
        if CONTROL_CHARACTER.search(value):  # (JSON's \u0001 gives one) a name in a libvirt
            # definition, a log line, a command's argument: text, never a control
            return False, f"holds a control character: {json.dumps(value)}"
        if t == "path" and not os.path.isabs(value):
            return False, f"expected an absolute path, got {json.dumps(value)}"
        if t == "choice":
            if value.lower() not in key.choices:
                return False, f"expected one of {', '.join(key.choices)}, got {json.dumps(value)}"
            value = value.lower()
        return True, value
    if t == "int":
        if isinstance(value, str) and fmt == "legacy":
            try:
                value = int(value)
            except ValueError:
                return False, f"expected an integer, got {json.dumps(value)}"
        if isinstance(value, bool) or not isinstance(value, int):
            return False, f"expected an integer, got {json.dumps(value)}"
        if key.minimum is not None and value < key.minimum:
            return False, f"must be at least {key.minimum}, got {value}"
        return True, value
    if t == "size":
        size = parse_size(value)
        if size is None:
            return False, f"expected a size such as \"20G\" or a number of bytes, got {json.dumps(value)}"
        if key.minimum is not None and size < key.minimum:
            return False, f"must be at least {key.minimum >> 20} MiB, got {json.dumps(value)}"
        return True, size
    if t == "bool":
        if isinstance(value, bool):
            return True, value
        word = str(value).lower()
        if word in TRUE_WORDS:
            return True, True
        if word in FALSE_WORDS:
            return True, False
        return False, f"expected a boolean (true/false, yes/no, on/off, 1/0), got {json.dumps(value)}"
    if t == "list":
        if isinstance(value, str):
            items = value.replace(",", " ").split() if fmt == "legacy" else [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = value
        else:
            return False, f"expected a list of strings, got {json.dumps(value)}"
        if any(CONTROL_CHARACTER.search(v) for v in items):
            return False, f"holds a control character: {json.dumps(value)}"
        return True, tuple(items)
    raise AssertionError(f"unknown key type {t}")

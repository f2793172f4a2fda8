"""Strict reading of plain (JSON) values into typed ones: only the fields of an allow-list,
each of its own type, strings without NUL bytes and of bounded length, finite numbers within
their range, bounded lists. Whatever else arrives is a ProtocolError, never a crash: this is
what stands between a fleet message and root on a hypervisor."""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

from vmim.errors import ProtocolError
from vmim.terminal import safe

MAX_STRING = 4096  # characters: names, guest directories
MAX_ITEMS = 64  # entries of a list field


def check_string(value: Any, what: str, max_len: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} is not a string ({type(value).__name__})")
    if len(value) > max_len:
        raise ProtocolError(f"{what} is longer than {max_len} characters")
    if "\0" in value:
        raise ProtocolError(f"{what} contains a NUL byte")
    try:  # what a name of the command line holds: UTF-8, other bytes as surrogate escapes
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} holds a lone surrogate (not text that names a file: "
                            f"{ascii(value)[:80]})") from None
    return value


def _shown(number: Any) -> str:
    """A number as an error quotes it: not 400 digits."""
    text = str(number) if not isinstance(number, int) or abs(number) < 10 ** 20 else ""
    return text or f"a number of {len(str(abs(number)))} digits"


class Fields:
    """One object's fields, read once each: `Fields(data, "the job", ALLOWED).string("box")`.
    Missing fields take the given default; `done()` is not needed: unknown fields are refused
    at construction."""

    def __init__(self, data: Any, what: str, allowed: Collection[str]):
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what} is not an object ({type(data).__name__})")
        unknown = sorted(safe(str(k)[:40]) for k in data if k not in allowed)
        if unknown:
            raise ProtocolError(f"{what} has unknown field(s): {', '.join(unknown[:5])}")
        self.data: Mapping[str, Any] = data
        self.what = what

    def _name(self, key: str) -> str:
        return f"{self.what}: {key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, default: Optional[str] = None, *, nullable: bool = False,
               choices: Optional[Sequence[str]] = None, max_len: int = MAX_STRING,
               required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise ProtocolError(f"{self._name(key)} is missing")
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        text = check_string(value, self._name(key), max_len)
        if choices is not None and text not in choices:
            raise ProtocolError(f"{self._name(key)}: '{safe(text[:40])}' is not one of "
                                f"{', '.join(choices)}")
        return text

    def boolean(self, key: str, default: bool = False, *, nullable: bool = False) -> Any:
        value = self.data.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, bool):
            raise ProtocolError(f"{self._name(key)} is not true or false")
        return value

    def integer(self, key: str, default: Optional[int], *, low: int, high: int,
                nullable: bool = False) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{self._name(key)} is not a whole number")
        if not low <= value <= high:
            raise ProtocolError(f"{self._name(key)} = {_shown(value)} is outside {low}..{high}")
        return value

    def number(self, key: str, *, low: float, high: float, required: bool = True,
               default: float = 0.0) -> float:
        if key not in self.data:
            if required:
                raise ProtocolError(f"{self._name(key)} is missing")
            return default
        value = self.data[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError(f"{self._name(key)} is not a number")
        try:  # an int beyond a float's range (10**400) overflows in isfinite
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite or not low <= value <= high:
            raise ProtocolError(f"{self._name(key)} = {_shown(value)} is outside {low:g}..{high:g}")
        return float(value)

    def strings(self, key: str, *, choices: Optional[Sequence[str]] = None,
                max_items: int = MAX_ITEMS, max_len: int = MAX_STRING) -> List[str]:
        items = self.items(key, max_items)
        out = []
        for i, v in enumerate(items):
            text = check_string(v, f"{self._name(key)}[{i}]", max_len)
            if choices is not None and text not in choices:
                raise ProtocolError(f"{self._name(key)}[{i}]: '{safe(text[:40])}' is not one of "
                                    f"{', '.join(choices)}")
            out.append(text)
        return out

    def fields(self, key: str, allowed: Collection[str], *,
               nullable: bool = False) -> Optional[Fields]:
        """An object field read as Fields of its own (None: absent or, when nullable, null)."""
        value = self.data.get(key)
        if value is None and (nullable or key not in self.data):
            return None
        return Fields(value, self._name(key), allowed)

    def rows(self, key: str, allowed: Collection[str], max_items: int = MAX_ITEMS) -> List[Fields]:
        """A list of objects, each read as Fields."""
        return [Fields(v, f"{self._name(key)}[{i}]", allowed)
                for i, v in enumerate(self.items(key, max_items))]

    def items(self, key: str, max_items: int = MAX_ITEMS) -> List[Any]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise ProtocolError(f"{self._name(key)} is not a list")
        if len(value) > max_items:
            raise ProtocolError(f"{self._name(key)} has more than {max_items} entries")
        return value

    def object(self, key: str) -> Dict[str, Any]:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise ProtocolError(f"{self._name(key)} is not an object")
        return dict(value)

"""Strict reading of plain (JSON) values into typed ones: only the fields of an allow-list,
each of its own type, strings without NUL bytes and of bounded length, finite numbers within
their range, bounded lists. Whatever else arrives is a ProtocolError, never a crash: this is
what stands between a fleet message and root on a hypervisor."""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

from vmim.errors import ProtocolError

MAX_STRING = 4096  # characters: names, guest directories
MAX_ITEMS = 64  # entries of a list field


def check_string(value: Any, what: str, max_len: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} is not a string ({type(value).__name__})")
    if len(value) > max_len:
        raise ProtocolError(f"{what} is longer than {max_len} characters")
    if "\0" in value:
        raise ProtocolError(f"{what} contains a NUL byte")
    return value


class Fields:
    """One object's fields, read once each: `Fields(data, "the job", ALLOWED).string("box")`.
    Missing fields take the given default; `done()` is not needed: unknown fields are refused
    at construction."""

    def __init__(self, data: Any, what: str, allowed: Collection[str]):
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what} is not an object ({type(data).__name__})")
        unknown = sorted(str(k)[:40] for k in data if k not in allowed)
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
            raise ProtocolError(f"{self._name(key)}: '{text[:40]}' is not one of "
                                f"{', '.join(choices)}")
        return text

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key, default)
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
            raise ProtocolError(f"{self._name(key)} = {value} is outside {low}..{high}")
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
            raise ProtocolError(f"{self._name(key)} = {value} is outside {low:g}..{high:g}")
        return float(value)

    def strings(self, key: str, *, choices: Optional[Sequence[str]] = None,
                max_items: int = MAX_ITEMS) -> List[str]:
        items = self.items(key, max_items)
        out = []
        for i, v in enumerate(items):
            text = check_string(v, f"{self._name(key)}[{i}]")
            if choices is not None and text not in choices:
                raise ProtocolError(f"{self._name(key)}[{i}]: '{text[:40]}' is not one of "
                                    f"{', '.join(choices)}")
            out.append(text)
        return out

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

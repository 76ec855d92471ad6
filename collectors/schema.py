"""Reading user YAML (config files and scenarios) with errors that name the file and key.

Both `agent/config.py` and the scenario loader read nested mappings the same way:
every value is checked for type and range as it is read, every unknown key is an
error, and an error always says `file: dotted.key: expected …, got …`. User mistakes
become `InputError`; the CLI turns it into exit code 2, never a traceback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

_MISSING = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)


class InputError(Exception):
    """A user-supplied file has a wrong value: names the file, the key path and the expectation."""

    def __init__(self, where: str, path: str, expected: str, got: Any = _MISSING):
        self.where, self.path, self.expected = where, path, expected
        msg = f"{where}: {path}: expected {expected}" if path else f"{where}: expected {expected}"
        if got is not _MISSING:
            msg += f", got {got!r}"
        super().__init__(msg)


def parse_duration(value: Any) -> float | None:
    """'30s', '5m', '2h', '7d', 90 → seconds; None when it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return None


def parse_size(value: Any) -> int | None:
    """'20GiB', '512MiB', '80GB', 1024 → bytes (GB = GiB here: GPU memory sizes are binary)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
            power = " KMGTP".index(unit) if unit else 0
            return int(float(m.group(1)) * 1024**power)
    return None


def load_yaml_file(path: str, what: str) -> Any:
    """Read YAML, turning I/O and syntax problems into an InputError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(path, "", f"an existing {what} file", "no such file") from None
    except OSError as e:
        raise InputError(path, "", f"a readable {what} file", str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise InputError(where, "", f"valid YAML ({getattr(e, 'problem', None) or e})") from None


class Reader:
    """A cursor over one mapping of a YAML document that remembers where it is."""

    def __init__(self, data: Any, where: str, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InputError(where, path, "a mapping", data)
        self.data = data
        self.where = where
        self.path = path
        self._seen: set[str] = set()

    def key(self, name: Any) -> str:
        return f"{self.path}.{name}" if self.path else str(name)

    def error(self, name: Any, expected: str, got: Any = _MISSING) -> InputError:
        return InputError(self.where, self.key(name), expected, got)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._seen.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, "a value (this key is required)")
            return default
        return self.data[name]

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> Any:
        v = self.raw(name, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise self.error(name, "a string" if not choices else f"one of {', '.join(choices)}", v)
        if choices is not None and v not in choices:
            raise self.error(name, f"one of {', '.join(choices)}", v)
        return v

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        v = self.raw(name, default)
        if not isinstance(v, bool):
            raise self.error(name, "true or false", v)
        return v

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        integer: bool = False,
        exclusive_minimum: bool = False,
    ) -> Any:
        v = self.raw(name, default)
        if v is default and default is not _MISSING:
            return v
        kind = "an integer" if integer else "a number"
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise self.error(name, _describe(kind, minimum, maximum, exclusive_minimum), v)
        if minimum is not None and (v < minimum or (exclusive_minimum and v == minimum)):
            raise self.error(name, _describe(kind, minimum, maximum, exclusive_minimum), v)
        if maximum is not None and v > maximum:
            raise self.error(name, _describe(kind, minimum, maximum, exclusive_minimum), v)
        return v

    def duration(self, name: str, default: Any = _MISSING, *, positive: bool = True) -> Any:
        v = self.raw(name, default)
        if v is default and default is not _MISSING:
            return parse_duration(v) if v is not None else None
        d = parse_duration(v)
        if d is None or d < 0 or (positive and d == 0):
            raise self.error(name, "a duration like 30s, 5m, 2h or 7d" + (" (> 0)" if positive else ""), v)
        return d

    def size(self, name: str, default: Any = _MISSING) -> Any:
        v = self.raw(name, default)
        if v is default and default is not _MISSING:
            return v
        s = parse_size(v)
        if s is None or s < 0:
            raise self.error(name, "a size like 20GiB, 512MiB or a number of bytes", v)
        return s

    def section(self, name: str) -> Reader:
        return Reader(self.raw(name, None), self.where, self.key(name))

    def list(self, name: str, default: Any = _MISSING) -> Any:
        v = self.raw(name, default)
        if v is default and default is not _MISSING:
            return v
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.error(name, "a list", v)
        return v

    def mapping(self, name: str) -> Mapping[Any, Any]:
        v = self.raw(name, None)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.error(name, "a mapping", v)
        return v

    def str_map(self, name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.mapping(name).items():
            if not isinstance(k, str) or isinstance(v, (dict, list)) or v is None:
                raise InputError(self.where, f"{self.key(name)}.{k}", "a string value", v)
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
        return out

    def items(self, name: str) -> list[Reader]:
        """A list of mappings, each as its own Reader (path `name[i]`)."""
        return [Reader(item, self.where, f"{self.key(name)}[{i}]") for i, item in enumerate(self.list(name, []))]

    def done(self, extra: Callable[[str], bool] | None = None) -> None:
        """Every key must have been read: a typo is an error, not a silently ignored setting."""
        for k in self.data:
            if k not in self._seen and not (extra and extra(k)):
                known = ", ".join(sorted(self._seen)) or "none"
                raise InputError(self.where, self.key(k), f"a known key (known here: {known})", "unknown key")


def _describe(kind: str, minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} between {minimum:g} and {maximum:g}"
    if minimum is not None:
        if minimum == 0 and not exclusive:
            return f"a non-negative {kind.split()[-1]}"
        return f"{kind} {'>' if exclusive else '>='} {minimum:g}"
    return kind

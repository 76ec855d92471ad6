"""The one validation layer for user files: config, scenarios and price files.

Every user file is read through a `Reader`, a cursor over one YAML mapping that checks type and
range as each value is read. A mistake does not stop the reading: it is recorded as a `Problem`
in a list shared by every Reader of the file, the read returns the default (or a neutral value)
and validation carries on, so that one run of `gpucap check-config` lists every mistake of the
file instead of one per attempt. The top-level loader then raises one `InputError` carrying all
of them, one per line; the CLI turns it into exit code 2, never a traceback.

A problem always names the file, the dotted key, the offending value and what was expected:
`cfg.yaml: nvml.interval: expected a duration like 30s, 5m, 2h or 7d (> 0), got 'fast'`.
An unknown key is an error (a typo must not silently become a default) and suggests the nearest
known key. Why not pydantic: one dependency fewer in a node agent, and messages in our own
wording (dotted path, the value as written, durations and sizes as users write them).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_MISSING: Any = object()  # "no default": the key is required
_SKIP: Any = object()  # internal: the reader should return its fallback without checking

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
MAX_DURATION = 3660 * 86400.0  # ten years: no setting means more, and timers overflow past ~1e9 s
_SHOWN_CHARS = 80  # a whole mapping pasted into a message helps nobody past this


def show(value: Any) -> str:
    """The offending value as the user would recognise it: repr, cut short when it is huge."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def did_you_mean(word: Any, known: Iterable[str]) -> str:
    """`did you mean 'threshold'?` for the closest known word, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in one file. `detail`, when set, replaces "expected …, got …" (unknown keys,
    missing files): there the expectation alone would read oddly."""

    where: str
    path: str
    expected: str
    got: Any = _MISSING
    detail: str = ""
    hint: str = ""

    def __str__(self) -> str:
        if self.detail:
            tail = self.detail
        else:
            tail = f"expected {self.expected}"
            if self.got is not _MISSING:
                tail += f", got {show(self.got)}"
            if self.hint:
                tail += f"; {self.hint}"
        return ": ".join(part for part in (self.where, self.path, tail) if part)


class InputError(Exception):
    """A user-supplied file is wrong. `problems` lists every mistake found (one per line of the
    message); `where`, `path`, `expected` and `got` are the first one's, for callers that only
    need one."""

    def __init__(self, where: str, path: str = "", expected: str = "", got: Any = _MISSING,
                 *, problems: Sequence[Problem] | None = None):
        self.problems: list[Problem] = list(problems) if problems else [Problem(where, path, expected, got)]
        first = self.problems[0]
        self.where, self.path, self.expected, self.got = first.where, first.path, first.expected, first.got
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> InputError:
        first = problems[0]
        return cls(first.where, first.path, first.expected, first.got, problems=problems)


def parse_duration(value: Any) -> float | None:
    """'30s', '5m', '2h', '7d', 90 → seconds; None when it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = _DURATION.match(value) if len(value) <= 40 else None
        if m:
            d = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            return d if math.isfinite(d) else None
    return None


def format_duration(seconds: float) -> str:
    """Seconds as users write them: 86400 → '1d', 90 → '90s', 0.5 → '0.5s'."""
    for unit, size in (("w", 604800.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


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


MAX_FILE_BYTES = 4 * 2**20  # a config, scenario or price file is kilobytes; read no further
MAX_DEPTH = 64  # nesting of mappings and lists; deeper is an attack, not a config
MAX_ALIASES = 100  # YAML aliases (*ref) per file: billion-laughs expands a few dozen into billions
MAX_NODES = 200_000  # scalars, mappings and lists after alias expansion
MAX_INT_DIGITS = 30  # far past any real count or byte size; int('9' * 5000) is slow and refused


class _LimitExceeded(Exception):
    """Raised inside the YAML loader; turned into an InputError naming the file and line."""

    def __init__(self, what: str, mark: Any):
        super().__init__(what)
        self.what, self.mark = what, mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with limits checked while composing, before any expansion costs memory: depth,
    number of aliases, expanded node count, and digits of an integer scalar."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0
        self._expanded: dict[int, int] = {}  # id(node) -> node count of its subtree

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        if alias:
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _LimitExceeded(f"at most {MAX_ALIASES} aliases (*name)", self.peek_event().start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _LimitExceeded(f"nesting at most {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        weight = self._weight(node)
        self._nodes += weight if alias else 1  # an alias costs what it expands to
        if self._nodes > MAX_NODES:
            raise _LimitExceeded(f"at most {MAX_NODES} values after expanding aliases", node.start_mark)
        return node

    def _weight(self, node: Any) -> int:
        """Node count of a subtree, each alias counted as the whole subtree it expands to."""
        key = id(node)
        if key in self._expanded:
            return self._expanded[key]
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(self._expanded.get(id(k), 1) + self._expanded.get(id(v), 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(self._expanded.get(id(v), 1) for v in node.value)
        self._expanded[key] = n
        return n

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _LimitExceeded(f"an integer of at most {MAX_INT_DIGITS} digits", node.start_mark)
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def parse_yaml(text: str, where: str, what: str) -> Any:
    """YAML text → data; a syntax error is an InputError naming the file and line. Fatal for
    this file: nothing after a syntax error can be located reliably. The loader is bounded
    (depth, aliases, expanded size, integer digits), so a hostile file is refused in
    milliseconds instead of exhausting memory or the stack."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass: no arbitrary objects
    except _LimitExceeded as e:
        raise InputError(f"{where}:{e.mark.line + 1}", "", f"a {what} file with {e.what}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        located = f"{where}:{mark.line + 1}" if mark is not None else where
        problem = str(getattr(e, "problem", None) or type(e).__name__)
        raise InputError(located, "", f"valid YAML in a {what} file ({show(problem)[1:-1]})") from None
    except (RecursionError, ValueError, OverflowError, MemoryError) as e:
        raise InputError(where, "", f"valid YAML in a {what} file ({type(e).__name__})") from None


def read_text_file(path: str, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A user file's text: only a regular file, at most `max_bytes` (checked before reading
    further, so /dev/zero or a 10 GB log is refused at once), UTF-8. Raises an InputError that
    names the file and never shows its content."""
    import os
    import stat as _stat

    def fail(detail: str) -> InputError:
        return InputError.of([Problem(path, "", f"a readable {what} file", detail=detail)])

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError.of([Problem(path, "", f"an existing {what} file", detail=f"no such {what} file")]) from None
    except OSError as e:
        raise fail(f"cannot read this {what} file ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise fail(f"not a regular file: a {what} file must be a plain file, not a device, pipe or folder")
        if st.st_size > max_bytes:
            raise fail(f"too large for a {what} file ({st.st_size} bytes, at most {max_bytes})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise fail(f"cannot read this {what} file ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise fail(f"too large for a {what} file (over {max_bytes} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError.of([Problem(f"{path}:{line}", "", f"a UTF-8 {what} file",
                                     detail=f"not UTF-8 text (byte {e.start} is not valid UTF-8)")]) from None


def load_yaml_file(path: str, what: str) -> Any:
    """Read YAML, turning I/O, size, encoding and syntax problems into an InputError naming the file."""
    return parse_yaml(read_text_file(path, what), path, what)


class Reader:
    """A cursor over one mapping of a YAML document that remembers where it is.

    Reads never raise: a wrong value is recorded in `problems` (shared with every child Reader)
    and the read returns the default, else a neutral value, so that validation goes on. A
    Reader over something that is not a mapping records that once and then stays silent
    (`broken`): "targets[0] is not a mapping" is the mistake, not the keys it therefore lacks.
    """

    def __init__(self, data: Any, where: str, path: str = "", problems: list[Problem] | None = None,
                 *, broken: bool = False):
        self.problems: list[Problem] = problems if problems is not None else []
        self.where = where
        self.path = path
        self.broken = broken
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            if not broken and not path:
                # the whole file: it may be any file the user pointed at by mistake; never echo it
                self.problems.append(Problem(where, path, "a mapping at the top level",
                                             detail="expected a mapping at the top level, got "
                                             f"{type(data).__name__} (content not shown)"))
            elif not broken:
                self.problems.append(Problem(where, path, "a mapping", data))
            data, self.broken = {}, True
        self.data: Mapping[Any, Any] = data
        self._seen: set[Any] = set()

    # ---------------------------------------------------------------- bookkeeping
    def key(self, name: Any) -> str:
        return f"{self.path}.{name}" if self.path else str(name)

    def problem(self, name: Any, expected: str, got: Any = _MISSING, *, where: str | None = None,
                hint: str = "", detail: str = "") -> None:
        """Record a mistake at `name` (relative to this mapping; "" for the mapping itself)."""
        path = self.key(name) if name != "" else self.path
        self.problems.append(Problem(where or self.where, path, expected, got, detail, hint))

    def mark(self) -> int:
        """Where the problem list stands now; with `ok_since`, a cross-field check runs only on
        values that were themselves valid (no second, derived complaint about a fallback)."""
        return len(self.problems)

    def ok_since(self, mark: int) -> bool:
        return len(self.problems) == mark and not self.broken

    def raise_problems(self, cls: type[InputError] = InputError) -> None:
        """The top-level loader's last step: every problem of the file in one exception."""
        if self.problems:
            raise cls.of(self.problems)

    def at(self, name: Any, data: Any) -> Reader:
        """A child Reader over `data`, located at `name` below this one (for mapping entries)."""
        return Reader(data, self.where, self.key(name), self.problems, broken=self.broken)

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: Any, default: Any, expected: str) -> Any:
        """The value to check, or _SKIP when the reader should just return its fallback."""
        self._seen.add(name)
        if self.broken:
            return _SKIP
        if name not in self.data:
            if default is _MISSING:
                self.problem(name, expected, detail=f"missing required key, expected {expected}")
            return _SKIP
        v = self.data[name]
        if v is None and default is None:
            return _SKIP  # an explicit null where null is the default
        return v

    @staticmethod
    def _fallback(default: Any, neutral: Any) -> Any:
        return neutral if default is _MISSING else default

    # ---------------------------------------------------------------- typed reads
    def raw(self, name: Any, default: Any = _MISSING) -> Any:
        v = self._get(name, default, "a value")
        return self._fallback(default, None) if v is _SKIP else v

    def str(self, name: Any, default: Any = _MISSING, choices: Sequence[str] | None = None, *,
            nonempty: bool = False, expected: str | None = None) -> Any:
        exp = expected or (f"one of {', '.join(choices)}" if choices
                           else "a non-empty string" if nonempty else "a string")
        v = self._get(name, default, exp)
        if v is _SKIP:
            return self._fallback(default, "")
        if (not isinstance(v, str) or (nonempty and not v.strip())
                or (choices is not None and v not in choices)):
            self.problem(name, exp, v, hint=did_you_mean(v, choices) if choices and isinstance(v, str) else "")
            return self._fallback(default, "")
        return v

    def bool(self, name: Any, default: Any = _MISSING) -> Any:
        v = self._get(name, default, "true or false")
        if v is _SKIP:
            return self._fallback(default, False)
        if not isinstance(v, bool):
            self.problem(name, "true or false", v)
            return self._fallback(default, False)
        return v

    def number(
        self,
        name: Any,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        integer: bool = False,
        exclusive_minimum: bool = False,
        expected: str | None = None,
    ) -> Any:
        kind = "an integer" if integer else "a number"
        exp = expected or _describe(kind, minimum, maximum, exclusive_minimum)
        neutral: Any = 0 if minimum is None else minimum
        if exclusive_minimum and minimum is not None:
            neutral = maximum if maximum is not None else minimum + 1
        if integer:
            neutral = int(neutral)
        v = self._get(name, default, exp)
        if v is _SKIP:
            return self._fallback(default, neutral)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if (isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v))
                or (minimum is not None and (v < minimum or (exclusive_minimum and v == minimum)))
                or (maximum is not None and v > maximum)):
            self.problem(name, exp, v)
            return self._fallback(default, neutral)
        return v

    def duration(self, name: Any, default: Any = _MISSING, *, positive: bool = True,
                 minimum: float | None = None, maximum: float = MAX_DURATION) -> Any:
        """A duration in seconds, bounded: a value that passes here must be usable as a timer
        (`1e308` seconds kills a thread's wait with OverflowError; 0.001 s spins a core)."""
        exp = "a duration like 30s, 5m, 2h or 7d" + (" (> 0)" if positive else "")
        fallback = 1.0 if default is _MISSING else (parse_duration(default) if default is not None else None)
        v = self._get(name, default, exp)
        if v is _SKIP:
            return fallback
        d = parse_duration(v)
        if d is None or d < 0 or (positive and d == 0):
            self.problem(name, exp, v)
            return fallback
        if (minimum is not None and d < minimum) or d > maximum:
            bound = (f"between {format_duration(minimum)} and {format_duration(maximum)}" if minimum is not None
                     else f"of at most {format_duration(maximum)}")
            self.problem(name, f"a duration {bound}", v)
            return fallback
        return d

    def size(self, name: Any, default: Any = _MISSING) -> Any:
        exp = "a size like 20GiB, 512MiB or a number of bytes"
        v = self._get(name, default, exp)
        if v is _SKIP:
            return self._fallback(default, 0)
        s = parse_size(v)
        if s is None or s < 0:
            self.problem(name, exp, v)
            return self._fallback(default, 0)
        return s

    def text(self, name: Any, default: str = "") -> str:
        """Free text such as a source or a date: YAML reads an unquoted 2026-07-20 as a date,
        which is what the user meant as text."""
        v = self._get(name, default, "a string")
        if v is _SKIP:
            return default
        if isinstance(v, _dt.date):
            return v.isoformat()
        if not isinstance(v, str):
            self.problem(name, "a string", v)
            return default
        return v

    def section(self, name: Any) -> Reader:
        """The mapping at `name` as a child Reader (absent or null: an empty mapping)."""
        self._seen.add(name)
        return Reader(self.data.get(name), self.where, self.key(name), self.problems, broken=self.broken)

    def list(self, name: Any, default: Any = _MISSING) -> Any:
        v = self._get(name, default, "a list")
        if v is _SKIP:
            return self._fallback(default, [])
        if v is None:
            return []
        if not isinstance(v, list):
            self.problem(name, "a list", v)
            return self._fallback(default, [])
        return v

    def mapping(self, name: Any) -> Mapping[Any, Any]:
        v = self._get(name, None, "a mapping")
        if v is _SKIP:
            return {}
        if not isinstance(v, Mapping):
            self.problem(name, "a mapping", v)
            return {}
        return v

    def str_map(self, name: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.mapping(name).items():
            if not isinstance(k, str) or isinstance(v, (dict, list)) or v is None:
                self.problem(f"{name}.{k}", "a string value", v)
                continue
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
        return out

    def items(self, name: Any) -> list[Reader]:
        """A list of mappings, each as its own Reader (path `name[i]`)."""
        return [Reader(item, self.where, f"{self.key(name)}[{i}]", self.problems, broken=self.broken)
                for i, item in enumerate(self.list(name, []))]

    def ignore_rest(self) -> None:
        """Accept the keys not read: used when an earlier mistake (an unknown `kind`) means we
        cannot know which keys belong here, so "unknown key" would be a guess."""
        self._seen.update(self.data)

    def done(self, extra: Callable[[Any], bool] | None = None, aliases: Mapping[str, str] | None = None) -> None:
        """Every key must have been read: a typo is an error, not a silently ignored setting.
        `aliases` names the known key meant by a likely confusion that is no typo (the
        `kubelet:` section configures the `podresources` collector)."""
        if self.broken:
            return
        known = sorted(str(k) for k in self._seen)
        for k in self.data:
            if k in self._seen or (extra and extra(k)):
                continue
            hint = f"did you mean {aliases[k]!r}?" if aliases and k in aliases else did_you_mean(k, known)
            listed = ", ".join(known) or "none"
            self.problem(k, f"a known key (known here: {listed})", k,
                         detail=f"unknown key (known here: {listed}{'; ' + hint if hint else ''})")


def _describe(kind: str, minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        if exclusive:
            return f"{kind} in ({minimum:g}, {maximum:g}]"
        return f"{kind} between {minimum:g} and {maximum:g}"
    if minimum is not None:
        if minimum == 0 and not exclusive:
            return f"a non-negative {kind.split()[-1]}"
        return f"{kind} {'>' if exclusive else '>='} {minimum:g}"
    return kind

"""Terminal output for every gpucap table (snapshot, cost, recommend): one width and colour policy.

Why one module: a table that ignores the terminal wraps each row onto three lines, and colour on a
pipe puts escape codes into `grep`. So every command asks `Out.detect()` once and renders through
`rich` (column widths, truncation with an ellipsis, wrapping of prose), never by hand padding:

- width: `COLUMNS` if set, else the terminal's width on a TTY, else 80; `--wide` lifts the limit so
  no column is ever cut (like `kubectl -o wide`);
- colour: only on a TTY, never when `NO_COLOR` is set (https://no-color.org), never when piped;
- lines carry no trailing blanks, so piped output diffs and greps cleanly.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

WIDE = 10_000  # "no limit": rich shrinks nothing in a table narrower than this

# what a person should notice first; everything else stays plain
STATE_STYLES = {
    "lost": "bold red",
    "idle_reserved": "bold yellow",
    "unknown": "magenta",
    "unallocated": "dim",
    "saturated": "bold red",
    "failing": "red",
}


def terminal_width(stream: object = None) -> int:
    """COLUMNS wins (a user's or a test's explicit choice), then the TTY's width, else 80."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return 80


def colour_wanted(stream: object = None) -> bool:
    if os.environ.get("NO_COLOR", ""):
        return False
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


@dataclass
class Out:
    """Collects renderables and turns them into text with the chosen width and colour."""

    width: int = 80
    colour: bool = False
    parts: list[RenderableType | str] = field(default_factory=list)

    @classmethod
    def detect(cls, wide: bool = False, stream: object = None) -> Out:
        return cls(width=WIDE if wide else terminal_width(stream), colour=colour_wanted(stream))

    def add(self, item: RenderableType | str) -> None:
        self.parts.append(item)

    def text(self, line: str = "", style: str = "") -> None:
        self.parts.append(Text(line, style=style))

    def render(self) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=self.width, force_terminal=self.colour,
                          color_system="standard" if self.colour else None, no_color=not self.colour,
                          highlight=False, markup=False, emoji=False, soft_wrap=False,
                          legacy_windows=False, _environ={})
        for part in self.parts:
            console.print(part)
        return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "left"  # left | right
    shrink: bool = False  # may be cut with an ellipsis when the terminal is narrow (names, not numbers)
    min_width: int | None = None
    wrap: bool = False  # prose: takes what the other columns leave and wraps onto more lines


def table(columns: Sequence[Column], rows: Sequence[Sequence[str | Text]], *, headers: bool = True,
          width: int = WIDE) -> Table:
    """A borderless table like kubectl's that fits `width`: numbers and states are never cut (their
    column keeps its widest cell); names (`shrink` columns) share what is left, cut with an ellipsis."""
    gap = 2
    natural = [max([len(c.header) if headers else 0] + [len(str(r[i])) for r in rows])
               for i, c in enumerate(columns)]
    fixed = sum(w for w, c in zip(natural, columns) if not c.shrink) + gap * (len(columns) - 1)
    flexible = [i for i, c in enumerate(columns) if c.shrink]
    widths = list(natural)
    want = sum(natural[i] for i in flexible)
    budget = width - fixed
    if flexible and want > budget:
        floor = {i: min(natural[i], columns[i].min_width or 4) for i in flexible}
        spare = max(0, budget - sum(floor.values()))
        extra = {i: natural[i] - floor[i] for i in flexible}
        total_extra = sum(extra.values()) or 1
        for i in flexible:
            widths[i] = floor[i] + (spare * extra[i]) // total_extra
    for i, c in enumerate(columns):
        if c.wrap:
            others = sum(w for j, w in enumerate(widths) if j != i) + gap * (len(columns) - 1)
            widths[i] = min(natural[i], max(c.min_width or 20, width - others))
    t = Table(box=None, show_header=headers, header_style="bold", pad_edge=False, padding=(0, gap, 0, 0),
              show_edge=False, expand=False, collapse_padding=True)
    for i, c in enumerate(columns):
        t.add_column(c.header, justify=c.justify, no_wrap=not c.wrap,  # type: ignore[arg-type]
                     overflow="fold" if c.wrap else "ellipsis", width=max(1, widths[i]))
    for r in rows:
        t.add_row(*r)
    return t


def styled(value: str, key: str) -> Text:
    """A cell coloured for its meaning (`STATE_STYLES`); plain where there is no colour."""
    return Text(value, style=STATE_STYLES.get(key, ""))


class Progress:
    """A progress bar on stderr for work longer than a second (`--at`, fast-forwards, fleet queries).

    Only on a terminal: a pipe, a log file or CI gets nothing, so stderr stays for errors there.
    Use as a context manager and call the instance with the fraction done (0-1)."""

    def __init__(self, label: str, stream: object = None):
        self.label = label
        self._stream = stream if stream is not None else sys.stderr
        self._bar: object | None = None
        self._task: object | None = None

    def __enter__(self) -> Self:
        isatty = getattr(self._stream, "isatty", None)
        if callable(isatty) and isatty():
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            console = Console(file=self._stream, no_color=bool(os.environ.get("NO_COLOR", "")))  # type: ignore[arg-type]
            bar = Bar(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                      console=console, transient=True)
            bar.start()
            self._task = bar.add_task(self.label, total=1.0)
            self._bar = bar
        return self

    def __call__(self, fraction: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=max(0.0, min(1.0, fraction)))  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()  # type: ignore[attr-defined]
            self._bar = None

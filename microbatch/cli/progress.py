"""What the ``microbatch`` command shows while a pipeline runs, and how it prints values.

Three displays share one small interface (``start``, ``update``, ``close``):

- :class:`RichDisplay`: a live progress bar on stderr (needs the ``rich`` package, the ``cli`` extra):
  records, records/s, batches, bytes read of the file's size with the estimated time left, queue
  depth, retries and dead letters, refreshed a few times a second.
- :class:`LogDisplay`: one ``logging`` line every ``interval`` seconds, for a terminal without
  ``rich`` or when progress is forced onto a non-terminal.
- :class:`NullDisplay`: nothing.

Nothing here writes to stdout: stdout carries only results.
"""

from __future__ import annotations

import json
import logging
import math
import pprint
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol, TextIO

__all__ = [
    "Display",
    "LogDisplay",
    "NullDisplay",
    "RichDisplay",
    "format_bytes",
    "format_value",
    "make_display",
    "progress_text",
    "stats_line",
    "to_json",
]

log = logging.getLogger("microbatch.cli")


class Display(Protocol):
    """Receives the run's updates; ``total`` is the input's size in bytes when known."""

    def start(self, total: int | None, initial: int) -> None: ...

    def update(self, stats: Any) -> None: ...

    def close(self) -> None: ...


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: float) -> str:
    """``1234567`` -> ``1,234,567``; floats with one decimal below 100."""
    if isinstance(n, float) and not n.is_integer():
        return f"{n:,.1f}" if n < 100 else f"{n:,.0f}"
    return f"{int(n):,}"


def _counted(n: float, one: str, many: str) -> str:
    return f"{format_count(n)} {one if n == 1 else many}"


def stats_line(stats: Any, *, wall: float | None = None) -> str:
    """One line about this run's counters: ``1,000 records in 10 batches, 0.40 s (2,500 records/s)``,
    or with ``wall``: ``1,000 records in 10 batches, 0.65 s wall time (1,538/s)``.

    Records are those whose results count; dead letters are counted apart, and the batches a
    resumed run inherited are named apart too. ``wall``: the command's wall time in seconds, which
    the line then gives (and the rate is over) instead of the time to the last folded batch.
    """
    good = stats.run_records - stats.dead_letters
    seconds = stats.elapsed if wall is None else wall
    rate = good / seconds if seconds > 0 else 0.0
    parts = [
        f"{_counted(good, 'record', 'records')} in {_counted(stats.run_batches, 'batch', 'batches')}",
        f"{seconds:.2f} s wall time ({format_count(rate)}/s)"
        if wall is not None
        else f"{seconds:.2f} s ({format_count(rate)} records/s)",
    ]
    extra = []
    if stats.dead_letters:
        extra.append(_counted(stats.dead_letters, "dead letter", "dead letters"))
    if stats.retries:
        extra.append(f"{stats.retries} retries")
    if stats.crashes:
        extra.append(f"{stats.crashes} worker crashes")
    if stats.timeouts:
        extra.append(f"{stats.timeouts} timeouts")
    if stats.batches > stats.run_batches:
        extra.append(f"resumed after {_counted(stats.batches - stats.run_batches, 'batch', 'batches')}")
    line = ", ".join(parts)
    if extra:
        line += "; " + ", ".join(extra)
    return line


class NullDisplay:
    """Shows nothing."""

    def start(self, total: int | None, initial: int) -> None:
        pass

    def update(self, stats: Any) -> None:
        pass

    def close(self) -> None:
        pass


class LogDisplay:
    """Logs a progress line at INFO level at most every ``interval`` seconds (default 2 s)."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.total: int | None = None
        self._last = 0.0

    def start(self, total: int | None, initial: int) -> None:
        self.total = total
        self._last = time.monotonic()

    def update(self, stats: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        line = stats_line(stats)
        if self.total and isinstance(stats.position, int):
            line += f"; read {format_bytes(stats.position)} of {format_bytes(self.total)}"
        log.info("progress: %s", line)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(stats: Any, *, total: int | None, initial: int, byte_positions: bool, width: int) -> str:
    """The progress line: records, rate, batches, bytes read and time left, queue, retries, dead letters.

    Parts are dropped, least useful first, until the line fits ``width`` columns, so that a live
    display never wraps. ``byte_positions`` says that ``stats.position`` is a byte offset (a file);
    otherwise (standard input, TCP) no byte counts are shown. Records always are.
    """
    count = format_count
    parts: list[tuple[int, str]] = [  # (priority: lower is kept longer, text) in display order
        (0, f"{count(stats.records)} records"),
        (1, f"{count(stats.records_per_second)}/s"),
        (2, f"{count(stats.batches)} batches"),
    ]
    position = stats.position if byte_positions and isinstance(stats.position, int) else None
    if position is not None:
        read = format_bytes(position) + (f"/{format_bytes(total)}" if total else "")
        parts.append((3, read))
        done = position - initial
        if total and done > 0 and stats.elapsed > 0 and position < total:
            parts.append((4, "eta " + _clock((total - position) * stats.elapsed / done)))
    parts.append((5, f"queue {stats.queue_depth}"))
    if stats.retries:
        parts.append((6, f"retries {stats.retries}"))
    if stats.dead_letters:
        parts.append((3, f"dead {stats.dead_letters}"))
    by_priority = sorted(range(len(parts)), key=lambda i: parts[i][0])
    while True:
        line = "  ".join(parts[i][1] for i in sorted(by_priority))
        if len(line) <= width or len(by_priority) == 1:
            return line[:width]
        by_priority.pop()


class RichDisplay:
    """A live ``rich`` progress line on ``stream`` (stderr), refreshed ``refresh_per_second`` times.

    The line (see :func:`progress_text`) never exceeds the terminal's width. With a known total (a
    file that is not followed) it shows bytes read of the file's size and the estimated time left,
    and a bar on a terminal at least 110 columns wide. Log records emitted while it is live print
    above it (see :meth:`log_handler`).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        refresh_per_second: float = 8.0,
        force_terminal: bool = False,
        byte_positions: bool = True,
    ) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = Console(file=stream, force_terminal=force_terminal or None, highlight=False)
        self.byte_positions = byte_positions
        self._bar = self.console.width >= 110 and byte_positions
        columns: list[Any] = [TextColumn("{task.fields[line]}", markup=False)]
        if self._bar:
            columns.insert(0, BarColumn(bar_width=20))
        self.progress = Progress(
            *columns,
            console=self.console,
            refresh_per_second=refresh_per_second,
            transient=False,
        )
        self._task: Any = None
        self._total: int | None = None
        self._initial = 0

    def log_handler(self) -> logging.Handler:
        """A logging handler that prints above the live display."""
        from rich.logging import RichHandler

        return RichHandler(
            console=self.console, show_time=False, show_path=False, markup=False, rich_tracebacks=False
        )

    def start(self, total: int | None, initial: int) -> None:
        self._total, self._initial = total, initial
        self.progress.start()
        self._task = self.progress.add_task("run", total=total, completed=initial, line="starting")

    def update(self, stats: Any) -> None:
        if self._task is None:
            return
        # One column less than the terminal: a line that fills the last column wraps on some terminals.
        width = self.console.width - 1 - (21 if self._bar else 0)
        line = progress_text(
            stats,
            total=self._total,
            initial=self._initial,
            byte_positions=self.byte_positions,
            width=width,
        )
        position = stats.position if self.byte_positions and isinstance(stats.position, int) else None
        self.progress.update(self._task, completed=position, line=line)

    def close(self) -> None:
        if self._task is not None:
            self.progress.refresh()
        self.progress.stop()


def make_display(
    mode: bool | None, stream: TextIO, *, byte_positions: bool = True
) -> tuple[Display, logging.Handler | None]:
    """The display for ``--progress`` (True), ``--no-progress`` (False) or neither (None: a terminal).

    ``byte_positions``: the run's positions are byte offsets (a file), shown as bytes read; for
    other inputs (standard input, TCP) only records are counted. Returns the display and, for a
    live ``rich`` display, the logging handler to use meanwhile. Without ``rich`` installed, forced
    progress falls back to :class:`LogDisplay`.
    """
    isatty = stream.isatty()
    if mode is None:
        mode = isatty
    if not mode:
        return NullDisplay(), None
    try:
        display = RichDisplay(stream, force_terminal=not isatty, byte_positions=byte_positions)
    except ImportError:
        log.debug("rich is not installed (pip install 'microbatch[cli]'): progress as log lines")
        return LogDisplay(), None
    return display, display.log_handler()


# --- values ------------------------------------------------------------------------------------------


def to_json(value: Any) -> str:
    """``value`` as one line of JSON, whatever the types of its keys.

    A mapping whose keys are all ``str`` is a JSON object; any other mapping (``int`` or tuple
    keys, as ``ByKey`` holds) is an array of ``[key, value]`` pairs, so no key changes type;
    tuples are arrays, sets sorted arrays, dataclasses and named tuples objects; NaN and the
    infinities are ``null``. Raises ``TypeError`` naming a type JSON cannot hold.
    """
    return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            return {key: _jsonable(item) for key, item in value.items()}
        return [[_jsonable(key), _jsonable(item)] for key, item in value.items()]
    if hasattr(value, "_asdict"):  # a named tuple
        return _jsonable(value._asdict())
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return [_jsonable(item) for item in sorted(value, key=repr)]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    raise TypeError(
        f"the value holds a {type(value).__qualname__}, which JSON cannot represent; "
        "return numbers, str, lists, tuples or dicts"
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def format_value(value: Any, *, human: bool = False) -> str:
    """A readable rendering of a final value.

    A number prints as Python prints it (``5000050000``), so that ``x=$(microbatch run ...)`` holds
    a number the shell and other programs read; ``human=True`` (``--human``) adds thousands
    separators (``5,000,050,000``). A sequence of ``(key, number)`` pairs (``TopK``'s value)
    becomes aligned ``number  key`` lines, a mapping ``key  value`` lines, a string itself;
    anything else is pretty-printed.
    """
    sep = "," if human else ""
    if isinstance(value, str):
        return value
    if _is_number(value):
        return f"{value:,}" if human and not isinstance(value, bool) else str(value)
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in value)
    ):
        pairs = [(k, n) if _is_number(n) else (n, k) for k, n in value]
        if all(_is_number(n) for _, n in pairs):
            width = max(len(f"{n:{sep}}") for _, n in pairs)
            return "\n".join(f"{n:>{width}{sep}}  {k}" for k, n in pairs)
    if isinstance(value, Mapping) and value:
        width = max(len(str(k)) for k in value)
        return "\n".join(
            f"{k!s:<{width}}  {format_value(v, human=human) if _is_number(v) else v}"
            for k, v in value.items()
        )
    return pprint.pformat(value, width=100, sort_dicts=False)

"""``microbatch run`` with a ``Windows`` aggregate: each closed window printed as it closes.

A line ``START END [KEY] VALUE`` with ISO-8601 UTC times, or one JSON object per window with
``--json``. The lines of a batch's windows are written and flushed before the checkpoint that
evicts those windows is written, so after ``kill -9`` a rerun prints a window again rather than
never: identical lines that a reader can deduplicate by ``START END KEY``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TextIO

from .._core.keys import key_to_json
from ..aggregate.windows import Closed, WindowResult, Windows, each_result, iso

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["print_windows", "window_line"]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(key_to_json(value) if isinstance(value, tuple) else value, default=str)


def window_line(window: WindowResult, *, as_json: bool) -> str:
    """One window as a line of text (no newline)."""
    if as_json:
        return json.dumps(window.to_json(), default=str)
    key = "" if window.key is None else f" {_text(window.key)}"
    return f"{iso(window.start)} {iso(window.end)}{key} {_text(window.value)}"


class _Printer:
    """A pipeline sink that prints each batch's closed windows, then calls the pipeline's own sink."""

    def __init__(self, user: Callable[[int, Any], Awaitable[None]] | None, as_json: bool,
                 out: TextIO) -> None:
        self.user = user
        self.as_json = as_json
        self.out = out

    async def __call__(self, seq: int, window: WindowResult) -> None:
        await self.deliver(seq, [window])

    async def deliver(self, seq: int, windows: list[Closed]) -> None:
        if self.user is not None:
            for window in each_result(windows):
                await self.user(seq, window)
        as_json = self.as_json
        self.out.write("".join(window_line(w, as_json=as_json) + "\n" for w in each_result(windows)))
        self.out.flush()


def print_windows(pipeline: Pipeline[Any, Any], *, as_json: bool) -> tuple[Pipeline[Any, Any], bool]:
    """The pipeline with a sink that prints closed windows, and whether it has windows at all."""
    if not isinstance(pipeline.aggregate, Windows):
        return pipeline, False
    return pipeline.replace(sink=_Printer(pipeline.sink, as_json, sys.stdout)), True


def windows_summary(state: Any, description: str) -> dict[str, Any] | None:
    """What ``inspect`` shows of a ``Windows`` state: the watermark, the open windows and the
    counts (None for any other state). ``description`` is the aggregate's ``describe()``, which
    holds ``grace``."""
    import re

    from ..aggregate.windows import FORMAT
    from ..checkpoints.windowfiles import is_manifest

    if is_manifest(state) and isinstance(state.get("state"), dict):  # keyed windows, one file each
        windows = [[w.get("start"), {"count": w.get("count")}] for w in state.get("windows", [])
                   if isinstance(w, dict)]
        state = {**state["state"], "windows": windows}
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    found = re.search(r"grace=([0-9.e+-]+)", description)
    top = state.get("top")
    mark = None if top is None or found is None else top - float(found.group(1))
    if "sessions" in state:
        opened = [(s[1], s[2], s[0]) for s in state["sessions"]]
        spans = [f"{iso(first)}..{iso(last)} (session of {key!r})" for first, last, key in sorted(
            opened, key=lambda s: (s[0], json.dumps(s[2])))]
    else:
        size = re.search(r"size=([0-9.e+-]+)", description)
        spans = [f"{iso(start)}" + (f" {iso(start + float(size.group(1)))}" if size else "")
                 + (f" ({len(inner['keys'])} keys)" if isinstance(inner, dict) and "keys" in inner else "")
                 + (f" ({inner['count']} keys)" if isinstance(inner, dict) and "count" in inner else "")
                 for start, inner in sorted(state.get("windows", []), key=lambda w: w[0])]
    return {"watermark": None if mark is None else iso(mark), "open_windows": spans,
            "emitted": state.get("emitted"), "late_records": state.get("late")}

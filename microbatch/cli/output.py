"""What the command writes on stdout: results only (the final value, or a map pipeline's results).

A reader that goes away (``microbatch run ... | head -1``) ends the command as it ends other Unix
tools: quietly, with exit status 141 (128 + SIGPIPE), no traceback. :func:`silence_stdout` points
stdout at ``/dev/null`` first, so that the interpreter's own last flush does not fail again.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .progress import format_value, to_json

__all__ = ["Output", "silence_stdout"]


class Output:
    """Writes values on stdout: readable (``format_value``) or, with ``as_json``, one JSON line each."""

    def __init__(self, *, as_json: bool, human: bool) -> None:
        self.as_json = as_json
        self.human = human

    def value(self, value: Any) -> None:
        """The final value: readable (maybe several lines) or one line of JSON."""
        self._write((to_json(value) if self.as_json else format_value(value, human=self.human)) + "\n")

    def results(self, results: list[Any]) -> None:
        """A map pipeline's results of one batch, one line each (JSON Lines with ``as_json``).

        Readable: a ``str`` as it is, anything else as Python's ``repr`` (one line).
        """
        if results:
            self._write("".join(self._line(result) + "\n" for result in results))

    def _line(self, result: Any) -> str:
        if self.as_json:
            return to_json(result)
        return result if isinstance(result, str) else repr(result)

    @staticmethod
    def _write(text: str) -> None:
        # Looked up at each write: tests and embedding programs may replace sys.stdout.
        sys.stdout.write(text)
        sys.stdout.flush()


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away (what is still buffered is dropped)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)

"""What a worker runs for one batch: turn the shipped payload into records and call ``fn``.

Line sources ship a batch as one :class:`~microbatch._core.lines.LineBlock` of raw bytes; splitting and
decoding happen here, in the worker, so the event loop never creates per-line objects. Other sources
ship the list of records itself. This module stays free of anyio: worker processes import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .lines import LineBlock, decode_lines
from .params import callable_name

__all__ = ["BatchTask"]

R = TypeVar("R")


class BatchTask(Generic[R]):
    """Calls ``fn(records)`` for a payload: a list of records or a block of lines to decode."""

    __slots__ = ("encoding", "errors", "fn", "where")

    def __init__(
        self,
        fn: Callable[[list[Any]], R],
        *,
        encoding: str | None = "utf-8",
        errors: str = "strict",
        where: str = "<records>",
    ) -> None:
        self.fn = fn
        self.encoding = encoding
        self.errors = errors
        self.where = where

    def records(self, payload: LineBlock | list[Any]) -> list[Any]:
        """The records a payload stands for."""
        if isinstance(payload, LineBlock):
            return decode_lines(
                payload.data,
                encoding=self.encoding,
                errors=self.errors,
                where=self.where,
                start=payload.start,
            )
        return payload

    def __repr__(self) -> str:
        # Messages name the user's function, never this wrapper's address.
        return f"BatchTask({callable_name(self.fn)})"

    def __call__(self, payload: LineBlock | list[Any]) -> R:
        return self.fn(self.records(payload))

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fn, self.encoding, self.errors, self.where)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fn, self.encoding, self.errors, self.where = state

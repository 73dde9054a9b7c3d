"""``pipeline.windows(source)``: the closed time windows of a run, as they close.

The fold stage hands each batch's closed windows to :class:`WindowStream` as one list, then waits
until the consumer asks for the window after the list's last one (a marker sent after the list
is received only then). The checkpoint that evicts those windows from the state is written after
that wait: a window a checkpoint records as emitted was taken by the consumer, and a window the
consumer had not yet taken is still in the checkpoint, so it comes out again after a resume.
"""

from __future__ import annotations

import collections
import warnings
from typing import TYPE_CHECKING, Any

import anyio

from ..aggregate.windows import Closed, KeyedWindow, WindowResult, each_result
from .run import Run
from .stats import Stats

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from .pipeline import Pipeline, Source, Target

__all__ = ["WindowStream"]

_TAKEN = None  # the marker received once the consumer asked for more than a list's windows


class _Deliver:
    """The sink a window stream gives its run: lists of windows in, and the end of the run."""

    def __init__(self, stream: WindowStream, user: Callable[[int, Any], Awaitable[None]] | None) -> None:
        self.stream = stream
        self.user = user

    async def __call__(self, seq: int, window: Any) -> None:  # the sink's plain form, unused here
        await self.deliver(seq, [window])

    async def deliver(self, seq: int, windows: list[Closed]) -> None:
        if self.user is not None:
            for window in each_result(windows):
                await self.user(seq, window)
        await self.stream._send.send(windows)
        await self.stream._send.send(_TAKEN)

    def end(self) -> None:
        self.stream._send.close()


class WindowStream:
    """The closed windows of one run, in close order: ``async for w in pipeline.windows(src)``.

    A plain ``async for`` starts the run at the first window and stops it when the windows end, or
    when an error or cancellation reaches the loop. ``async with pipeline.windows(src) as windows:``
    also stops it when the block is left early (``break``): use it whenever the loop may be left
    before the windows end. A plain ``async for`` left by ``break`` cannot stop its run (nothing
    tells an async iterator that its loop was left): the run's task group stays open in the
    consumer's task, which trio reports as an internal error when the task ends, and a
    ``ResourceWarning`` names the fix.
    Leaving early writes a final checkpoint of what was folded, as ``updates()`` does, unless the
    consumer left amid the windows of one batch: the checkpoint before that batch then stands, and a
    rerun hands those windows over again.
    """

    def __init__(
        self, pipeline: Pipeline[Any, Any], source: Source, checkpoint: Target | None, fresh: bool,
        accept_changes: bool,
    ) -> None:
        self._send, self._recv = anyio.create_memory_object_stream[list[Closed] | None](0)
        run_pipeline = pipeline.replace(sink=_Deliver(self, pipeline.sink))
        self.run: Run[Any, Any] = Run(run_pipeline, source, checkpoint, fresh,
                                      accept_changes=accept_changes)
        self._ready: collections.deque[Closed] = collections.deque()
        self._state = "new"  # then "open", "closed"

    @property
    def stats(self) -> Stats:
        """The run's counters (``late_records`` among them)."""
        return self.run.stats

    async def __aenter__(self) -> WindowStream:
        await self._open()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._close(*exc_info)

    async def _open(self) -> None:
        if self._state != "new":
            raise RuntimeError("a window stream runs once: call pipeline.windows() again")
        self._state = "open"
        try:
            await self.run.__aenter__()
        except BaseException:
            self._state = "closed"  # the run did not start: nothing to stop
            raise
        if self.run.fold_stage is None:  # the checkpoint is of a finished run: nothing to fold
            self._send.close()

    async def _close(self, *exc_info: Any) -> bool | None:
        if self._state != "open":
            return None
        self._state = "closed"
        try:
            return await self.run.__aexit__(*exc_info)  # stops the fold stage before it could see ...
        finally:
            self._recv.close()  # ... a closed stream: a stopped run is not a failed one

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            warnings.warn(
                "a window stream was left while its run was going (a plain 'async for' left by "
                "'break'?): use 'async with pipeline.windows(...) as windows: async for w in windows' "
                "to leave early", ResourceWarning, stacklevel=1,
            )

    async def aclose(self) -> None:
        """Stop the run (as leaving ``async with`` does)."""
        await self._close(None, None, None)

    def __aiter__(self) -> AsyncIterator[WindowResult]:
        if self._state == "open":
            return self._each(True)  # type: ignore[return-value]  # entered: no run to start or stop here
        return self

    def by_window(self) -> AsyncIterator[WindowResult | KeyedWindow]:
        """The closed windows one per window: a keyed window (``ByKey`` inner) as one
        :class:`~microbatch.KeyedWindow` holding every key's value, others as ``WindowResult``.
        The same windows in the same order as ``async for w in stream``, with the same guarantees,
        but no object per key: ``async for window in stream.by_window()``."""
        if self._state == "open":
            return self._each(False)
        return _ByWindow(self)

    async def _each(self, expand: bool) -> AsyncIterator[Closed]:
        """The windows, for a stream entered with ``async with`` (an async generator step costs
        less than an ``__anext__`` call, and this one holds no cancel scope across its yields);
        ``expand``: a ``KeyedWindow`` as its ``WindowResult``s."""
        recv = self._recv
        while self._ready:
            item = self._ready.popleft()
            if expand and type(item) is KeyedWindow:
                for window in item.results():
                    yield window
            else:
                yield item
        while True:
            try:
                got = await recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if got is _TAKEN:
                continue
            for item in got:
                if expand and type(item) is KeyedWindow:
                    for window in item.results():  # no generator between: one step per key
                        yield window
                else:
                    yield item

    async def __anext__(self) -> WindowResult:
        return await self._next(True)  # type: ignore[return-value]

    async def _next(self, expand: bool) -> Closed:
        ready = self._ready
        if ready:
            return self._first(expand)
        if self._state == "new":
            await self._open()
        elif self._state == "closed":
            raise StopAsyncIteration
        try:
            while not ready:
                item = await self._recv.receive()
                if item is not _TAKEN:
                    ready.extend(each_result(item) if expand else item)
        except anyio.EndOfStream:
            await self._close(None, None, None)
            raise StopAsyncIteration from None
        except BaseException as exc:
            # An error or cancellation while waiting: stop the run and raise what it raises.
            if await self._close(type(exc), exc, exc.__traceback__):
                raise StopAsyncIteration from None
            raise
        return self._first(expand)

    def _first(self, expand: bool) -> Closed:
        """The next window of ``_ready``; ``expand``: a ``KeyedWindow`` left there by
        ``by_window()`` as its ``WindowResult``s."""
        ready = self._ready
        item = ready.popleft()
        if expand and type(item) is KeyedWindow:
            ready.extendleft(reversed(list(item.results())))
            item = ready.popleft()
        return item


class _ByWindow:
    """``stream.by_window()`` of a stream not entered with ``async with``."""

    def __init__(self, stream: WindowStream) -> None:
        self.stream = stream

    def __aiter__(self) -> _ByWindow:
        return self

    async def __anext__(self) -> WindowResult | KeyedWindow:
        return await self.stream._next(False)

"""Sequence-range splits of a JetStream stream, read by the workers themselves: :class:`NatsSplit`.

With ``until="end"`` a :func:`~microbatch.sources.nats.nats_stream` is cut into ranges of stream
sequences, as a file is cut into byte ranges; the pipeline sends each range (a few numbers, never a
message) and a worker fetches its messages straight from the server. A worker keeps one connection
per set of servers for as long as it lives, on a thread of its own that keeps the connection
answering the server between splits; each split is fetched by an ephemeral consumer started at
the range's first sequence (:class:`~microbatch.sources.natsclient.Puller`), deleted once the
range is read: nothing durable is kept on the server.

Messages are cut into batches of ``max_size`` from the range's first message and decoded there. A
message that does not decode is left out of ``fn``'s call and returned with its stream sequence
(:class:`~microbatch._core.splittask.Undecodable`): the pipeline writes it to the dead letters, as
it does for a line of a file that does not decode.
"""

from __future__ import annotations

import threading
from typing import Any

from .._core.splits import SourceSplit
from .._core.splittask import BatchError, BatchOutcome, Undecodable

__all__ = ["NatsSplit", "decode_messages", "split_length"]

#: Seconds a fetch waits for messages before asking again (the range is known to hold them).
_POLL = 1.0

#: One connection per set of servers in this process (a worker): ``servers -> (thread, client)``.
_connections: dict[tuple[str, ...], tuple[Any, Any]] = {}
_connections_lock = threading.Lock()


def split_length(split_size: int, messages: int, size: int, max_size: int) -> int:
    """Sequences per split: about ``split_size`` bytes of messages at the stream's mean stored size
    (``size`` bytes for ``messages`` messages), a whole number of batches, at least one."""
    mean = size / messages if messages and size else 64.0
    batches = max(round(split_size / mean / max_size), 1)
    return batches * max_size


def decode_messages(
    messages: list[tuple[int, bytes]], encoding: str | None, errors: str, where: str
) -> tuple[list[Any], list[tuple[int, bytes, str]]]:
    """The records of ``messages`` (``(sequence, payload)``) and ``(sequence, payload, message)``
    of each one that does not decode (left out of the records); ``where`` names the stream."""
    if encoding is None:
        return [m[1] for m in messages], []
    try:
        return [m[1].decode(encoding, errors) for m in messages], []
    except UnicodeDecodeError:
        pass
    records: list[Any] = []
    bad: list[tuple[int, bytes, str]] = []
    for seq, data in messages:
        try:
            records.append(data.decode(encoding, errors))
        except UnicodeDecodeError as exc:  # noqa: PERF203 - only once the whole batch failed
            bad.append(
                (
                    seq,
                    data,
                    f"{where}: the message at stream sequence {seq} does not decode as {encoding}: "
                    f"{exc.reason} at byte {exc.start} (pass errors='replace' to substitute "
                    f"undecodable bytes, or encoding=None for bytes records)",
                )
            )
    return records, bad


class NatsSplit(SourceSplit):
    """Stream sequences ``[start, end)`` of ``stream`` (messages of ``subject`` only, if given),
    in batches of ``max_size`` messages. Immutable in use; pickles to its settings only."""

    __slots__ = (
        "servers", "stream", "subject", "path", "start", "end", "max_size",
        "encoding", "errors", "batch", "timeout", "tally",
    )

    def __init__(
        self,
        servers: tuple[str, ...],
        stream: str,
        subject: str | None,
        path: str,
        start: int,
        end: int,
        max_size: int,
        encoding: str | None,
        errors: str,
        batch: int,
        timeout: float,
        tally: Any = None,
    ) -> None:
        if not 1 <= start < end or max_size < 1:
            raise ValueError(f"NatsSplit of {path}: need 1 <= start < end and max_size >= 1")
        self.servers = servers
        self.stream = stream
        self.subject = subject
        self.path = path
        self.start = start
        self.end = end
        self.max_size = max_size
        self.encoding = encoding
        self.errors = errors
        self.batch = batch
        self.timeout = timeout
        #: In the pipeline process: the source, told of the sequences passed over (not pickled).
        self.tally = tally

    def _key(self) -> tuple[Any, ...]:
        return (
            self.servers, self.stream, self.subject, self.path, self.start, self.end, self.max_size,
            self.encoding, self.errors, self.batch, self.timeout,
        )

    def __reduce__(self) -> tuple[type[NatsSplit], tuple[Any, ...]]:
        return (NatsSplit, self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NatsSplit) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"NatsSplit({self.path}, sequences {self.start}..{self.end - 1})"

    # -- what the pipeline asks -------------------------------------------------------------------

    def position(self, end: int) -> Any:
        """The chunk position after sequence ``end - 1`` (``nats_stream``'s ``{"seq": N}``)."""
        return {"chunk": {"seq": end - 1}, "skip": 0}

    def note(self, start: int, end: int, count: int) -> None:
        """``count`` messages came from sequences ``[start, end)``: the others were passed over
        (deleted or expired; counted only without a subject, where every sequence is a message)."""
        if self.tally is not None and self.subject is None:
            self.tally.skipped += end - start - count

    # -- reading ----------------------------------------------------------------------------------

    def read(self, task: Any) -> list[BatchOutcome]:
        """In a worker: fetch the range on the worker's connection, then call ``task.fn`` on each
        batch; a batch whose ``fn`` raised has a :class:`BatchError` as its result."""
        outcomes: list[BatchOutcome] = []
        fn = task.fn
        for records, start, end, bad in self._batches(self._fetch(self.start, self.end, cached=True)):
            result: Any = None
            if records:
                try:
                    result = fn(records)
                except Exception as exc:
                    result = BatchError.of(exc)
            if bad and not isinstance(result, BatchError):
                result = Undecodable(result, bool(records), bad)
            outcomes.append((len(records) + len(bad), start, end, result))
        return outcomes

    def read_here(self, task: Any, start: int, end: int) -> list[tuple[list[Any], int, int, list[Any]]]:
        """In the pipeline process (a split that failed in a worker): the batches in ``[start,
        end)``, fetched on a connection of their own, closed after."""
        return self._batches(self._fetch(start, end, cached=False), start, end)

    def _batches(
        self, messages: list[tuple[int, bytes]], start: int | None = None, end: int | None = None
    ) -> list[tuple[list[Any], int, int, list[Any]]]:
        """``messages`` cut into batches of ``max_size`` and decoded: ``(records, start, end,
        undecodable)``; the first starts at ``start``, the last ends at ``end`` (the range's)."""
        lo = self.start if start is None else start
        hi = self.end if end is None else end
        out: list[tuple[list[Any], int, int, list[Any]]] = []
        size = self.max_size
        for i in range(0, len(messages), size):
            part = messages[i : i + size]
            records, bad = decode_messages(part, self.encoding, self.errors, self.path)
            stop = hi if i + size >= len(messages) else part[-1][0] + 1
            out.append((records, lo, stop, bad))
            lo = stop
        return out

    def _fetch(self, start: int, end: int, *, cached: bool) -> list[tuple[int, bytes]]:
        """``(sequence, payload)`` of the messages of ``[start, end)``, in order."""
        from .natsclient import LoopThread, Puller

        key = self.servers
        if cached:
            with _connections_lock:
                thread, connection = _connections.get(key) or (LoopThread("microbatch-nats-split"), None)
                _connections[key] = (thread, connection)
        else:
            thread, connection = LoopThread("microbatch-nats-split"), None
        if connection is not None and connection.is_closed:
            connection = None
        puller = Puller(
            list(self.servers), self.stream, self.subject, start=start, batch=self.batch,
            timeout=self.timeout, connection=connection,
        )
        try:
            # The puller gives up after ``timeout`` without an answer; this bound is a backstop.
            return thread.run(self._fetch_range(puller, end, cached), self.timeout * 4 + 30)
        finally:
            if cached:
                with _connections_lock:
                    held = _connections[key][1]
                    if held is None or held.is_closed:
                        _connections[key] = (thread, puller.nc)
                        held = puller.nc
                if held is not puller.nc and puller.nc is not None:
                    # Another thread of this process (a Dask worker's) connected meanwhile.
                    thread.run(puller.nc.close(), self.timeout)
            else:
                thread.stop()

    async def _fetch_range(self, puller: Any, end: int, keep: bool) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        try:
            state = await puller.open()
            if puller.next >= end or state.pending == 0:
                return out
            while True:
                puller.batch = max(min(self.batch, end - puller.next), 1)
                got = await puller.fetch(_POLL)
                if not got:
                    if await puller.pending() == 0:
                        return out  # the rest of the range was removed meanwhile
                    continue
                last, _, pending = got[-1]
                if last < end:
                    out += [(seq, data) for seq, data, _ in got]
                else:
                    out += [(seq, data) for seq, data, _ in got if seq < end]
                if last >= end - 1 or pending == 0:
                    return out
        finally:
            await puller.close(keep_connection=keep)

"""The messages of a NATS JetStream stream, replayable by stream sequence: :func:`nats_stream`.

A stream numbers its messages; a checkpoint records the sequence of the last message folded, and a
resumed run reads on from the next one. Nothing is kept on the server for this: each reading starts
an ephemeral consumer at a sequence (see :mod:`microbatch.sources.natsclient`), so the checkpoint is
the only record of where a pipeline stands.

Needs ``nats-py`` (``pip install 'microbatch[nats]'``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._core.lines import check_encoding
from .._core.params import check_int, check_seconds
from .._exceptions import SourceError
from .protocol import Chunk, records_of

if TYPE_CHECKING:
    from .natssplit import NatsSplit

__all__ = ["DEFAULT_BATCH", "DEFAULT_TIMEOUT", "NatsStream", "nats_stream"]

logger = logging.getLogger("microbatch.sources")

#: Messages asked for in one fetch (and the most in one chunk).
DEFAULT_BATCH = 1000
#: Seconds without an answer from the server after which a reading fails.
DEFAULT_TIMEOUT = 30.0
#: Seconds a followed stream's fetch waits for new messages before asking again.
_POLL = 1.0


class NatsStream:
    """A JetStream stream's messages, in sequence order, as chunks with positions (a :class:`Source`).

    Made by :func:`nats_stream`, which documents the parameters. A position is
    ``{"seq": <stream sequence of the last message of the chunk>}``. Like every source it is a
    description: each ``chunks()`` connects anew and starts at ``start``.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        stream: str,
        *,
        subject: str | None,
        until: Literal["follow", "end"],
        encoding: str | None,
        errors: str,
        batch: int,
        timeout: float,
        stop_when_idle: float | None,
        start: int = 0,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ValueError(f"servers must be a NATS URL or a list of them, got {servers!r}")
        if not isinstance(stream, str) or not stream or any(c in stream for c in " .*>\t\r\n"):
            raise ValueError(
                f"stream must be a JetStream stream name (no spaces, '.', '*' or '>'), got {stream!r}"
            )
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise ValueError(f"subject must be a subject (wildcards allowed) or None, got {subject!r}")
        if until not in ("follow", "end"):
            raise ValueError(f"until must be 'follow' or 'end', got {until!r}")
        check_encoding(encoding, errors)
        check_int("batch", batch, minimum=1)
        check_seconds("timeout", timeout)
        if stop_when_idle is not None:
            check_seconds("stop_when_idle", stop_when_idle)
        self.stream = stream
        self.subject = subject
        self.until = until
        self.encoding = encoding
        self.errors = errors
        self.batch = batch
        self.timeout = timeout
        self.stop_when_idle = stop_when_idle
        #: The stream sequence to start at; 0: the stream's first message.
        self.start = check_int("start", start)
        #: Sequences the latest reading passed over (deleted or expired messages; counted only
        #: without a ``subject``, where every sequence is one of the stream's messages).
        self.skipped = 0
        #: The latest reading ended because the stream was quiet for ``stop_when_idle`` seconds.
        self.idle_ended = False

    def __repr__(self) -> str:
        return (
            f"nats_stream({self.servers!r}, {self.stream!r}, subject={self.subject!r}, "
            f"until={self.until!r}, start={self.start})"
        )

    @property
    def where(self) -> str:
        """Names the stream in messages."""
        subject = "" if self.subject is None else f" (subject {self.subject})"
        return f"nats stream {self.stream!r}{subject}"

    def describe(self) -> str:
        """``nats:STREAM`` and the subject: what is read, for the pipeline's fingerprint.

        The servers are left out: the same stream may be reached through other URLs.
        """
        return f"nats:{self.stream}" + ("" if self.subject is None else f"/{self.subject}")

    def resume(self, position: Any) -> NatsStream:
        """The stream read on after ``position`` (``{"seq": N}``: from sequence N + 1)."""
        if position is None:
            return self
        if not isinstance(position, dict) or set(position) != {"seq"}:
            raise ValueError(f"position {position!r} is not a nats_stream position ({{'seq': N}})")
        seq = check_int("position['seq']", position["seq"])
        return NatsStream(
            self.servers,
            self.stream,
            subject=self.subject,
            until=self.until,
            encoding=self.encoding,
            errors=self.errors,
            batch=self.batch,
            timeout=self.timeout,
            stop_when_idle=self.stop_when_idle,
            start=seq + 1,
        )

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        """The records one by one (``chunks()`` is faster: one list per read)."""
        return records_of(self)

    def chunks(self) -> AsyncGenerator[Chunk[Any], None]:
        """The messages' payloads, one chunk per fetch, each with the sequence of its last message."""
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[Chunk[Any], None]:
        from .natssplit import decode_messages

        thread, puller = self._begin()
        try:
            state = await thread.call(puller.open())
            self._check_start(state.first, state.last)
            end = state.last if self.until == "end" else None
            if end is not None and (puller.next > end or state.pending == 0):
                return
            last = puller.next - 1
            quiet_since = anyio.current_time()
            while True:
                wait = _POLL
                if self.stop_when_idle is not None:
                    wait = max(min(wait, quiet_since + self.stop_when_idle - anyio.current_time()), 0.01)
                messages = await thread.call(puller.fetch(wait))
                if not messages:
                    if end is not None and await thread.call(puller.pending()) == 0:
                        return  # the messages up to the end were removed meanwhile
                    if self.stop_when_idle is not None and (
                        anyio.current_time() - quiet_since >= self.stop_when_idle
                    ):
                        self.idle_ended = True
                        logger.info("%s: quiet for stop_when_idle=%g s", self.where, self.stop_when_idle)
                        return
                    continue
                quiet_since = anyio.current_time()
                done = False
                if end is not None:
                    if messages[-1][0] >= end or messages[-1][2] == 0:
                        done = True
                        messages = [m for m in messages if m[0] <= end]
                if self.subject is None:
                    self.skipped += messages[-1][0] - last - len(messages) if messages else 0
                if messages:
                    last = messages[-1][0]
                    records, bad = decode_messages(
                        [m[:2] for m in messages], self.encoding, self.errors, self.where
                    )
                    yield Chunk(records, {"seq": last}, bad)
                if done:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5):
                    await thread.call(puller.close())
                await anyio.to_thread.run_sync(thread.stop)
            if self.skipped:
                logger.info("%s: %d sequences skipped (deleted or expired)", self.where, self.skipped)

    def splittable(self) -> bool:
        """Whether workers may read it as sequence ranges: with ``until="end"``."""
        return self.until == "end"

    async def splits(self, max_size: int, split_size: int) -> list[NatsSplit] | None:
        """The sequence ranges from ``start`` to the stream's last sequence now, for workers to fetch.

        A range holds about ``split_size`` bytes of messages (at the stream's mean stored size
        when the reading starts), a whole number of batches of ``max_size``; ranges lie on a grid
        counted from sequence 1, so a reading resumed after any batch plans the rest of its range
        and then the same ranges. None when no more than one range is left: the stream is then
        read as chunks (:meth:`chunks`). Checks ``start`` as :meth:`chunks` does.
        """
        from .natssplit import NatsSplit, split_length

        thread, puller = self._begin()
        try:
            state = await thread.call(puller.open(consumer=False))
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5):
                    await thread.call(puller.close())
                await anyio.to_thread.run_sync(thread.stop)
        self._check_start(state.first, state.last)
        start, end = puller.next, state.last + 1
        length = split_length(split_size, state.messages, state.bytes, max_size)
        if end - start <= length:
            return None
        servers, where = tuple(self.servers), self.where
        splits: list[NatsSplit] = []
        lo = start
        while lo < end:
            hi = min(((lo - 1) // length + 1) * length + 1, end)
            splits.append(
                NatsSplit(
                    servers, self.stream, self.subject, where, lo, hi, max_size,
                    self.encoding, self.errors, self.batch, self.timeout, tally=self,
                )
            )
            lo = hi
        return splits

    def _begin(self) -> tuple[Any, Any]:
        """A new reading: the counts reset, and the loop thread and puller that read from ``start``."""
        from .natsclient import LoopThread, Puller

        self.skipped = 0
        self.idle_ended = False
        thread = LoopThread(f"microbatch-nats-{self.stream}")
        puller = Puller(
            self.servers, self.stream, self.subject, start=self.start, batch=self.batch, timeout=self.timeout
        )
        return thread, puller

    def _check_start(self, first: int, last: int) -> None:
        """A resumed reading must find the message after its position, or know it was never written."""
        if self.start == 0:
            return
        position = self.start - 1
        if first > 1 and self.start < first:
            raise SourceError(
                f"{self.where}: the checkpoint's position is sequence {position}, but the stream's "
                f"first sequence is now {first}: messages {self.start}..{first - 1} were removed "
                f"(purged, expired or over the stream's limits) before they were read. Pass "
                f"fresh=True to Pipeline.run (--fresh on the command line) to start over at "
                f"sequence {first}"
            )
        if position > last:
            raise SourceError(
                f"{self.where}: the checkpoint's position is sequence {position}, past the stream's "
                f"last sequence {last}: was the stream deleted and made again? Pass fresh=True to "
                f"Pipeline.run (--fresh on the command line) to start over"
            )


def nats_stream(
    servers: str | Sequence[str],
    stream: str,
    *,
    subject: str | None = None,
    until: Literal["follow", "end"] = "follow",
    encoding: str | None = "utf-8",
    errors: str = "strict",
    batch: int = DEFAULT_BATCH,
    timeout: float = DEFAULT_TIMEOUT,
    stop_when_idle: float | None = None,
) -> NatsStream:
    """The payloads of the messages of JetStream stream ``stream``, in stream-sequence order.

    - ``servers``: a NATS URL (``"nats://127.0.0.1:4222"``) or a list of them (a cluster).
    - ``subject`` (default None: every message): only the messages whose subject matches
      (wildcards allowed).
    - ``until`` (default ``"follow"``): ``"follow"`` keeps reading new messages as they are
      published; ``"end"`` reads up to the stream's last sequence when the reading starts, then
      ends.
    - ``encoding`` (default ``"utf-8"``): records are ``str``; ``None``: the payloads as ``bytes``.
      ``errors`` (default ``"strict"``) as for ``bytes.decode``; with ``"strict"`` a message that
      does not decode is written to the pipeline's dead letters with its stream sequence as its
      position (with ``on_error="raise"`` it stops the run), as a line of a file that does not
      decode; read without a pipeline, the chunk has it in ``undecodable`` and ``async for``
      raises :class:`SourceError` naming its sequence, after the chunk's other records.
    - ``batch`` (default 1000): messages asked for in one fetch: the most held in memory at once
      is two fetches.
    - ``timeout`` (default 30 s): a server that goes away is reconnected to with backoff (any of
      ``servers``); after ``timeout`` seconds without an answer the reading fails with
      :class:`SourceError` naming the stream and the last sequence read.
    - ``stop_when_idle`` (default None): end the reading once no new message arrived for this
      many seconds (with ``until="follow"``). A pipeline run that ends so is not finished: its
      last checkpoint is resumed from, and the next run reads what was published since.

    A fresh reading starts at the stream's first message; a pipeline resumed from a checkpoint
    starts just after the last message it folded (the position is ``{"seq": N}``). Deleted or
    expired messages are passed over (and counted in ``skipped``). A resumed reading whose next
    message was removed before it was read (the stream purged, expired, or over its limits) fails
    with :class:`SourceError` naming both sequences; ``fresh=True`` starts over.

    The client is ``nats-py``, which runs on asyncio: it gets a thread and an event loop of its
    own, so the source works on every backend (asyncio, uvloop, trio). Nothing is kept on the
    server: each reading uses an ephemeral consumer, removed when the reading ends (or by the
    server a minute after a reader that was killed).
    """
    return NatsStream(
        servers,
        stream,
        subject=subject,
        until=until,
        encoding=encoding,
        errors=errors,
        batch=batch,
        timeout=timeout,
        stop_when_idle=stop_when_idle,
    )

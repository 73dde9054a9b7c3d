"""The NATS side of :func:`~microbatch.sources.nats.nats_stream`: a JetStream reader on its own loop.

``nats-py`` runs on asyncio only. So that the source works on every backend (asyncio, uvloop, trio)
in one way, the client lives in a thread of its own with its own asyncio event loop
(:class:`LoopThread`), and the source awaits each fetch from there (:meth:`LoopThread.call`: one
thread hop per fetch of up to ``batch`` messages, not per message).

:class:`Puller` reads a stream in sequence order the way an *ordered consumer* does, with no state on
the server that outlives it: an ephemeral pull consumer (no acknowledgements, kept in memory, removed
by the server ``INACTIVE`` seconds after its reader is gone) that starts at a stream sequence. Every
message delivered is checked to follow the one before (the consumer's own sequence); a gap (a
message lost while the connection was down), a consumer the server no longer knows (a restarted
server) or a request without an answer makes it start a new consumer right after the last message
it returned, so no message is skipped or returned twice. While the server cannot be reached it
retries with backoff; after ``timeout`` seconds without an answer it raises :class:`SourceError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

from .._exceptions import SourceError

__all__ = ["INACTIVE", "Puller", "LoopThread", "StreamState"]

logger = logging.getLogger("microbatch.sources")

T = TypeVar("T")

#: Seconds after which the server removes a consumer whose reader is gone (killed, disconnected).
INACTIVE = 60.0
#: Seconds a pull request may go unanswered beyond its expiry before it is taken as lost.
_GRACE = 2.0


class LoopThread:
    """A thread running its own asyncio event loop, for a client that needs asyncio."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # What the client left running (a reconnect loop when the server was away): cancelled
            # and awaited, so that closing the loop destroys no pending task.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the thread's loop and wait for it here (cancelling it if this is cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except BaseException:
            future.cancel()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the thread's loop, blocking this thread at most ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and wait for the thread (blocks)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


async def connect(servers: list[str], attempt: float, left: float) -> Any:
    """A new connection to any of ``servers`` within ``left`` seconds, each attempt at most
    ``attempt`` seconds; the client reconnects by itself later on (forever: a reader gives up
    after its ``timeout`` without an answer)."""
    from nats.aio.client import Client

    async def quiet(exc: Exception) -> None:
        logger.debug("nats %s: %s (reconnecting)", ",".join(servers), exc)

    # The client retries a first connection forever by itself (max_reconnect_attempts=-1 keeps
    # reconnecting later on): bound it by ``left``.
    nc = Client()
    try:
        await asyncio.wait_for(
            nc.connect(
                servers,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                # Seconds as floats work (they go to asyncio); the stubs say int.
                reconnect_time_wait=0.2,  # type: ignore[arg-type]
                connect_timeout=min(2.0, attempt),  # type: ignore[arg-type]
                error_cb=quiet,
            ),
            max(left, 0.1),
        )
    except BaseException:
        await nc.close()
        raise
    return nc


class StreamState:
    """What the stream held when reading began: ``first`` and ``last`` sequence, and ``pending``,
    the messages (of the subject) from the start sequence on."""

    __slots__ = ("first", "last", "pending", "messages", "bytes")

    def __init__(self, first: int, last: int, pending: int, messages: int = 0, size: int = 0) -> None:
        self.first = first
        self.last = last
        self.pending = pending
        #: The stream's message count and stored bytes (for the size of splits).
        self.messages = messages
        self.bytes = size


class Puller:
    """Fetches a stream's messages in sequence order from ``start`` (see the module's docstring).

    Its coroutines run on a :class:`LoopThread`'s loop. A fetch returns ``(sequence, payload,
    pending)`` triples: ``pending`` is how many messages (of the subject) followed that one when it
    was sent.
    """

    def __init__(
        self,
        servers: list[str],
        stream: str,
        subject: str | None,
        *,
        start: int,
        batch: int,
        timeout: float,
        connection: Any = None,
    ) -> None:
        self.servers = servers
        self.stream = stream
        self.subject = subject
        self.next = start  # the sequence of the next message to return
        self.batch = batch
        self.timeout = timeout
        self.nc: Any = connection  # None: open() connects
        self.js: Any = None
        self.consumer = ""
        self.inbox = ""
        self.sub: Any = None
        self.delivered = 0  # the consumer's sequence of the last message taken
        self.buffer: list[Any] = []
        self.open_request = 0  # messages the outstanding pull request may still bring
        self.request_sent = 0.0
        self.request_wait = 0.0
        self.status = ""
        self.broken = False  # the consumer must be replaced before the next request
        self.arrived: asyncio.Event | None = None
        self.last_answer = time.monotonic()

    # -- connection and consumer -------------------------------------------------------------------

    async def open(self, *, consumer: bool = True) -> StreamState:
        """Connect (unless given a connection), read the stream's state and, with ``consumer``,
        start a consumer at ``next`` (or the first message)."""
        self.arrived = asyncio.Event()
        if self.nc is None or self.nc.is_closed:
            self.nc = await self._retry(
                "connect", lambda: connect(self.servers, self.timeout, self.timeout - self._unanswered())
            )
        self.js = self.nc.jetstream(timeout=min(5.0, self.timeout))
        info = await self._retry("read the stream's state", self._stream_info)
        state = info.state
        first, last = state.first_seq, state.last_seq
        if self.next == 0:
            self.next = max(first, 1)
        pending = 0
        if consumer and self.next <= last:
            pending = await self._retry("start a consumer", self._new_consumer)
        return StreamState(first, last, pending, int(state.messages or 0), int(state.bytes or 0))

    async def _stream_info(self) -> Any:
        return await self.js.stream_info(self.stream)

    async def _new_consumer(self) -> int:
        """Replace the consumer by one that starts at ``next``; its pending messages."""
        from nats.js import api

        await self._drop_consumer()
        config = api.ConsumerConfig(
            name=self.nc._nuid.next().decode(),
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next,
            filter_subject=self.subject,
            inactive_threshold=INACTIVE,
            mem_storage=True,
            num_replicas=1,
            max_waiting=1,
        )
        info = await self.js.add_consumer(self.stream, config=config)
        # Each consumer answers on an inbox of its own: a late answer to a replaced consumer's
        # request ("request expired") cannot be taken for an answer to the new one's.
        if self.sub is not None:
            await self.sub.unsubscribe()
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_message)
        self.consumer = config.name or ""
        self.delivered = 0
        self.buffer.clear()
        self.open_request = 0
        self.broken = False
        return int(info.num_pending or 0)

    async def _drop_consumer(self) -> None:
        if not self.consumer:
            return
        name, self.consumer = self.consumer, ""
        try:
            await self.js.delete_consumer(self.stream, name)
        except Exception as exc:  # gone with a restarted server, or the server is away
            logger.debug("consumer %s of %s not deleted: %s", name, self.stream, exc)

    async def _retry(self, what: str, attempt: Any) -> Any:
        """``await attempt()`` until it succeeds, with backoff; ``SourceError`` after ``timeout``."""
        delay = 0.05
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                if isinstance(exc, SourceError) or self._unanswered() >= self.timeout:
                    raise self._gone(what, exc) from exc
                logger.info("nats %s: cannot %s (%s); retrying", ",".join(self.servers), what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.last_answer = time.monotonic()
            return result

    def _unanswered(self) -> float:
        return time.monotonic() - self.last_answer

    def _gone(self, what: str, exc: BaseException | None) -> SourceError:
        why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        return SourceError(
            f"nats stream {self.stream!r} on {','.join(self.servers)}: no answer for "
            f"{self._unanswered():.1f} s (timeout={self.timeout:g}) when trying to {what}{why}. "
            f"Every message up to stream sequence {self.next - 1} was read; a resumed run "
            f"continues after the last one folded"
        )

    async def pending(self) -> int | None:
        """The messages left for the consumer (removed ones no longer count); None when the
        server cannot tell now (the next fetch replaces a consumer it no longer knows)."""
        try:
            info = await self.js.consumer_info(self.stream, self.consumer)
        except Exception as exc:
            logger.debug("nats stream %s: consumer state not read: %s", self.stream, exc)
            return None
        return int(info.num_pending or 0)

    async def close(self, *, keep_connection: bool = False) -> None:
        """Delete the consumer (if the server is there) and close the connection (unless
        ``keep_connection``: a worker's connection serves its next split); never raises: the
        reading's own outcome (its end, or the error that ended it) is what counts."""
        if self.nc is None or self.nc.is_closed:
            return
        try:
            if self.nc.is_connected:
                await self._drop_consumer()
            if self.sub is not None and keep_connection:
                sub, self.sub = self.sub, None
                await sub.unsubscribe()
            if not keep_connection:
                await self.nc.close()
        except Exception as exc:  # a connection lost meanwhile: nothing is left to close
            logger.debug("nats %s: closing: %s", ",".join(self.servers), exc)

    # -- fetching ----------------------------------------------------------------------------------

    async def _on_message(self, msg: Any) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is not None and not msg.data:
            if status == "100":
                return  # a heartbeat
            self.status = f"{status} {headers.get('Description', '')}".strip()
            self.open_request = 0
            if status not in ("404", "408"):  # anything but "no messages" / "request expired"
                self.broken = True
        else:
            self.buffer.append(msg)
            self.open_request -= 1
        self.last_answer = time.monotonic()
        assert self.arrived is not None
        self.arrived.set()

    async def _request(self, wait: float) -> None:
        payload = json.dumps({"batch": self.batch, "expires": int(wait * 1e9)}).encode()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        self.open_request = self.batch
        self.request_sent = time.monotonic()
        self.request_wait = wait
        self.status = ""
        await self.nc.publish(subject, payload, reply=self.inbox)

    async def fetch(self, wait: float) -> list[tuple[int, bytes, int]]:
        """The next messages, at most ``batch``; an empty list when none arrived within ``wait`` s."""
        arrived = self.arrived
        assert arrived is not None
        asked = False  # a request sent by this call ended without messages: none within wait
        while True:
            if self.broken or not self.consumer:
                logger.info("nats stream %s: new consumer from sequence %d", self.stream, self.next)
                await self._retry("start a consumer", self._new_consumer)
            if self.buffer:
                taken = self._take()
                if self.open_request <= 0 and not self.broken:
                    await self._request(wait)  # the next messages arrive while these are processed
                if taken:
                    return taken
                continue
            if self.open_request <= 0:
                if asked and self.status:
                    return []
                await self._request(wait)
                asked = True
            arrived.clear()
            limit = self.request_sent + self.request_wait + _GRACE - time.monotonic()
            try:
                await asyncio.wait_for(arrived.wait(), max(limit, 0.0))
            except asyncio.TimeoutError:
                if self._unanswered() >= self.timeout:
                    raise self._gone("fetch messages", None) from None
                self.broken = True  # the request or its answer was lost (a reconnect)

    def _take(self) -> list[tuple[int, bytes, int]]:
        """The buffered messages of the current consumer that follow the last one taken, in order."""
        out: list[tuple[int, bytes, int]] = []
        consumer, delivered = self.consumer, self.delivered
        for msg in self.buffer:
            tokens = msg.reply.split(".")
            if len(tokens) == 9:
                name, sseq, cseq, pending = tokens[3], tokens[5], tokens[6], tokens[8]
            else:  # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<sseq>...
                name, sseq, cseq, pending = tokens[5], tokens[7], tokens[8], tokens[10]
            if name != consumer:
                continue  # from a consumer replaced since
            if int(cseq) != delivered + 1:
                self.broken = True  # a message was lost on the way: start again after the last
                break
            delivered += 1
            out.append((int(sseq), msg.data, int(pending)))
        self.buffer.clear()
        self.delivered = delivered
        if out:
            self.next = out[-1][0] + 1
        return out

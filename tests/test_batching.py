"""``mb.batches()``: the async shell, on asyncio, uvloop and trio; time on trio's MockClock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

import microbatch as mb

pytestmark = pytest.mark.anyio


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


class Chunks:
    """A chunked source serving fixed lists; ``__aiter__`` must not be used when chunks() exists."""

    def __init__(self, chunks: list[list[int]]) -> None:
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[list[int]]:
        for chunk in self._chunks:
            await anyio.lowlevel.checkpoint()
            yield chunk

    def __aiter__(self) -> AsyncIterator[int]:
        raise AssertionError("batches() must prefer chunks() over async for")


async def collect(source: Any, max_size: int, max_wait: float | None = None) -> list[list[Any]]:
    async with mb.batches(source, max_size=max_size, max_wait=max_wait) as stream:
        return [batch async for batch in stream]


def run_mock(fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


def task_ids() -> set[int]:
    return {task.id for task in anyio.get_running_tasks()}


# -- records exactly once, in order, in bounds -----------------------------------------------------

SOURCES: dict[str, Callable[[int], Any]] = {
    "async generator": agen,
    "list": lambda n: list(range(n)),
    "generator": lambda n: iter(range(n)),
    "chunked": lambda n: Chunks([list(range(k, min(k + 7, n))) for k in range(0, n, 7)] + [[]]),
}


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize(("n", "max_size"), [(0, 3), (1, 1), (10, 1), (10, 3), (9, 3), (100, 7), (5, 50)])
async def test_every_record_once_in_order(kind: str, n: int, max_size: int) -> None:
    batches = await collect(SOURCES[kind](n), max_size)
    assert [r for b in batches for r in b] == list(range(n))
    assert all(1 <= len(b) <= max_size for b in batches)
    # Without max_wait, only the last batch (the remainder) may be short.
    assert all(len(b) == max_size for b in batches[:-1])
    assert all(type(b) is list for b in batches)


async def test_no_task_left_after_normal_end() -> None:
    before = task_ids()
    assert await collect(agen(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert task_ids() == before


# -- errors from the source and from the body -----------------------------------------------------


class Boom(Exception):
    pass


async def failing(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
    raise Boom(f"after {n}")


def failing_sync(n: int) -> Iterator[int]:
    yield from range(n)
    raise Boom(f"after {n}")


class FailingChunks:
    async def chunks(self) -> AsyncIterator[list[int]]:
        yield [0, 1, 2, 3]
        yield [4, 5, 6]
        raise Boom("after 7")


@pytest.mark.parametrize(
    "make", [lambda: failing(7), lambda: failing_sync(7), FailingChunks], ids=["async", "sync", "chunked"]
)
async def test_source_error_after_its_records(make: Callable[[], Any]) -> None:
    seen: list[list[int]] = []
    with pytest.raises(Boom, match="after 7") as info:
        async with mb.batches(make(), max_size=3) as stream:
            async for batch in stream:
                seen.append(batch)
    # The original exception, not an exception group, after every record read before it.
    assert type(info.value) is Boom
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]


async def test_body_error_unchanged() -> None:
    before = task_ids()
    with pytest.raises(KeyError) as info:
        async with mb.batches(agen(100), max_size=3) as stream:
            async for _ in stream:
                raise KeyError("mine")
    assert type(info.value) is KeyError
    assert task_ids() == before


# -- stopping early closes the source ------------------------------------------------------------


class Tracked:
    def __init__(self) -> None:
        self.yielded = 0
        self.closed = False

    async def forever(self, block_after: int | None = None) -> AsyncIterator[int]:
        try:
            while True:
                if block_after is not None and self.yielded >= block_after:
                    await anyio.sleep_forever()
                self.yielded += 1
                yield self.yielded - 1
        finally:
            self.closed = True


async def test_break_closes_source_and_leaves_no_task() -> None:
    before = task_ids()
    src = Tracked()
    async with mb.batches(src.forever(), max_size=5) as stream:
        async for batch in stream:
            assert batch == [0, 1, 2, 3, 4]
            break
        assert not src.closed
    assert src.closed
    assert task_ids() == before


async def test_backpressure_one_batch_ahead() -> None:
    src = Tracked()
    async with mb.batches(src.forever(), max_size=5) as stream:
        async for _ in stream:
            await anyio.wait_all_tasks_blocked()
            # The consumer holds one batch; the reader cut the next one and waits.
            assert src.yielded == 10
            break


async def test_cancel_while_source_waits() -> None:
    before = task_ids()
    src = Tracked()
    got: list[list[int]] = []
    with anyio.CancelScope() as scope:
        async with mb.batches(src.forever(block_after=3), max_size=5) as stream:
            async with anyio.create_task_group() as tg:

                async def cancel_when_idle() -> None:
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()

                tg.start_soon(cancel_when_idle)
                async for batch in stream:
                    got.append(batch)
    assert scope.cancelled_caught
    assert got == []  # three records, max_wait=None: nothing was due
    assert src.closed
    assert task_ids() == before


def test_sync_generator_closed_on_break() -> None:
    closed = []

    def numbers() -> Iterator[int]:
        try:
            yield from range(10**9)
        finally:
            closed.append(True)

    async def main() -> None:
        async with mb.batches(numbers(), max_size=4) as stream:
            async for batch in stream:
                assert batch == [0, 1, 2, 3]
                break

    anyio.run(main)
    assert closed == [True]


async def test_stream_unusable_after_block() -> None:
    async with mb.batches(agen(3), max_size=2) as stream:
        pass
    with pytest.raises(RuntimeError, match=r"inside 'async with mb\.batches"):
        await stream.__anext__()


# -- sources --------------------------------------------------------------------------------------


class ManagedSource:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def __aenter__(self) -> ManagedSource:
        self.events.append("enter")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.events.append("exit")

    async def chunks(self) -> AsyncIterator[list[str]]:
        assert self.events == ["enter"], "iterated before being entered"
        yield ["a", "b", "c"]


@pytest.mark.parametrize("stop", ["end", "error"])
async def test_context_manager_source_entered_for_the_block(stop: str) -> None:
    src = ManagedSource()
    with pytest.raises(Boom) if stop == "error" else nullcontext():
        async with mb.batches(src, max_size=2) as stream:
            assert src.events == ["enter"]
            assert [b async for b in stream] == [["a", "b"], ["c"]]
            if stop == "error":
                raise Boom
    assert src.events == ["enter", "exit"]


async def test_chunk_that_fills_a_batch_is_handed_over_as_is() -> None:
    chunk = list(range(4))
    batches = await collect(Chunks([chunk]), 4)
    assert batches == [chunk]
    assert batches[0] is chunk


async def test_read_lines_file(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(25_000)))
    batches = await collect(mb.read_lines(path), 10_000)
    assert [len(b) for b in batches] == [10_000, 10_000, 5_000]
    assert batches[2][-1] == "line 24999"


async def test_tcp_lines_source_entered_again() -> None:
    # An entered server can be given to batches(), which enters it once more (nested entry).
    async with mb.tcp_lines(0) as server, mb.batches(server, max_size=3) as stream:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as client:
            await client.send(b"a\nb\r\nc\nd")
        assert await stream.__anext__() == ["a", "b", "c"]


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="max_size"):
        mb.batches([1], max_size=0)
    with pytest.raises(TypeError, match="max_size"):
        mb.batches([1], max_size=2.0)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_wait"):
        mb.batches([1], max_size=2, max_wait=-1)
    with pytest.raises(TypeError, match="read_lines"):
        mb.batches("numbers.txt", max_size=2)
    with pytest.raises(TypeError, match="async iterable"):
        mb.batches(42, max_size=2)  # type: ignore[call-overload]


# -- time, on trio's MockClock ---------------------------------------------------------------------


def test_partial_batch_at_max_wait_while_source_silent() -> None:
    async def main() -> list[tuple[list[int], float]]:
        src = Tracked()
        start = anyio.current_time()
        out = []
        async with mb.batches(src.forever(block_after=3), max_size=10, max_wait=0.5) as stream:
            async for batch in stream:
                out.append((batch, anyio.current_time() - start))
                break
        return out

    [(batch, at)] = run_mock(main)
    assert batch == [0, 1, 2]
    assert at == pytest.approx(0.5)


def test_deadline_starts_at_first_record_of_each_batch() -> None:
    async def every_fifth() -> AsyncIterator[int]:
        for i in range(8):
            yield i
            await anyio.sleep(0.2)  # records at 0, 0.2, 0.4, ... 1.4

    async def main() -> list[tuple[list[int], float]]:
        start = anyio.current_time()
        async with mb.batches(every_fifth(), max_size=10, max_wait=0.5) as stream:
            return [(b, anyio.current_time() - start) async for b in stream]

    out = run_mock(main)
    assert [b for b, _ in out] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [at for _, at in out] == pytest.approx([0.5, 1.1, 1.6])  # the last one: the source ended


def test_full_batch_does_not_wait_and_none_waits_for_end() -> None:
    async def three_then_pause() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        await anyio.sleep(100)

    async def main(max_wait: float | None) -> list[tuple[list[int], float]]:
        start = anyio.current_time()
        async with mb.batches(three_then_pause(), max_size=3, max_wait=max_wait) as stream:
            return [(b, anyio.current_time() - start) async for b in stream]

    assert run_mock(lambda: main(10.0)) == [([0, 1, 2], 0.0), ([3, 4], pytest.approx(10.0))]
    assert run_mock(lambda: main(None)) == [([0, 1, 2], 0.0), ([3, 4], pytest.approx(100.0))]


def test_busy_consumer_gets_late_partial_with_what_arrived_meanwhile() -> None:
    async def ticking() -> AsyncIterator[int]:
        for i in range(8):
            yield i
            await anyio.sleep(0.2)  # records at 0, 0.2, ... 1.4
        await anyio.sleep_forever()

    async def main() -> list[tuple[list[int], float]]:
        start = anyio.current_time()
        out = []
        async with mb.batches(ticking(), max_size=100, max_wait=0.5) as stream:
            async for batch in stream:
                out.append((batch, anyio.current_time() - start))
                if len(out) == 2:
                    break
                await anyio.sleep(1.0)  # busy past the next deadline
        return out

    out = run_mock(main)
    # Due at 0.5 with [0, 1, 2]; the next partial (from 0.6) was due at 1.1, but the consumer
    # asked at 1.5 and got everything that had arrived by then.
    assert out == [([0, 1, 2], pytest.approx(0.5)), ([3, 4, 5, 6, 7], pytest.approx(1.5))]


class Counter:
    """An async iterator that is not a generator, with an aclose() of its own."""

    def __init__(self) -> None:
        self.n = 0
        self.closed = False

    def __aiter__(self) -> Counter:
        return self

    async def __anext__(self) -> int:
        await anyio.lowlevel.checkpoint()
        self.n += 1
        return self.n

    async def aclose(self) -> None:
        self.closed = True


async def test_iterator_aclose_called_on_break() -> None:
    src = Counter()
    async with mb.batches(src, max_size=3) as stream:
        assert await stream.__anext__() == [1, 2, 3]
    assert src.closed


async def test_one_consumer_only() -> None:
    async def silent() -> AsyncIterator[int]:
        await anyio.sleep_forever()
        yield 0

    async with mb.batches(silent(), max_size=3) as stream, anyio.create_task_group() as tg:
        async def first() -> None:
            await stream.__anext__()

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="one consumer"):
            await stream.__anext__()
        tg.cancel_scope.cancel()


@settings(max_examples=60, deadline=None)
@given(
    max_size=st.integers(1, 12),
    max_wait=st.one_of(st.none(), st.sampled_from([0.0, 0.3, 1.0])),
    chunked=st.booleans(),
    arrivals=st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.5, 2.0]), st.integers(0, 30)), max_size=15),
)
def test_shell_invariants_on_mock_clock(
    max_size: int, max_wait: float | None, chunked: bool, arrivals: list[tuple[float, int]]
) -> None:
    arrived: dict[int, float] = {}

    async def source_chunks() -> AsyncIterator[list[int]]:
        n = 0
        for gap, count in arrivals:
            await anyio.sleep(gap)
            chunk = list(range(n, n + count))
            n += count
            for r in chunk:
                arrived[r] = anyio.current_time()
            yield chunk

    class Source:
        def chunks(self) -> AsyncIterator[list[int]]:
            return source_chunks()

    async def per_record() -> AsyncIterator[int]:
        async for chunk in source_chunks():
            for r in chunk:
                yield r

    async def main() -> list[tuple[list[int], float]]:
        source: Any = Source() if chunked else per_record()
        async with mb.batches(source, max_size=max_size, max_wait=max_wait) as stream:
            return [(b, anyio.current_time()) async for b in stream]

    out = run_mock(main)
    total = sum(count for _, count in arrivals)
    assert [r for b, _ in out for r in b] == list(range(total))
    assert all(1 <= len(b) <= max_size for b, _ in out)
    if max_wait is not None:
        for batch, emitted in out:
            assert emitted - arrived[batch[0]] <= max_wait + 1e-9


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.lists(st.integers(), max_size=20), max_size=12), max_size=st.integers(1, 9))
def test_chunked_invariants_all_backends(backend: str, chunks: list[list[int]], max_size: int) -> None:
    out = anyio.run(collect, Chunks(chunks), max_size, 0.0, backend=backend)
    assert [r for b in out for r in b] == [r for c in chunks for r in c]
    assert all(1 <= len(b) <= max_size for b in out)


async def test_async_for_without_async_with_says_what_to_write() -> None:
    with pytest.raises(TypeError, match=r"async with mb\.batches\(source, max_size=\.\.\.\) as stream"):
        async for _ in mb.batches([1, 2, 3], max_size=2):  # type: ignore[attr-defined]
            pass
    async with mb.batches([1, 2, 3], max_size=2) as stream:
        assert [b async for b in stream] == [[1, 2], [3]]

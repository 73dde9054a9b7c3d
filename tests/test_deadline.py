"""The one wait for a batch deadline: the pure time it ends, and the async wait on every backend."""

from __future__ import annotations

import math

import anyio
import pytest

from microbatch._core.deadline import wait_deadline
from microbatch._waits import wait_until


def test_no_deadline_never_ends_a_wait_and_a_deadline_is_kept_as_it_is() -> None:
    assert wait_deadline(None) == math.inf
    assert wait_deadline(12.5) == 12.5
    assert wait_deadline(-1.0) == -1.0


@pytest.mark.anyio
async def test_a_passed_deadline_ends_the_wait_before_anything_arrives() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    await send.send(7)
    got: list[int] = []

    async def take() -> None:
        got.append(await receive.receive())

    assert await wait_until(anyio.current_time() - 1, take) is False
    assert got == []
    # The item was not lost to the cancelled wait: it is there for the next one.
    assert await wait_until(None, take) is True
    assert got == [7]


@pytest.mark.anyio
async def test_what_arrives_before_the_deadline_ends_the_wait() -> None:
    event = anyio.Event()

    async def arrive() -> None:
        event.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(arrive)
        assert await wait_until(anyio.current_time() + 3600, event.wait) is True


@pytest.mark.anyio
async def test_a_silent_wait_ends_at_the_deadline_on_the_event_loop_clock() -> None:
    event = anyio.Event()
    deadline = anyio.current_time() + 0.01
    assert await wait_until(deadline, event.wait) is False
    assert anyio.current_time() >= deadline


@pytest.mark.anyio
async def test_errors_of_the_wait_propagate() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    send.close()
    with pytest.raises(anyio.EndOfStream):
        await wait_until(anyio.current_time() + 3600, receive.receive)

"""The one encoding of a call's outcome (``microbatch.executors.remote``), in this process and in a
real worker process, which loads it without the rest of the package."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

import microbatch as mb
from microbatch.executors import ProcessExecutor, remote
from microbatch.executors import worker as wire

pytestmark = pytest.mark.anyio


class HoldsLock(Exception):
    """Cannot be pickled at all (whatever pickling support other libraries install for exceptions)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


def raise_holds_lock(_: object) -> None:
    raise HoldsLock(1, 2)


def raise_value(x: object) -> None:
    raise ValueError(f"bad {x}")


def exit_now(_: object) -> None:
    raise SystemExit(3)


def round_trip(outcome: tuple[Any, ...]) -> Any:
    kind, body = remote.encode(outcome)
    return remote.unwrap(remote.decode(kind, body, round_trip), round_trip)


def test_a_result_round_trips() -> None:
    assert round_trip(remote.call(sum, [1, 2, 3])) == 6


def test_an_exception_comes_back_as_itself_with_the_workers_traceback() -> None:
    outcome = remote.call(raise_value, 7)
    assert outcome[0] == remote.RAISED
    with pytest.raises(ValueError, match="bad 7") as info:
        round_trip(outcome)
    assert isinstance(info.value.__cause__, mb.RemoteTraceback)
    assert "in raise_value" in info.value.__cause__.tb


@pytest.mark.parametrize(
    ("fn", "type_name", "message"),
    [(raise_holds_lock, f"{__name__}.HoldsLock", "1/2"), (exit_now, "builtins.SystemExit", "3")],
    ids=["cannot-be-pickled", "system-exit"],
)
def test_exceptions_that_cannot_travel_become_remote_error(fn: Any, type_name: str, message: str) -> None:
    outcome = remote.call(fn, None)
    assert outcome[0] == remote.REMOTE_ERROR
    with pytest.raises(mb.RemoteError) as info:
        round_trip(outcome)
    assert (info.value.type_name, info.value.message) == (type_name, message)
    assert isinstance(info.value.__cause__, mb.RemoteTraceback)


def test_a_result_that_cannot_be_pickled_becomes_its_pickling_error() -> None:
    outcome = remote.call(lambda _: threading.Lock(), None)
    with pytest.raises(TypeError, match="lock") as info:
        round_trip(outcome)
    assert isinstance(info.value.__cause__, mb.RemoteTraceback)


def test_a_result_of_a_class_only_the_worker_has_travels_by_value() -> None:
    def make() -> object:
        class Local:  # not importable by name: the standard pickle refuses it
            def __init__(self) -> None:
                self.x = 5

        return Local()

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(make())
    assert round_trip(remote.call(lambda _: make(), None)).x == 5


def test_an_unreadable_result_is_an_executor_error_naming_fn() -> None:
    with pytest.raises(mb.ExecutorError, match=rf"result of {__name__}\.round_trip .*cannot be unpickled"):
        remote.decode(remote.RESULT, b"not a pickle", round_trip)


def test_process_workers_use_this_encoding() -> None:
    tags = (remote.RESULT, remote.RAISED, remote.REMOTE_ERROR)
    assert (wire.RESULT, wire.RAISED, wire.REMOTE_ERROR) == tags


def _by_value(source: str, name: str) -> Any:
    """A function defined in ``__main__``: it travels to the worker by value, importing nothing."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace[name]


async def test_a_worker_loads_the_encoding_without_anyio_or_the_executors_package() -> None:
    loaded = _by_value(
        "def loaded(_):\n"
        "    import sys\n"
        "    return sorted(m for m in sys.modules if m.startswith(('anyio', 'microbatch', 'cloudpickle')))\n",
        "loaded",
    )
    async with ProcessExecutor(1) as executor:
        modules = await executor.run(loaded, None)
    assert "microbatch.executors.remote" in modules
    assert not [m for m in modules if m.startswith("anyio")]
    assert "microbatch.executors" not in modules and "microbatch.executors.process" not in modules


async def test_a_worker_returns_instances_of_classes_that_exist_only_there() -> None:
    # A class defined next to fn in __main__ (or a job file loaded by path) exists in the worker
    # only as cloudpickle rebuilt it; the standard pickle cannot send its instances back.
    make_point = _by_value(
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "def make_point(x):\n"
        "    return Point(x)\n",
        "make_point",
    )
    async with ProcessExecutor(1) as executor:
        point = await executor.run(make_point, 4)
        assert type(point).__name__ == "Point" and point.x == 4
        assert (await executor.run(make_point, 5)).x == 5

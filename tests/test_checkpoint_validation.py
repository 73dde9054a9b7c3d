"""Checkpoints with a valid checksum but wrong fields fall back to the previous one, naming the field."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microbatch import CheckpointCorrupt, CheckpointMismatch
from microbatch._exceptions import InvalidCheckpoint
from microbatch.aggregate import Sum
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.format import (
    MAX_DEPTH,
    Checkpoint,
    check_position,
    checked,
    decode,
    encode,
)
from microbatch.checkpoints.sqlite import SqliteStore
from microbatch.checkpoints.store import CheckpointStore
from microbatch.checkpoints.targets import open_store


def cp(batches: int, **kw: Any) -> Checkpoint:
    fields: dict[str, Any] = dict(
        batches=batches, records=batches * 10, position=batches * 100, state={"sum": batches},
        fingerprint={"fn": "jobs.parse"}, created=1_700_000_000.0,
    )
    fields.update(kw)
    return Checkpoint(**fields)


def body_of(checkpoint: Checkpoint) -> dict[str, Any]:
    data = encode(checkpoint)
    return dict(json.loads(data)["body"])


def signed(body: dict[str, Any] | bytes) -> bytes:
    """A checkpoint whose checksum is right for ``body``, whatever the body holds."""
    raw = body if isinstance(body, bytes) \
        else json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest().encode()
    return b'{"format":"microbatch-checkpoint","sha256":"' + digest + b'","body":' + raw + b"}\n"


def with_field(name: str, value: Any) -> bytes:
    body = body_of(cp(3))
    body[name] = value
    return signed(body)


def deep_state_body(batches: int, depth: int) -> bytes:
    """A checkpoint body whose state is ``depth`` lists nested in each other (built as text)."""
    body = body_of(cp(batches, state=None))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return text.replace('"state":null', '"state":' + "[" * depth + "]" * depth).encode()


@pytest.fixture(params=["dir", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    s: CheckpointStore = DirectoryStore(tmp_path / "state") if request.param == "dir" \
        else SqliteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def put(store: CheckpointStore, batches: int, data: bytes) -> None:
    """Store ``data`` as checkpoint number ``batches`` behind the store's back."""
    if isinstance(store, DirectoryStore):
        (store.path / f"checkpoint-{batches:012d}.json").write_bytes(data)
    else:
        assert isinstance(store, SqliteStore)
        with sqlite3.connect(store.path) as conn:
            conn.execute("INSERT OR REPLACE INTO microbatch_checkpoints VALUES (?, ?)", (batches, data))


# --- decode: every field, type and range ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("batches", -1), ("batches", "3"), ("batches", True), ("batches", 2.0), ("batches", None),
        ("records", -5), ("records", [1]), ("dead_letters", -1), ("dead_letters", "0"),
        ("finished", "yes"), ("finished", 1), ("fingerprint", {"fn": 1}), ("fingerprint", ["fn"]),
        ("created", "today"), ("created", -1.0), ("created", True), ("version", True), ("version", "1"),
    ],
)
def test_every_field_is_checked_for_type_and_range(name: str, value: Any) -> None:
    with pytest.raises(InvalidCheckpoint) as info:
        decode(with_field(name, value))
    assert info.value.field == name
    assert f"field {name!r}" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointCorrupt)


@pytest.mark.parametrize("name", ["position", "state", "batches", "finished", "fingerprint", "created"])
def test_a_missing_field_is_named(name: str) -> None:
    body = body_of(cp(3))
    del body[name]
    with pytest.raises(InvalidCheckpoint, match=f"field {name!r}") as info:
        decode(signed(body))
    assert info.value.field == name


def test_a_valid_checkpoint_round_trips_with_every_field() -> None:
    original = cp(7, finished=True, dead_letters=12, position={"offset": 4}, state=[1, {"a": None}])
    assert decode(encode(original)) == original


# --- the position's kind, which only the pipeline knows --------------------------------------------


@pytest.mark.parametrize("kind", ["offset", "count"])
def test_a_null_position_after_batches_is_not_a_fresh_start(kind: Any) -> None:
    with pytest.raises(InvalidCheckpoint, match="field 'position' is null after 3 batches") as info:
        check_position(cp(3, position=None), kind)
    assert info.value.field == "position"
    assert check_position(cp(0, records=0, position=None), kind) == 0  # nothing read yet: from the start
    assert check_position(cp(3, position=250), kind) == 250


@pytest.mark.parametrize("value", ["12", 1.5, True, -1, [3], {"offset": 3}])
def test_an_offset_must_be_an_int_at_least_zero(value: Any) -> None:
    with pytest.raises(InvalidCheckpoint, match=r"field 'position' is .*not a byte offset"):
        check_position(cp(3, position=value), "offset")


@pytest.mark.parametrize(
    ("position", "field"),
    [({"offset": 5}, "position"), ({"chunk": 1, "skip": "3"}, "position.skip"),
     ({"chunk": 1, "skip": True}, "position.skip"), ({"chunk": 1, "skip": -1}, "position.skip"),
     ({"chunk": 1, "skip": 1.0}, "position.skip"), (7, "position")],
)
def test_a_chunk_position_of_the_wrong_shape_is_refused_naming_the_field(position: Any, field: str) -> None:
    with pytest.raises(InvalidCheckpoint, match=f"field '{field}'"):
        check_position(cp(3, position=position), "chunk")


def test_chunk_and_none_positions() -> None:
    position = {"chunk": {"offset": 5, "file": "a"}, "skip": 2}
    assert check_position(cp(3, position=position), "chunk") == position
    assert check_position(cp(3, position={"chunk": None, "skip": 0}), "chunk") == {"chunk": None, "skip": 0}
    # A chunk source whose chunks carry no position (a TCP server) continues with what comes next.
    assert check_position(cp(3, position=None), "chunk") is None
    assert check_position(cp(3, position=None), "none") is None
    with pytest.raises(InvalidCheckpoint, match="cannot resume"):
        check_position(cp(3, position=300), "none")
    with pytest.raises(ValueError, match="kind must be"):
        check_position(cp(3), "bytes")  # type: ignore[arg-type]


def test_a_null_file_position_falls_back_to_the_previous_checkpoint(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(cp(1))
    store.save(cp(2, position=None))
    with caplog.at_level(logging.WARNING, logger="microbatch.checkpoint"):
        loaded = store.load(lambda c: check_position(c, "offset"))
    assert loaded is not None and loaded.batches == 1 and loaded.position == 100
    [(where, why)] = store.skipped
    assert "2" in where and "field 'position' is null after 2 batches" in why
    assert "field 'position'" in caplog.text


# --- the aggregator's state goes through its load --------------------------------------------------


@pytest.mark.parametrize("bad_state", ["12", 1.5, None, [1, 2]])
def test_a_sum_state_sum_cannot_load_falls_back(store: CheckpointStore, bad_state: Any) -> None:
    agg = Sum()
    state = agg.fold(agg.initial(), 41)
    store.save(cp(1, state=agg.dump(state)))
    store.save(cp(2, state=bad_state))
    loaded_states: list[Any] = []

    def validate(c: Checkpoint) -> None:
        loaded_states.append(checked("state", agg.load, c.state))

    loaded = store.load(validate)
    assert loaded is not None and loaded.batches == 1
    assert agg.value(loaded_states[-1]) == 41  # the last successful validation is the one returned
    [(_, why)] = store.skipped
    assert why.startswith("field 'state' was refused by Sum().load: ValueError")


def test_every_checkpoint_refused_is_corrupt_naming_each_field(store: CheckpointStore) -> None:
    store.save(cp(1, position=None))
    store.save(cp(2, state="12"))

    def validate(c: Checkpoint) -> None:
        check_position(c, "offset")
        checked("state", Sum().load, c.state)

    with pytest.raises(CheckpointCorrupt) as info:
        store.load(validate)
    message = str(info.value)
    assert "field 'position' is null" in message and "field 'state' was refused" in message
    assert "--fresh" in message


def test_a_mismatch_raised_by_validate_stops_instead_of_falling_back(store: CheckpointStore) -> None:
    store.save(cp(1))
    store.save(cp(2))

    def validate(c: Checkpoint) -> None:
        raise CheckpointMismatch("another pipeline")

    with pytest.raises(CheckpointMismatch):
        store.load(validate)


def test_a_store_must_lock_and_validate_to_be_used() -> None:
    class StoreWithoutLock:
        location = "old-store"

        def __init__(self) -> None:
            self.skipped: list[tuple[str, str]] = []

        def load(self, validate: object = None) -> Checkpoint | None:
            return None

        def save(self, checkpoint: Checkpoint) -> None: ...
        def clear(self) -> None: ...
        def close(self) -> None: ...

    assert not isinstance(StoreWithoutLock(), CheckpointStore)
    with pytest.raises(TypeError, match="checkpoint store"):
        open_store(StoreWithoutLock())  # type: ignore[arg-type]


# --- nesting depth ---------------------------------------------------------------------------------


def test_a_state_nested_100k_deep_is_refused_without_recursion_error(store: CheckpointStore) -> None:
    store.save(cp(1))
    put(store, 2, signed(deep_state_body(2, 100_000)))
    loaded = store.load()
    assert loaded is not None and loaded.batches == 1
    [(_, why)] = store.skipped
    assert f"field 'state' nests lists or objects more than {MAX_DEPTH} levels deep" in why
    with pytest.raises(InvalidCheckpoint) as info:
        decode(signed(deep_state_body(2, 100_000)))
    assert info.value.field == "state"


def test_the_depth_bound_is_exact() -> None:
    assert decode(signed(deep_state_body(2, MAX_DEPTH))).batches == 2
    with pytest.raises(InvalidCheckpoint, match=f"more than {MAX_DEPTH} levels"):
        decode(signed(deep_state_body(2, MAX_DEPTH + 1)))
    with pytest.raises(InvalidCheckpoint, match="more than 5 levels"):
        decode(signed(deep_state_body(2, 6)), max_depth=5)


def test_many_brackets_that_are_shallow_or_inside_strings_are_accepted() -> None:
    wide = cp(2, state=[[[]] for _ in range(5000)], position={"k": "[" * 50_000 + "{" * 50_000})
    assert decode(encode(wide)) == wide
    deep_position = body_of(cp(2, position=None))
    text = json.dumps(deep_position, sort_keys=True, separators=(",", ":"))
    text = text.replace('"position":null', '"position":' + '{"a":' * 300 + "1" + "}" * 300)
    with pytest.raises(InvalidCheckpoint) as info:
        decode(signed(text.encode()))
    assert info.value.field == "position"

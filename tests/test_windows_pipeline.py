"""Windows in a real pipeline: worker processes, files, checkpoints, the sink and dead letters."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from windows_oracle import oracle, same_windows

import microbatch as mb

pytestmark = pytest.mark.anyio


def keyed_pairs(lines: list[str]) -> list[tuple[int, str, int]]:
    """Runs in a worker: ``"<seconds> <key>"`` lines as (timestamp, key, 1)."""
    out = []
    for line in lines:
        t, key = line.split()
        out.append((int(t), key, 1))
    return out


def values(lines: list[str]) -> list[tuple[int, int]]:
    """Runs in a worker: ``"<seconds> <key>"`` lines as (timestamp, 1)."""
    return [(int(line.split()[0]), 1) for line in lines]


def stamped_len(lines: list[str]) -> int:
    return len(lines)


def _log(tmp_path: Path, n: int = 2000, seed: int = 1) -> tuple[Path, list[tuple[int, str, int]]]:
    rng = random.Random(seed)
    t, records = 1_700_000_000, []
    for _ in range(n):
        t += rng.choice([0, 0, 1, 2, 5])
        records.append((t, rng.choice("abcde"), 1))
    path = tmp_path / "events.log"
    path.write_text("".join(f"{t} {k}\n" for t, k, _ in records))
    return path, records


def _tuples(windows: list[Any]) -> list[tuple[Any, ...]]:
    return [(w.start, w.end, w.key, w.value) for w in windows]


@pytest.mark.parametrize("kind", [{"size": 60}, {"size": 60, "slide": 20}, {"gap": 3}])
async def test_run_returns_every_closed_window_of_an_in_order_file(
    tmp_path: Path, kind: dict[str, int]
) -> None:
    path, records = _log(tmp_path)
    pipeline = mb.Pipeline(keyed_pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), grace=2, **kind),
                           max_size=97, workers=2)
    got = await pipeline.run(mb.read_lines(path))
    want, late = oracle([records], grace=2, **kind)
    assert same_windows(_tuples(got), want)
    assert late == 0


@pytest.mark.parametrize("entered", [True, False])
async def test_by_window_gives_a_keyed_window_with_all_its_keys_at_once(
    tmp_path: Path, entered: bool
) -> None:
    path, records = _log(tmp_path)
    pipeline = mb.Pipeline(keyed_pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60, grace=2),
                           max_size=97, workers=2)
    got: list[Any] = []
    if entered:
        async with pipeline.windows(mb.read_lines(path)) as stream:
            got = [window async for window in stream.by_window()]
    else:
        got = [window async for window in pipeline.windows(mb.read_lines(path)).by_window()]
    assert all(type(w) is mb.KeyedWindow for w in got)
    assert [w.start for w in got] == sorted({w.start for w in got})  # one item per window, in order
    per_key = [r for w in got for r in w.results()]
    want, _ = oracle([records], size=60, grace=2)
    assert same_windows(_tuples(per_key), want)
    assert per_key == await pipeline.run(mb.read_lines(path))  # the same windows, key by key


async def test_by_window_gives_windows_of_an_inner_without_keys_as_they_are(tmp_path: Path) -> None:
    path, records = _log(tmp_path, n=600)
    pipeline = mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=30), max_size=50, workers=1)
    async with pipeline.windows(mb.read_lines(path)) as stream:
        got = [window async for window in stream.by_window()]
    want, _ = oracle([[(t, None, 1) for t, _, _ in records]], size=30)
    assert all(type(w) is mb.WindowResult for w in got)
    assert same_windows(_tuples(got), want)


async def test_windows_come_as_they_close_and_the_sink_sees_them_first(tmp_path: Path) -> None:
    path, records = _log(tmp_path, n=600)
    seen: list[tuple[int, Any]] = []

    async def sink(seq: int, window: Any) -> None:
        seen.append((seq, window))

    pipeline = mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=30), max_size=50, workers=1,
                           sink=sink)
    got = []
    async for window in pipeline.windows(mb.read_lines(path), checkpoint=tmp_path / "state"):
        assert seen[len(got)][1] == window  # the sink had it before the consumer
        got.append(window)
    want, _ = oracle([[(t, None, 1) for t, _, _ in records]], size=30)
    assert same_windows(_tuples(got), want)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


async def test_late_records_are_counted_and_dead_lettered(tmp_path: Path) -> None:
    lines = ["100 a", "101 b", "500 a", "501 a", "502 b", "90 a", "95 b", "503 a"]
    path = tmp_path / "late.log"
    path.write_text("\n".join(lines) + "\n")
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(keyed_pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60, grace=5),
                           max_size=2, workers=1, dead_letter=dead)
    stream = pipeline.windows(mb.read_lines(path))
    got = [w async for w in stream]
    assert _tuples(got) == [(60, 120, "a", 1), (60, 120, "b", 1), (480, 540, "a", 3), (480, 540, "b", 1)]
    assert stream.stats.late_records == 2
    # one letter per window (and key, for sessions) per batch: here one or two, as batches fell
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert {letter["error"] for letter in letters} == {"late"}
    assert sum(letter["record"]["records"] for letter in letters) == 2
    assert {letter["record"]["timestamp"] for letter in letters} <= {90, 95}
    assert all(letter["record"]["window"] == [60, 120] for letter in letters)


async def test_dropped_late_records_are_only_counted(tmp_path: Path) -> None:
    path = tmp_path / "late.log"
    path.write_text("100 a\n500 a\n501 a\n90 a\n")
    dead = tmp_path / "dead.jsonl"
    agg = mb.Windows(mb.ByKey(mb.Count()), size=60, on_late="drop")
    stream = mb.Pipeline(keyed_pairs, aggregate=agg, max_size=1, workers=1, dead_letter=dead).windows(
        mb.read_lines(path))
    async with stream:
        assert [w.value async for w in stream] == [1, 2]
    assert stream.stats.late_records == 1
    assert not dead.exists()


async def test_a_resumed_run_gives_each_window_once_after_its_checkpoint(tmp_path: Path) -> None:
    path, records = _log(tmp_path, n=1500, seed=3)
    agg = mb.Windows(mb.ByKey(mb.Count()), size=60)
    pipeline = mb.Pipeline(keyed_pairs, aggregate=agg, max_size=40, workers=2, checkpoint_every_batches=3)
    state = tmp_path / "state"
    first = []
    async with pipeline.windows(mb.read_lines(path), checkpoint=state) as stream:
        async for window in stream:
            first.append(window)
            if len(first) == 25:
                break
    rest = await pipeline.run(mb.read_lines(path), checkpoint=state)
    want, _ = oracle([records], size=60)
    # every window the first run's consumer took is either in the rest or was checkpointed away
    together = {(w.start, w.end, w.key): w.value for w in [*first, *rest]}
    assert sorted(together.items()) == sorted(((s, e, k), v) for s, e, k, v in want)
    # the rest starts right after the last window a checkpoint recorded: no gap, no repeats in it
    assert same_windows(_tuples(rest), want[len(want) - len(rest):])
    assert len(rest) < len(want)
    assert await pipeline.run(mb.read_lines(path), checkpoint=state) == []  # finished: nothing again


async def test_processing_time_windows(tmp_path: Path) -> None:
    path, _ = _log(tmp_path, n=300)
    pipeline = mb.Pipeline(stamped_len, aggregate=mb.Windows(mb.Sum(), size=3600, clock="processing"),
                           max_size=100, workers=1)
    got = await pipeline.run(mb.read_lines(path))
    assert sum(w.value for w in got) == 300
    assert all(w.end - w.start == 3600 for w in got)


async def test_windows_need_a_windows_aggregate() -> None:
    with pytest.raises(TypeError, match=r"needs aggregate=mb\.Windows"):
        mb.Pipeline(values, aggregate=mb.Count()).windows([])


async def test_a_bad_timestamp_is_dead_lettered_naming_the_item(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    path.write_text("100 a\nsoon a\n130 a\n")
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(_maybe_int, aggregate=mb.Windows(mb.Count(), size=60), max_size=3, workers=1,
                           dead_letter=dead, retries=0)
    got = await pipeline.run(mb.read_lines(path))
    assert _tuples(got) == [(60, 120, None, 1), (120, 180, None, 1)]
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["record"] == "soon a" and "item 0 of fn's result" in letter["message"]


def _maybe_int(lines: list[str]) -> list[tuple[Any, int]]:
    out: list[tuple[Any, int]] = []
    for line in lines:
        t = line.split()[0]
        out.append((int(t) if t.isdigit() else t, 1))
    return out


def sized_hits(lines: list[str]) -> list[tuple[int, str, dict[str, int]]]:
    """Runs in a worker: ``"<seconds> <key>"`` lines as (timestamp, key, {"n": 1, "size": len})."""
    out = []
    for line in lines:
        t, key = line.split()
        out.append((int(t), key, {"n": 1, "size": len(line)}))
    return out


async def test_sessions_of_several_aggregates_per_key(tmp_path: Path) -> None:
    path, records = _log(tmp_path, n=800, seed=5)
    agg = mb.Windows(mb.ByKey(mb.Aggregates(n=mb.Count(), size=mb.Sum())), gap=4)
    got = await mb.Pipeline(sized_hits, aggregate=agg, max_size=64, workers=2).run(mb.read_lines(path))
    want, _ = oracle([records], gap=4)
    assert same_windows([(w.start, w.end, w.key, w.value["n"]) for w in got], want)
    size = len(f"{records[0][0]} a")
    assert all(w.value["size"] == w.value["n"] * size for w in got)


def failing(lines: list[str]) -> list[tuple[int, int]]:
    if any(line.startswith("bad") for line in lines):
        raise RuntimeError("a bad line")
    return [(int(line.split()[0]), 1) for line in lines]


async def test_an_error_of_the_run_comes_out_of_a_plain_async_for(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    path.write_text("".join(f"{t} a\n" for t in range(0, 300, 7)) + "bad line\n")
    pipeline = mb.Pipeline(failing, aggregate=mb.Windows(mb.Count(), size=60), max_size=5, workers=1,
                           on_error="raise", retries=0)
    got = []
    with pytest.raises(mb.BatchFailed, match="a bad line"):
        async for window in pipeline.windows(mb.read_lines(path)):
            got.append(window)
    assert [w.end for w in got] == sorted(w.end for w in got)


async def test_a_changed_pipeline_is_refused_before_any_window(tmp_path: Path) -> None:
    path, _ = _log(tmp_path, n=100)
    state = tmp_path / "state"
    await mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=30), workers=1).run(
        mb.read_lines(path), checkpoint=state)
    other = mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=60), workers=1)
    with pytest.raises(mb.CheckpointMismatch, match="size=60"):
        async for _ in other.windows(mb.read_lines(path), checkpoint=state):
            pass


async def test_updates_without_a_sink_warn_that_closed_windows_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = _log(tmp_path, n=200)
    pipeline = mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=30), max_size=50, workers=1)
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            assert isinstance(update.value, Sequence)  # the open windows, a view
    assert "this run has neither, so they are dropped" in caplog.text


async def test_a_stream_left_open_warns_how_to_leave_early() -> None:
    stream = mb.Pipeline(values, aggregate=mb.Windows(mb.Count(), size=30), executor="inline").windows([])
    stream._state = "open"  # as a plain async for left by break leaves it
    with pytest.warns(ResourceWarning, match="async with pipeline.windows"):
        del stream
        import gc

        gc.collect()

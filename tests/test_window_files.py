"""Keyed time windows checkpointed one file per open window: what a write costs, reading back, damage."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from windows_oracle import oracle

import microbatch as mb
from microbatch._exceptions import CheckpointCorrupt
from microbatch.aggregate.windows import each_result
from microbatch.checkpoints.format import decode
from microbatch.checkpoints.windowfiles import MANIFEST_FORMAT, WindowChanges, WindowFiles, WindowFilesLost


def keyed_pairs(lines: list[str]) -> list[tuple[int, str, int]]:
    """Runs in a worker: ``"<seconds> <key>"`` lines as (timestamp, key, 1)."""
    return [(int(t), key, 1) for t, key in map(str.split, lines)]


def _state(tmp: Path) -> dict[str, Any]:
    latest = max((tmp / "state").glob("checkpoint-*.json"))
    state: dict[str, Any] = decode(latest.read_bytes()).state
    return state


def test_a_write_costs_the_windows_that_changed() -> None:
    agg = mb.Windows(mb.ByKey(mb.Count()), size=60, grace=100)
    state = agg.fold(agg.initial(), [(0, "a", 1), (61, "b", 1), (62, ("t", 1), 1)])
    agg.close_batch(state)
    changes = agg.window_changes(state)
    assert changes is not None
    assert changes.starts == [0, 60] and set(changes.documents) == {0, 60}
    assert changes.documents[60] == (["b", ["t", 1]], [1, 1])  # JSON forms: a tuple key as a list
    state = agg.fold(state, [(70, "b", 1)])
    agg.close_batch(state)
    changes = agg.window_changes(state)
    assert changes is not None and changes.starts == [0, 60] and list(changes.documents) == [60]
    changes = agg.window_changes(agg.fold(state, []))
    assert changes is not None and changes.starts == [0, 60] and changes.documents == {}  # nothing folded
    state = agg.fold(state, [(500, "c", 1)])
    agg.close_batch(state)
    assert state.changed == {480}  # a closed window is forgotten: nothing grows without checkpoints
    assert mb.Windows(mb.Count(), size=60).window_changes(mb.Windows(mb.Count(), size=60).initial()) is None
    assert mb.Windows(mb.ByKey(mb.Count()), gap=5).window_changes(agg.initial()) is None  # sessions: whole


def test_files_hold_the_open_windows_only_and_read_back_exactly(tmp_path: Path) -> None:
    files = WindowFiles(tmp_path / "windows")
    head = {"format": "microbatch.windows/1", "top": 70, "emitted": 0, "late": 0}
    first = files.write(3, WindowChanges(head, [0, 60], {0: (["a"], [2]), 60: (["b", "c"], [1, 5])}))
    second = files.write(4, WindowChanges({**head, "top": 130}, [60, 120], {120: (["a"], [1])}))
    assert second["format"] == MANIFEST_FORMAT
    assert [w["start"] for w in second["windows"]] == [60, 120]
    assert second["windows"][0] == first["windows"][1]  # the unchanged window keeps its file
    assert files.read(second) == {**head, "top": 130, "windows": [
        [60, {"keys": ["b", "c"], "states": [1, 5]}], [120, {"keys": ["a"], "states": [1]}]]}
    removed = files.collect([second])
    assert removed == [first["windows"][0]["name"]]  # the closed window's file
    assert sorted(p.name for p in (tmp_path / "windows").iterdir()) == sorted(
        w["name"] for w in second["windows"])


def test_a_damaged_or_crafted_manifest_is_refused_naming_the_file(tmp_path: Path) -> None:
    files = WindowFiles(tmp_path / "windows")
    head = {"format": "microbatch.windows/1", "top": 10, "emitted": 0, "late": 0}
    manifest = files.write(1, WindowChanges(head, [0], {0: (["a"], [1])}))
    name = manifest["windows"][0]["name"]
    data = bytearray((tmp_path / "windows" / name).read_bytes())
    data[-12] ^= 0xFF
    (tmp_path / "windows" / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=f"window state file .*{name} is damaged"):
        files.read(manifest)
    crafted = {**manifest, "windows": [{**manifest["windows"][0], "name": "../../etc/passwd"}]}
    with pytest.raises(CheckpointCorrupt, match=r"windows\[0\] has no plain window file name"):
        files.read(crafted)
    with pytest.raises(ValueError, match="has neither a file nor a change"):
        WindowFiles(tmp_path / "other").write(1, WindowChanges(head, [0], {}))


@pytest.mark.anyio
async def test_checkpoints_keep_files_of_open_windows_only_and_resume_exactly(tmp_path: Path) -> None:
    # 2 hours of 1-minute windows: the folder holds the windows of the kept checkpoints, not the span
    records = [(1_700_000_000 + i * 3, f"k{i % 7}", 1) for i in range(2400)]
    path = tmp_path / "events.log"
    path.write_text("".join(f"{t} {k}\n" for t, k, _ in records))
    pipeline = mb.Pipeline(keyed_pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60),
                           max_size=50, workers=2, checkpoint_every_batches=2)
    first = []
    async with pipeline.windows(mb.read_lines(path), checkpoint=tmp_path / "state") as stream:
        async for window in stream:
            first.append(window)
            if len(first) == 300:
                break
    manifest = _state(tmp_path)
    assert manifest["format"] == MANIFEST_FORMAT
    assert 1 <= len(manifest["windows"]) <= 2  # an in-order stream: one or two windows open
    names = {p.name for p in (tmp_path / "state" / "windows").iterdir()}
    assert {w["name"] for w in manifest["windows"]} <= names
    assert len(names) <= 3 * 2  # the open windows of the 3 checkpoints kept, at most
    rest = await pipeline.run(mb.read_lines(path), checkpoint=tmp_path / "state")
    want, _ = oracle([records], size=60)
    together = {(w.start, w.end, w.key): w.value for w in [*first, *rest]}
    assert sorted(together.items()) == sorted(((s, e, k), v) for s, e, k, v in want)
    assert _state(tmp_path)["windows"] == []  # finished: every window closed, no file named


@pytest.mark.parametrize("kind", [{"size": 10}, {"size": 12, "slide": 4}])
def test_reloading_from_the_files_at_any_batch_changes_no_window(
    tmp_path: Path, kind: dict[str, Any]
) -> None:
    rng = random.Random(5)
    t, batches = 0, []
    for _ in range(60):  # out of order within a grace of 6
        batch = []
        for _ in range(rng.randint(0, 12)):
            t += rng.choice([0, 1, 2])
            batch.append((max(0, t - rng.randint(0, 8)), rng.choice(["a", "b", ("c", 1)]), 1))
        batches.append(batch)
    agg = mb.Windows(mb.ByKey(mb.Count()), grace=6, **kind)

    def run(reload_every: int) -> list[tuple[Any, ...]]:
        files = WindowFiles(tmp_path / f"windows-{reload_every}")
        state, out = agg.initial(), []
        for i, batch in enumerate(batches):
            state = agg.fold(state, batch)
            out += [(w.start, w.end, w.key, w.value) for w in each_result(agg.close_batch(state)[0])]
            changes = agg.window_changes(state)
            assert changes is not None
            manifest = files.write(i, changes)
            files.collect([manifest])
            if reload_every and i % reload_every == 0:
                state = agg.load(files.read(manifest))
        return out + [(w.start, w.end, w.key, w.value) for w in each_result(agg.close_all(state))]

    whole = run(0)
    assert whole and run(1) == whole and run(3) == whole


@pytest.mark.anyio
async def test_a_sqlite_store_keeps_the_window_files_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_text("".join(f"{1_700_000_000 + i} k{i % 3}\n" for i in range(500)))
    pipeline = mb.Pipeline(keyed_pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60, grace=30),
                           max_size=50, workers=1, checkpoint_every_batches=1)
    async with pipeline.windows(mb.read_lines(path, follow=True, stop_when_idle=0.2),
                                checkpoint=tmp_path / "state.sqlite") as stream:
        got = [w async for w in stream]
    assert got and {w.key for w in got} == {"k0", "k1", "k2"}
    names = [p.name for p in (tmp_path / "state.sqlite.windows").iterdir()]
    assert names and all(n.startswith("window-") and n.endswith(".mbw") for n in names)


def test_a_folder_deleted_under_the_run_is_written_whole_again(tmp_path: Path) -> None:
    files = WindowFiles(tmp_path / "windows")
    head = {"format": "microbatch.windows/1", "top": 10, "emitted": 0, "late": 0}
    files.write(1, WindowChanges(head, [0, 60], {0: (["a"], [1]), 60: (["b"], [1])}))
    assert not files.needs_whole()
    shutil.rmtree(tmp_path / "windows")
    assert files.needs_whole()  # the session then marks every open window changed
    with pytest.raises(WindowFilesLost, match="were deleted while the run wrote them"):
        files.write(2, WindowChanges(head, [0, 60], {60: (["b"], [2])}))  # would name a lost file
    manifest = files.write(3, WindowChanges(head, [0, 60], {0: (["a"], [1]), 60: (["b"], [3])}))
    assert files.read(manifest)["windows"] == [[0, {"keys": ["a"], "states": [1]}],
                                               [60, {"keys": ["b"], "states": [3]}]]
    assert not files.needs_whole()

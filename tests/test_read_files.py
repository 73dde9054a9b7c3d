"""read_files: many files (plain, gzip, zstandard) as one source, positioned by file identity."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard
from _procs import kill_at_random_lines

import microbatch as mb

HERE = Path(__file__).parent
KILLS = int(os.environ.get("MB_KILLS", "3"))


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def pipeline(**settings: Any) -> mb.Pipeline[int, int]:
    return mb.Pipeline(sum_ints, aggregate=mb.Sum(), **{"max_size": 100, "workers": 2, **settings})


def lines(lo: int, hi: int) -> bytes:
    return "".join(f"{i}\n" for i in range(lo, hi)).encode()


def twenty_files(folder: Path, per_file: int = 1000) -> int:
    """f00..f19: every third gzip, every fifth other one zstandard, the rest plain; their sum."""
    folder.mkdir(exist_ok=True)
    for i in range(20):
        data = lines(i * per_file, (i + 1) * per_file)
        if i % 3 == 0:
            (folder / f"f{i:02}.log.gz").write_bytes(gzip.compress(data))
        elif i % 5 == 0:
            (folder / f"f{i:02}.log.zst").write_bytes(zstandard.compress(data))
        else:
            (folder / f"f{i:02}.log").write_bytes(data[:-1] if i == 7 else data)  # f07: no last newline
    return sum(range(20 * per_file))


@pytest.mark.anyio
async def test_twenty_files_some_compressed_exact(tmp_path: Path) -> None:
    expected = twenty_files(tmp_path / "logs")
    source = mb.read_files(str(tmp_path / "logs" / "*.log*"), block_size=3000)
    assert await pipeline().run(source, checkpoint=tmp_path / "state") == expected
    records = [r async for c in source.chunks() for r in c.records]
    assert records == [str(i) for i in range(20_000)]  # by name: f00, f01, ... in order


@pytest.mark.anyio
async def test_mtime_order_and_a_list_of_paths(tmp_path: Path) -> None:
    for name, lo, when in [("b", 0, 100), ("a", 10, 200), ("c", 20, 300)]:
        (tmp_path / name).write_bytes(lines(lo, lo + 10))
        os.utime(tmp_path / name, (when, when))
    by_mtime = mb.read_files(str(tmp_path / "*"), order="mtime")
    assert [r async for r in by_mtime] == [str(i) for i in range(30)]
    listed = mb.read_files([tmp_path / "c", str(tmp_path / "a")])
    assert [r async for c in listed.chunks() for r in c.records] == [str(i) for i in range(10, 30)]
    with pytest.raises(FileNotFoundError):
        [c async for c in mb.read_files([tmp_path / "missing"]).chunks()]


@pytest.mark.anyio
async def test_stopped_then_resumed_after_files_were_renamed(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    expected = twenty_files(logs)
    source = mb.read_files(str(logs / "*.log*"), block_size=2000)
    async with pipeline(checkpoint_every_batches=1).updates(source, checkpoint=state) as run:
        async for update in run:
            if update.records >= 5500:
                await run.stop()
    assert not run.finished
    position = run.stats.position["chunk"]
    reading = Path(next(p for p in logs.iterdir() if p.stat().st_ino == position["file"]["id"]["inode"]))
    # Names do not matter: the files done and the one being read are known by identity.
    for path in sorted(logs.iterdir()):
        path.rename(path.with_name("old-" + path.name))
    assert reading.with_name("old-" + reading.name).exists()
    assert await pipeline().run(source, checkpoint=state) == expected


@pytest.mark.anyio
async def test_the_file_being_read_gone_is_a_clear_error(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    twenty_files(logs)
    source = mb.read_files(str(logs / "*.log"), block_size=2000)
    async with pipeline(checkpoint_every_batches=1).updates(source, checkpoint=state) as run:
        async for update in run:
            if update.records >= 1500:
                await run.stop()
    inode = run.stats.position["chunk"]["file"]["id"]["inode"]
    next(p for p in logs.iterdir() if p.stat().st_ino == inode).unlink()
    with pytest.raises(mb.SourceError, match=r"the file being read at the checkpoint .* fresh=True"):
        await pipeline().run(source, checkpoint=state)


@pytest.mark.anyio
async def test_following_a_rotated_log(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines(0, 500))
    source = mb.read_files(str(tmp_path / "app.log*"), follow=True, order="mtime", poll_interval=0.01)
    written, rotations = 500, 0
    async with pipeline(max_wait=0.02).updates(source, checkpoint=tmp_path / "state") as run:
        async for update in run:
            if update.records < written:
                continue
            if rotations == 4:
                await run.stop()
                continue
            # Everything written so far is folded: rotate (app.log -> app.log.N), add lines to the
            # renamed file as a writer still holding it would, then start the new file.
            rotations += 1
            log.rename(tmp_path / f"app.log.{rotations}")
            with open(tmp_path / f"app.log.{rotations}", "ab") as old:
                old.write(lines(written, written + 50))
            log.write_bytes(lines(written + 50, written + 300))
            written += 300
    assert run.value == sum(range(written)) and written == 500 + 4 * 300


@pytest.mark.anyio
async def test_stop_when_idle_then_the_next_run_takes_the_new_files(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    (logs / "1.log").write_bytes(lines(0, 100))
    (logs / "2.log.gz").write_bytes(gzip.compress(lines(100, 200)))
    source = mb.read_files(str(logs / "*"), follow=True, stop_when_idle=0.2, poll_interval=0.01)
    async with pipeline().updates(source, checkpoint=state) as run:
        async for _ in run:
            pass
    assert run.value == sum(range(200)) and not run.finished
    (logs / "3.log").write_bytes(lines(200, 300))
    assert await pipeline().run(source, checkpoint=state) == sum(range(300))


@pytest.mark.anyio
async def test_a_rerun_over_a_finished_run_adds_the_new_files(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    (logs / "1.log").write_bytes(lines(0, 100))
    source = mb.read_files(str(logs / "*"))
    assert await pipeline().run(source, checkpoint=state) == sum(range(100))
    (logs / "2.log.gz").write_bytes(gzip.compress(lines(100, 250)))
    async with pipeline().updates(source, checkpoint=state) as run:
        seen = [update.batch_records async for update in run]
    # Only the new file is read; the finished value grows by it, and the run is finished again.
    assert sum(seen) == 150 and run.value == sum(range(250)) and run.finished
    assert await pipeline().run(source, checkpoint=state) == sum(range(250))


def test_bad_arguments_and_positions_are_named() -> None:
    with pytest.raises(ValueError, match="order"):
        mb.read_files("*.log", order="size")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="follow=True"):
        mb.read_files("*.log", stop_when_idle=1.0)
    with pytest.raises(ValueError, match="not a read_files position"):
        mb.read_files("*.log").resume({"seq": 1})
    with pytest.raises(mb.CheckpointError, match=r"position\.file\.offset"):
        mb.read_files("*.log").resume({"done": [], "file": {"id": {}, "offset": -1}})


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path: Path, backend: str) -> None:
    expected = twenty_files(tmp_path / "logs")  # 200 batches of 100
    job = [str(HERE / "sources_job.py"), "files", str(tmp_path / "logs" / "*"), str(tmp_path / "state")]
    command = [sys.executable, *job, backend]
    kills = kill_at_random_lines(command, KILLS, 40)
    assert kills >= min(KILLS, 3), kills
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == f"done {expected}"


@pytest.mark.anyio
async def test_an_undecodable_line_ends_the_chunks_at_its_start(tmp_path: Path) -> None:
    good = lines(0, 50)
    (tmp_path / "a.log").write_bytes(good + b"\xff\xfe\n" + lines(50, 60))
    seen: list[Any] = []
    with pytest.raises(mb.SourceDecodeError) as caught:
        async for chunk in mb.read_files(str(tmp_path / "*.log")).chunks():
            seen.append(chunk)
    assert caught.value.offset == len(good)
    assert [r for c in seen for r in c.records] == [str(i) for i in range(50)]
    assert seen[-1].position["file"]["offset"] == len(good)  # a resume starts at the bad line


@pytest.mark.anyio
async def test_a_followed_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"1\n2\n3")  # "3" is not finished yet
    source = mb.read_files(str(tmp_path / "*.log"), follow=True, poll_interval=0.01)
    got: list[str] = []
    async with mb.batches(source, max_size=10, max_wait=0.01) as stream:
        async for batch in stream:
            got += batch
            if got == ["1", "2"]:
                with open(log, "ab") as f:
                    f.write(b"4\n5")
            elif got == ["1", "2", "34"]:
                (tmp_path / "b.log").write_bytes(b"6\n7")  # a newer file: a.log is done, "5" ends it
            elif got == ["1", "2", "34", "5", "6"]:
                break  # "7" waits for its newline (b.log is the newest file)
    assert got == ["1", "2", "34", "5", "6"]

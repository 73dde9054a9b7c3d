"""ByKey in a pipeline: counts per key with worker processes, resumed from a checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from _procs import newest_checkpoint

import microbatch as mb

pytestmark = pytest.mark.anyio


def count_users(lines: list[str]) -> Counter[str]:
    return Counter(line.split(",")[0] for line in lines)


def sum_by_user(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        user, amount = line.split(",")
        out[user] = out.get(user, 0) + int(amount)
    return out


def events(path: Path, n: int) -> Path:
    path.write_text("".join(f"u{(i * 7919) % 1_000},{i % 13}\n" for i in range(n)))
    return path


async def test_bykey_counts_and_sums_per_key_in_worker_processes(tmp_path: Path) -> None:
    src = events(tmp_path / "e.csv", 20_000)
    lines = src.read_text().splitlines()
    counts = await mb.Pipeline(count_users, aggregate=mb.ByKey(mb.Count()), max_size=1_000, workers=2).run(
        mb.read_lines(src)
    )
    assert dict(counts) == Counter(line.split(",")[0] for line in lines)
    sums = await mb.Pipeline(
        sum_by_user, aggregate=mb.ByKey(mb.Sum(), shards=4), max_size=1_000, workers=2
    ).run(mb.read_lines(src))
    expected: Counter[str] = Counter()
    for line in lines:
        user, amount = line.split(",")
        expected[user] += int(amount)
    assert dict(sums) == dict(expected)
    with pytest.raises(TypeError):
        sums["u1"] = 3  # type: ignore[index]  # a read-only mapping


async def test_bykey_resumes_with_another_shard_count_and_ends_exact(tmp_path: Path) -> None:
    src = events(tmp_path / "e.csv", 5_000)
    state = tmp_path / "state"
    first = mb.Pipeline(
        count_users,
        aggregate=mb.ByKey(mb.Count(), shards=4),
        max_size=100,
        executor="inline",
        checkpoint_every_batches=1,
    )
    async with first.updates(mb.read_lines(src), checkpoint=state) as run:
        async for update in run:
            if update.seq == 20:
                break
    second = first.replace(aggregate=mb.ByKey(mb.Count(), shards=5))
    counts = await second.run(mb.read_lines(src), checkpoint=state)
    assert dict(counts) == Counter(line.split(",")[0] for line in src.read_text().splitlines())


def keyed_checkpoint_bytes(state: Path) -> tuple[int, int]:
    """(bytes of the newest checkpoint file, bytes of the shard files) in a checkpoint folder."""
    newest = max(state.glob("checkpoint-*.json"))
    shards = sum(f.stat().st_size for f in (state / "keyed").iterdir() if f.is_file())
    return newest.stat().st_size, shards


def touch_one_key(lines: list[str]) -> Counter[str]:
    return Counter(lines)


async def test_keyed_checkpoints_write_shard_files_and_resume_exact_after_cancellation(
    tmp_path: Path,
) -> None:
    # 20,000 distinct keys, then batches that each touch 10 keys: later checkpoints write deltas.
    src = tmp_path / "keys.txt"
    src.write_text("".join(f"k{i}\n" for i in range(20_000)) + "".join(f"k{i % 10}\n" for i in range(2_000)))
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        touch_one_key,
        aggregate=mb.ByKey(mb.Count(), shards=8),
        max_size=1_000,
        executor="inline",
        checkpoint_every_batches=1,
    )
    async with pipeline.updates(mb.read_lines(src), checkpoint=state) as run:
        async for update in run:
            if update.seq == 21:
                break
    # The state is in the shard files; the checkpoint names them (a small manifest).
    manifest_bytes, shard_bytes = keyed_checkpoint_bytes(state)
    assert manifest_bytes < 10_000 < shard_bytes
    counts = await pipeline.run(mb.read_lines(src), checkpoint=state)
    expected = Counter(src.read_text().splitlines())
    assert dict(counts) == dict(expected)
    # Old shard files no kept checkpoint names are gone; a fresh run starts over.
    assert await pipeline.run(mb.read_lines(src), checkpoint=state, fresh=True) == counts


def test_inspect_counts_keys_per_shard_and_looks_a_key_up(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    src = tmp_path / "keys.txt"
    src.write_text("".join(f"k{i % 500}\n" for i in range(3_000)) + "k1\n" * 9 + "k2\n" * 4)
    job = tmp_path / "job.py"
    job.write_text(
        "from collections import Counter\nimport microbatch as mb\n"
        "def count(lines):\n    return Counter(lines)\n"
        "pipeline = mb.Pipeline(count, aggregate=mb.ByKey(mb.Count(), shards=4), max_size=500,"
        " executor='inline')\n"
    )
    state = tmp_path / "state"

    def mb_cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "microbatch", *argv], capture_output=True, text=True)

    run = mb_cli("run", f"{job}:pipeline", "--input", str(src), "--checkpoint", str(state),
                 "--checkpoint-every", "0")
    assert run.returncode == 0, run.stderr
    newest = newest_checkpoint(state)
    assert newest is not None and any(entry["deltas"] for entry in newest[1]["state"]["entries"])
    out = mb_cli("inspect", str(state), "--json")
    info = json.loads(out.stdout)
    assert info["shards"] == 4 and info["keys"] == 500 and sum(info["keys_per_shard"]) == 500
    assert (info["batches"], info["records"], info["finished"]) == (7, 3_013, True)
    # The largest values, read from every shard's files, bases and the deltas after them.
    assert info["top"][:2] == [["k1", 15], ["k2", 10]] and len(info["top"]) == 10
    assert {value for _, value in info["top"][2:]} == {6}
    text = mb_cli("inspect", str(state)).stdout
    assert "batches       7" in text and "records       3,013" in text
    assert "keys          500 in 4 shards" in text and "top 10" in text
    assert "top" not in json.loads(mb_cli("inspect", str(state), "--top", "0", "--json").stdout)
    found = json.loads(
        mb_cli("inspect", str(state), "--key", "k7", "--json", "--target", f"{job}:pipeline").stdout
    )
    assert found["found"] and found["value"] == 6
    missing = mb_cli("inspect", str(state), "--key", "nope")
    assert missing.returncode == 1 and "not found" in missing.stdout

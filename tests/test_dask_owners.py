"""Shard owners on a Dask cluster: Dask actors hold ``ByKey(Count())``'s keyed state.

The cluster is a real one (a ``dask scheduler`` and two single-threaded workers with nannies, on
127.0.0.1, started once for the module by ``tests/_dask_cluster.py``, as ``tests/test_dask.py``
does). Dask's client runs on asyncio: tests run on asyncio and uvloop; one checks that trio is
refused with a clear error.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("distributed")

from _dask_cluster import DaskCluster
from _dask_fixtures import dask_backend, dask_cluster_of_module, module_cluster  # noqa: F401 - fixtures

import microbatch as mb
from microbatch._core.owners import OwnedParts
from microbatch.executors import dask_owners
from microbatch.executors.dask import DaskExecutor
from microbatch.executors.dask_owners import DaskOwners, OwnerActor
from microbatch.pipeline import owned

# -- functions the workers run (module level: workers import this module by name) -------------------


def words(lines: list[str]) -> collections.Counter[str]:
    return collections.Counter(line.split()[0] for line in lines)


def write_words(path: Path, n: int, keys: int) -> collections.Counter[str]:
    """Write ``n`` lines of keys ``w0 .. w{keys-1}`` scrambled; their Counter."""
    lines = [f"w{(i * 7919) % keys} {i}\n" for i in range(n)]
    path.write_text("".join(lines))
    return collections.Counter(line.split()[0] for line in lines)


@pytest.fixture
def receipts(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The type of every result the fold stage folds into keyed state held by owners."""
    seen: list[type] = []
    fold = owned.OwnedByKey.fold

    def recording(self: owned.OwnedByKey, state: Any, result: Any) -> Any:
        seen.append(type(result))
        return fold(self, state, result)

    monkeypatch.setattr(owned.OwnedByKey, "fold", recording)
    return seen


@pytest.mark.anyio
async def test_count_by_key_is_exact_and_the_pipeline_gets_only_receipts(
    cluster: DaskCluster, tmp_path: Path, receipts: list[type]
) -> None:
    path = tmp_path / "words.txt"
    expected = write_words(path, 30_000, 2_000)
    pipeline = mb.Pipeline(
        words, aggregate=mb.ByKey(mb.Count()), max_size=1_000, executor=DaskExecutor(cluster)
    )
    result = await pipeline.run(mb.read_lines(path))
    assert dict(result) == expected
    assert result["w7"] == expected["w7"]
    assert len(result) == 2_000
    assert receipts and set(receipts) == {OwnedParts}


_next_line = -1


def words_crash_once(marker: Path, lines: list[str]) -> collections.Counter[str]:
    """Count words; a worker holding no owner kills itself (once per test) at a batch that follows
    the one it just counted in the same split: the parts that batch handed over are never named."""
    global _next_line
    from distributed import get_worker

    follows = int(lines[0].split()[1]) == _next_line
    _next_line = int(lines[-1].split()[1]) + 1
    if follows and not get_worker().state.actors and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return words(lines)


def words_fail_once(marker: Path, lines: list[str]) -> collections.Counter[str]:
    if not marker.exists():
        marker.write_text("failed")
        raise ValueError("fails once")
    return words(lines)


@pytest.fixture
def actor_stats(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, int]]]:
    """Each run's actors' stats, taken as the run ends (before their state is taken)."""
    taken: list[list[dict[str, int]]] = []
    leave = DaskOwners.__aexit__

    async def recording(self: DaskOwners, *exc_info: object) -> None:
        if exc_info[1] is None and self.error is None:
            await self.drain(failed=False)  # every ticket folded
            taken.append(await self.stats())
        await leave(self, *exc_info)

    monkeypatch.setattr(DaskOwners, "__aexit__", recording)
    return taken


@pytest.mark.anyio
async def test_a_worker_killed_mid_split_is_rerun_and_its_parts_are_dropped_unfolded(
    cluster: DaskCluster, tmp_path: Path, actor_stats: list[list[dict[str, int]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dask_owners, "KEEP_TICKETS", 100)
    path = tmp_path / "words.txt"
    expected = write_words(path, 100_000, 3_000)
    marker = tmp_path / "crashed"
    pipeline = mb.Pipeline(
        functools.partial(words_crash_once, marker),
        aggregate=mb.ByKey(mb.Count(), owners=1),  # one worker holds no owner: it may die
        max_size=500,
        split_size=64 << 10,
        queue_size=2,
        executor=DaskExecutor(cluster, max_in_flight=2),
    )
    result = await pipeline.run(mb.read_lines(path))
    assert marker.exists()
    assert dict(result) == expected
    [[stats]] = actor_stats
    assert stats["keys"] == 3_000
    assert stats["folded"] >= 200
    assert stats["dropped"] >= 1  # the parts of the killed attempt, never folded,
    assert stats["waiting"] == 0  # did not stay


def words_kill_an_owner(marker: Path, lines: list[str]) -> collections.Counter[str]:
    """Count words; a worker holding an owner kills itself once (the owner's state goes with it)."""
    from distributed import get_worker

    if get_worker().state.actors and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return words(lines)


@pytest.mark.anyio
async def test_an_owner_lost_with_its_worker_fails_the_run_naming_it(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    path = tmp_path / "words.txt"
    write_words(path, 20_000, 500)
    pipeline = mb.Pipeline(
        functools.partial(words_kill_an_owner, tmp_path / "killed"),
        aggregate=mb.ByKey(mb.Count(), owners=2),
        max_size=500,
        executor=DaskExecutor(cluster),
    )
    with anyio.fail_after(120), pytest.raises(Exception) as caught:
        await pipeline.run(mb.read_lines(path))
    assert (tmp_path / "killed").exists()
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, mb.WorkerCrashed) and "shard owner" in str(e) for e in chain), chain


@pytest.mark.anyio
async def test_fn_failing_once_is_retried_and_counted_once(cluster: DaskCluster, tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    expected = write_words(path, 20_000, 500)
    pipeline = mb.Pipeline(
        functools.partial(words_fail_once, tmp_path / "failed"),
        aggregate=mb.ByKey(mb.Sum(), owners=2),
        max_size=1_000,
        retries=3,
        backoff=0,
        executor=DaskExecutor(cluster),
    )
    assert dict(await pipeline.run(mb.read_lines(path))) == expected
    assert (tmp_path / "failed").exists()


def test_an_actor_folds_tickets_in_order_and_drops_unnamed_parts() -> None:
    actor = OwnerActor(0, keep=2)
    pack = dask_owners.wire.pack_part
    actor.put(1, pack({0: (["a"], [1])}))
    actor.put(2, pack({0: (["a", "b"], [2, 5])}))
    actor.put(3, pack({1: (["c"], [7])}))  # never named
    assert actor.fold(1, [2]) == (0, actor.life)  # ahead of its turn: waits for ticket 0
    assert actor.fold(0, [1]) == (2, actor.life)
    assert actor.state.shards == {0: {"a": 3, "b": 5}}
    assert actor.stats()["waiting"] == 1
    actor.fold(2, [])
    assert actor.stats() == {"keys": 2, "waiting": 0, "dropped": 1, "folded": 3}
    with pytest.raises(LookupError, match=r"part 0000000000000003 named by ticket 3"):
        actor.fold(3, [3])
    # An actor Dask started again (another life), or one that missed tickets, gives no state.
    with pytest.raises(LookupError, match="started it again"):
        actor.take(actor.life + 1, 3)
    with pytest.raises(LookupError, match="folded 3 tickets where 5 were sent"):
        actor.take(actor.life, 5)
    [(shard, keys, values)] = dask_owners.wire.unpack_part(actor.take(actor.life, 3))
    assert (shard, keys, values) == (0, ["a", "b"], array("q", [3, 5]))


@pytest.mark.anyio
async def test_a_checkpointed_run_stopped_midway_resumes_exact_with_another_owner_count(
    cluster: DaskCluster, tmp_path: Path, receipts: list[type]
) -> None:
    path = tmp_path / "words.txt"
    expected = write_words(path, 30_000, 1_000)
    state = tmp_path / "state"

    def pipeline(owners: int | None) -> mb.Pipeline[Any, Any]:
        return mb.Pipeline(
            words, aggregate=mb.ByKey(mb.Count(), owners=owners), max_size=1_000,
            executor=DaskExecutor(cluster), checkpoint_every=None, checkpoint_every_batches=1,
        )

    async with pipeline(None).updates(mb.read_lines(path), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 4:
                break
    folded = updates.stats.batches
    assert 5 <= folded < 30
    assert list((state / "keyed").glob("*.mbk"))  # written by the actors, binary shard files
    async with pipeline(1).updates(mb.read_lines(path), checkpoint=state) as resumed:
        seqs = [update.seq async for update in resumed]
    assert seqs == list(range(folded, 30))
    assert dict(resumed.value) == expected
    assert set(receipts) == {OwnedParts}


_KILLED_RUN = textwrap.dedent(
    """
    import sys, time, anyio, microbatch as mb
    from collections import Counter
    from microbatch.executors.dask import DaskExecutor

    def slow_words(lines):
        time.sleep(0.05)
        return Counter(line.split()[0] for line in lines)

    async def main():
        pipeline = mb.Pipeline(
            slow_words, aggregate=mb.ByKey(mb.Count()), max_size=500, executor=DaskExecutor(sys.argv[1]),
            checkpoint_every=None, checkpoint_every_batches=1,
        )
        async with pipeline.updates(mb.read_lines(sys.argv[2]), checkpoint=sys.argv[3]) as updates:
            async for update in updates:
                print(update.seq, flush=True)

    anyio.run(main, backend="asyncio")
    """
)


@pytest.mark.anyio
async def test_a_run_killed_with_sigkill_resumes_exact_from_the_owners_shard_files(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    path = tmp_path / "words.txt"
    expected = write_words(path, 30_000, 1_000)
    state = tmp_path / "state"
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    argv = [sys.executable, str(script), cluster.scheduler_address, str(path), str(state)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for _ in range(6):
            assert proc.stdout.readline()  # a batch folded and checkpointed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pipeline = mb.Pipeline(
        words, aggregate=mb.ByKey(mb.Count()), max_size=500, executor=DaskExecutor(cluster),
        checkpoint_every=None, checkpoint_every_batches=1,
    )
    # The killed run's fn is the script's own copy of ``words`` (with a sleep): the same counts.
    async with pipeline.updates(mb.read_lines(path), checkpoint=state, accept_changes=True) as resumed:
        seqs = [update.seq async for update in resumed]
    assert 6 <= seqs[0] and seqs[-1] == 59
    assert dict(resumed.value) == expected


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_trio_is_refused_with_a_clear_error(cluster: DaskCluster, tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    write_words(path, 100, 10)
    pipeline = mb.Pipeline(words, aggregate=mb.ByKey(mb.Count()), executor=DaskExecutor(cluster))
    with pytest.raises(mb.BackendNotSupported, match=r"needs asyncio.*runs on trio"):
        await pipeline.run(mb.read_lines(path))

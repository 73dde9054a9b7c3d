"""Splits of a file read by a run with shard owners follow the keys: large while a split combines
many records per key, small once the keys are too many for that (less held in each worker)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path

import pytest

import microbatch as mb
from microbatch._core.owners import OwnedParts, OwnerRoute, SplitSizer, key_universe
from microbatch._core.splits import plan_splits
from microbatch.pipeline.owned import OWNED_SMALL_SPLIT_SIZE, OWNED_SPLIT_SIZE, owned_split_sizes


def distinct_of_draws(universe: int, records: int, seed: int = 3) -> int:
    rng = random.Random(seed)
    return len({rng.randrange(universe) for _ in range(records)})


@pytest.mark.parametrize(("universe", "records"), [(500, 5_000), (50_000, 40_000), (2_000_000, 80_000)])
def test_the_key_universe_is_estimated_from_one_batchs_repeats(universe: int, records: int) -> None:
    estimate = key_universe(records, distinct_of_draws(universe, records))
    assert 0.85 * universe < estimate < 1.15 * universe


def test_no_repeat_says_the_keys_are_unbounded_and_no_key_says_none() -> None:
    assert key_universe(1_000, 1_000) == math.inf
    assert key_universe(1_000, 0) == 0.0
    assert key_universe(1_000, 1) < 2  # one key, seen a thousand times


def test_the_sizer_starts_small_and_grows_only_when_a_large_split_would_combine() -> None:
    sizer = SplitSizer(4 << 20, 1 << 20)
    assert sizer() == 1 << 20
    # 10 bytes a line: a large split holds about 420,000 lines.
    sizer.observe(records=100_000, keys=distinct_of_draws(50_000, 100_000), nbytes=1_000_000)
    assert sizer() == 4 << 20
    sizer.observe(records=100_000, keys=distinct_of_draws(2_000_000, 100_000), nbytes=1_000_000)
    assert sizer() == 1 << 20
    sizer.observe(records=500, keys=3, nbytes=5_000)  # too few records to tell: unchanged
    sizer.observe(records=100_000, keys=50, nbytes=0)  # bytes unknown: unchanged
    assert sizer() == 1 << 20
    with pytest.raises(ValueError, match="small"):
        SplitSizer(1 << 20, 4 << 20)


def test_a_size_that_changes_keeps_the_grid_points_of_the_larger_size() -> None:
    sizes = iter([1 << 20] * 5 + [4 << 20] * 3 + [1 << 20] * 100)
    ranges = list(plan_splits(0, 14 << 20, lambda: next(sizes)))
    assert ranges[0] == (0, 1 << 17)  # the first ranges are smaller: first results sooner
    assert all(lo == hi_before for (_, hi_before), (lo, _) in itertools.pairwise(ranges))
    assert ranges[-1][1] == 14 << 20
    assert ranges[4] == (1 << 20, 2 << 20) and ranges[5] == (2 << 20, 4 << 20)  # up to the 4 MiB grid
    assert ranges[6] == (4 << 20, 8 << 20) and ranges[7] == (8 << 20, 12 << 20)
    assert ranges[8] == (12 << 20, 13 << 20)


def test_owned_defaults_are_a_sizer_between_the_two_sizes() -> None:
    sized, batch = owned_split_sizes(2 << 20, True, True)
    assert isinstance(sized, SplitSizer)
    assert (sized.large, sized.small) == (OWNED_SPLIT_SIZE, OWNED_SMALL_SPLIT_SIZE)
    assert batch == OWNED_SPLIT_SIZE  # a whole split, however large it grows, is one batch
    # On Dask each split is a task, and many are in flight before the first is folded: fixed.
    assert owned_split_sizes(16 << 20, True, True, adapt=False) == (OWNED_SPLIT_SIZE, OWNED_SPLIT_SIZE)


def test_a_receipt_tells_the_records_the_bytes_and_the_keys(tmp_path: Path) -> None:
    route = OwnerRoute(Counter, 4, str(tmp_path), 2, counts=True)
    receipt = route([f"key-{i % 7}" for i in range(3_000)])
    assert isinstance(receipt, OwnedParts)
    assert (receipt.records, receipt.keys, receipt.nbytes) == (3_000, 7, 3_000 * len("key-0\n"))
    assert route([("t", 1)]).nbytes == 0  # records that are not lines: bytes unknown


def count_lines(lines: list[str]) -> Counter[str]:
    return Counter(lines)


@pytest.mark.anyio
@pytest.mark.parametrize("keys", [200, None])
async def test_a_run_reads_large_splits_over_few_keys_and_small_ones_over_many(
    tmp_path: Path, keys: int | None
) -> None:
    n = 600_000 if keys is None else 1_500_000  # 5.4 MB, 13.5 MB
    lines = [f"{i if keys is None else i % keys:08d}" for i in range(n)]
    path = tmp_path / "in.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), workers=2)
    async with pipeline.start(mb.read_lines(path)) as run:
        ends = [update.position async for update in run.updates()]
        counts = await run.result()
    assert dict(counts) == Counter(lines)
    largest = max(b - a for a, b in itertools.pairwise([0, *ends]))
    if keys is None:  # every line a key of its own: splits stay small (ends at line ends)
        assert largest <= OWNED_SMALL_SPLIT_SIZE + 9
    else:  # the reader is a few splits ahead of the first fold: later ones are large
        assert abs(largest - OWNED_SPLIT_SIZE) < 9

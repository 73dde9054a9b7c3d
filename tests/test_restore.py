"""restore(): every resume check in one call, on real stores and real files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from microbatch import CheckpointCorrupt, CheckpointMismatch
from microbatch._core.fingerprint import pipeline_fingerprint
from microbatch.aggregate import Mean, Sum
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.format import Checkpoint
from microbatch.checkpoints.identity import file_identity
from microbatch.checkpoints.session import restore
from microbatch.checkpoints.sqlite import SqliteStore
from microbatch.checkpoints.store import CheckpointStore


def parse(lines: list[str]) -> int:
    return sum(map(int, lines))


def text(start: int, stop: int) -> str:
    return "".join(f"{i}\n" for i in range(start, stop))


@pytest.fixture(params=["dir", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    s: CheckpointStore = DirectoryStore(tmp_path / "state") if request.param == "dir" \
        else SqliteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


@pytest.fixture
def numbers(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.txt"
    path.write_text(text(0, 1000))
    return path


def save(store: CheckpointStore, numbers: Path, batches: int, offset: int, total: int, **kw: object) -> None:
    agg = Sum()
    fields: dict[str, object] = dict(
        batches=batches, records=batches * 10, position=offset,
        state=agg.dump(agg.fold(agg.initial(), total)),
        fingerprint=pipeline_fingerprint(parse, agg, f"file:{numbers}"),
        identity=file_identity(numbers, offset).to_json(),
    )
    fields.update(kw)
    store.save(Checkpoint(**fields))  # type: ignore[arg-type]


def run_restore(store: CheckpointStore, numbers: Path, **kw: object) -> object:
    agg = Sum()
    options: dict[str, object] = dict(
        fingerprint=pipeline_fingerprint(parse, agg, f"file:{numbers}"), kind="offset",
        load_state=agg.load, path=numbers,
    )
    options.update(kw)
    return restore(store, **options)  # type: ignore[arg-type]


def test_nothing_to_restore(store: CheckpointStore, numbers: Path) -> None:
    assert run_restore(store, numbers) is None


def test_a_grown_file_resumes_from_the_offset(store: CheckpointStore, numbers: Path) -> None:
    offset = numbers.stat().st_size
    save(store, numbers, 5, offset, 499500, finished=True)
    with numbers.open("a") as f:
        f.write(text(1000, 1010))
    restored = run_restore(store, numbers)
    assert restored is not None
    assert restored.position == offset and restored.changes == []  # type: ignore[attr-defined]
    assert Sum().value(restored.state) == 499500  # type: ignore[attr-defined]
    assert restored.file.kind == "grown"  # type: ignore[attr-defined]


def test_invalid_newest_falls_back_and_position_must_match_identity(
    store: CheckpointStore, numbers: Path
) -> None:
    assert isinstance(store, (DirectoryStore, SqliteStore))
    store.keep = 4
    save(store, numbers, 1, 100, 10)
    save(store, numbers, 2, 200, 20, state="12")
    save(store, numbers, 3, 300, 30, position=None)
    save(store, numbers, 4, 400, 40, position=390)
    restored = run_restore(store, numbers)
    assert restored is not None and restored.checkpoint.batches == 1  # type: ignore[attr-defined]
    assert Sum().value(restored.state) == 10  # type: ignore[attr-defined]
    reasons = [why for _, why in store.skipped]
    assert reasons[0].startswith("field 'identity.offset' is 400, not the position 390")
    assert reasons[1].startswith("field 'position' is null after 3 batches")
    assert reasons[2].startswith("field 'state' was refused by Sum().load")


def test_a_changed_function_or_aggregator_is_refused_or_accepted(
    store: CheckpointStore, numbers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(store, numbers, 1, 100, 10)
    other = pipeline_fingerprint(parse, Mean(), f"file:{numbers}")
    with pytest.raises(CheckpointMismatch, match=r"the aggregator changed: Sum\(\) -> Mean\(\)"):
        run_restore(store, numbers, fingerprint=other)
    changed_code = {**pipeline_fingerprint(parse, Sum(), f"file:{numbers}"), "fn_code": "0" * 64}
    with caplog.at_level(logging.WARNING, logger="microbatch.checkpoint"):
        restored = run_restore(store, numbers, fingerprint=changed_code, accept_changes=True)
    assert restored is not None
    assert restored.changes == [f"fn's code changed ({__name__}.parse)"]  # type: ignore[attr-defined]


def test_a_rewritten_file_is_refused_naming_it(store: CheckpointStore, numbers: Path) -> None:
    save(store, numbers, 1, 500, 10)
    numbers.write_text(text(5, 1005))
    with pytest.raises(CheckpointMismatch, match=f"the input changed: .*{numbers}.*--fresh"):
        run_restore(store, numbers)


def test_a_rotated_file_is_found(store: CheckpointStore, numbers: Path, tmp_path: Path) -> None:
    save(store, numbers, 1, 500, 10)
    numbers.rename(tmp_path / "numbers.txt.1")
    numbers.write_text(text(2000, 2010))
    restored = run_restore(store, numbers)
    assert restored is not None
    assert restored.file.kind == "rotated"  # type: ignore[attr-defined]
    assert restored.file.path == str(tmp_path / "numbers.txt.1")  # type: ignore[attr-defined]


def test_a_checkpoint_of_the_previous_version_resumes(store: CheckpointStore, numbers: Path) -> None:
    # No identity and the three fingerprint keys the previous version wrote.
    save(store, numbers, 1, 100, 10, identity=None,
         fingerprint={"fn": f"{__name__}.parse", "aggregate": "Sum()", "source": f"file:{numbers}"})
    restored = run_restore(store, numbers)
    assert restored is not None and restored.position == 100  # type: ignore[attr-defined]
    assert restored.file is None  # type: ignore[attr-defined]


def test_every_checkpoint_invalid_is_corrupt(store: CheckpointStore, numbers: Path) -> None:
    save(store, numbers, 1, 100, 10, position=None)
    with pytest.raises(CheckpointCorrupt, match="field 'position' is null"):
        run_restore(store, numbers)

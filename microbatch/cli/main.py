"""The ``microbatch`` command: run a pipeline from the shell, inspect a checkpoint folder.

    microbatch run TARGET --input PATH|-|tcp://HOST:PORT [options]
    microbatch inspect DIR [--json]

``TARGET`` is ``path/to/file.py:NAME`` or ``package.module:NAME``, ``NAME`` a :class:`Pipeline`
(dotted attributes such as ``jobs:pipelines.daily`` work too). Options override the pipeline's
settings. Exit codes: 0 done, 1 the pipeline failed, 2 a usage error (bad option, bad target, missing input),
130 interrupted by SIGINT, 143 by SIGTERM, 141 stdout closed by its reader (``| head``), quietly.

Signals: the first SIGINT or SIGTERM stops reading the input, lets the batches already read finish
(for at most the batch ``timeout``), writes the final checkpoint and exits 130 or 143; a second one
stops at once: in-flight batches are abandoned, their workers killed, and the checkpoint written
holds what was folded. A signal that the parent left ignored (as a non-interactive shell does for
SIGINT of background jobs) stays ignored.

stdout carries only results: the final value, readable or (``--json``) as one JSON line, or a map
pipeline's results, one line each as they come. An interrupted run prints the value of what was
folded (the value its final checkpoint holds) and exits 130 or 143. Progress, logs and the summary
(with the command's wall time) go to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .codes import EXIT_ERROR, EXIT_OK, EXIT_PIPE, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, PROG, UsageError
from .inspect import _command_inspect
from .load import load_target
from .logs import _log_error, _setup_logging
from .output import silence_stdout
from .run import _UNSET, _command_run

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


def _positive_int_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'none', got {text!r}") from None


def _seconds(*, allow_zero: bool, allow_none: bool = True) -> Callable[[str], float | None]:
    bound = ">= 0" if allow_zero else "> 0"
    expected = f"seconds {bound}" + (" or 'none'" if allow_none else "")

    def parse(text: str) -> float | None:
        if allow_none and text.lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def _idle_seconds(text: str) -> float:
    """Seconds > 0, with or without an ``s``: ``5``, ``5s``, ``0.5s``."""
    value = _seconds(allow_zero=False, allow_none=False)(text[:-1] if text.endswith("s") else text)
    assert value is not None
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return int(text)


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
        epilog="exit codes: 0 done, 1 pipeline error, 2 usage error, 130 SIGINT, 143 SIGTERM, "
        "141 stdout closed",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a pipeline over an input",
        description="Run a pipeline over a file, standard input or a TCP port. Options override the "
        "pipeline's own settings.",
        epilog="exit codes: 0 done, 1 pipeline error, 2 usage error, 130 SIGINT, 143 SIGTERM, "
        "141 stdout closed. "
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
        help="a file path, a quoted glob ('logs/*.log*': many files, .gz/.zst too), '-' for standard "
        "input, tcp://HOST:PORT to listen for lines, or nats://HOST:PORT/STREAM[/SUBJECT] to read a "
        "NATS JetStream stream (followed)",
    )
    source.add_argument(
        "-f", "--follow", action="store_true", help="keep reading a file as it grows (like tail -f)"
    )
    source.add_argument(
        "--wait-for-file",
        type=_seconds(allow_zero=True),
        default=_UNSET,
        metavar="SECONDS",
        help="with --follow: how long to wait for a file that does not exist yet ('none', the default: "
        "as long as the run lasts)",
    )
    source.add_argument(
        "--poll-interval",
        type=_seconds(allow_zero=False, allow_none=False),
        default=None,
        metavar="SECONDS",
        help="with --follow: how often an idle file is checked for new lines (default 0.2)",
    )
    source.add_argument(
        "--stop-when-idle",
        type=_idle_seconds,
        default=None,
        metavar="SECONDS",
        help="with a nats:// input or a followed glob: end the run once no record came for this long "
        "('5' or '5s'); the next run with the same checkpoint reads on",
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
        "--accept-changes",
        action="store_true",
        help="resume although the pipeline's code or settings changed since the checkpoint (for a "
        "change known to be compatible; the changes are logged)",
    )
    state.add_argument(
        "--checkpoint-every",
        type=_seconds(allow_zero=True),
        default=_UNSET,
        metavar="SECONDS",
        help="seconds between checkpoints (0: after every batch; 'none': only at the end and on a stop)",
    )
    state.add_argument(
        "--dead-letter",
        metavar="PATH",
        help="file of records that kept failing (default: DIR/dead-letters.jsonl, FILE.dead-letters.jsonl "
        "beside a SQLite checkpoint FILE)",
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
        "--on-error",
        type=lambda text: text.replace("_", "-"),
        choices=("dead-letter", "raise"),
        help="a batch still failing after its retries: 'dead-letter' isolates the failing records and "
        "writes them to the dead-letter file, 'raise' stops the run (exit 1)",
    )
    tuning.add_argument(
        "--max-dead-letters-in-a-row",
        type=_positive_int_or_none,
        default=_UNSET,
        metavar="N",
        help="stop the run when N records in a row fail with none succeeding in between ('none': "
        "never stop for this)",
    )
    tuning.add_argument(
        "--split-size",
        type=_non_negative_int,
        metavar="BYTES",
        help="bytes of a file each worker reads itself (default 2 MiB; 0: the command reads the file "
        "and ships its lines)",
    )
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
        "--json",
        action="store_true",
        help="print the final value as one line of JSON on stdout (mappings with non-str keys as "
        "[key, value] pairs); a map pipeline's results as one JSON value a line",
    )
    output.add_argument(
        "--human",
        action="store_true",
        help="print numbers in the value with thousands separators (5,000,050,000); "
        "default: as Python prints them (5000050000)",
    )
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live progress on stderr (default: when stderr is a terminal)",
    )
    metrics = run.add_argument_group("metrics (needs microbatch[metrics])")
    metrics.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics while the run lasts "
        "(0: a free port, logged)",
    )
    metrics.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address the metrics endpoint binds (default 127.0.0.1: this machine only)",
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
    inspect.add_argument(
        "--key",
        metavar="KEY",
        help="keyed state (ByKey, TopK): look one key up, reading only its shard's files "
        "(42 is the int key 42 if the state holds it, else the str key '42'; ('a', 1) a tuple "
        "key; \"'42'\" only the str key; other text a str key)",
    )
    inspect.add_argument(
        "--top",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="keyed state: list the N keys of largest value, reading every shard (default 10; 0: "
        "read only the manifest)",
    )
    _add_logging_options(inspect)
    return parser


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
    except BrokenPipeError:
        silence_stdout()  # the reader of stdout went away (``| head``): end quietly, as Unix tools do
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception as exc:
        _log_error(exc)
        return EXIT_ERROR

"""The command's logging: one ``microbatch: [warning: |error: ]message`` line per record on stderr."""

from __future__ import annotations

import logging
import sys
import traceback

from .codes import PROG

log = logging.getLogger("microbatch.cli")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        # Messages of the library that name it already do not get the prefix twice.
        message = message.removeprefix(f"{PROG}: ")
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

"""Exit codes of the ``microbatch`` command and its usage error."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_PIPE = 128 + signal.SIGPIPE  # 141: stdout's reader went away (``| head``)

PROG = "microbatch"


class UsageError(Exception):
    """A bad command line: a target that cannot be loaded, an option value that cannot work (exit 2)."""

"""Sources: where records come from (files, growing files, TCP clients, standard input, any iterable)."""

from .files import LineSource, read_lines
from .protocol import Chunk, LineParts, Source
from .stdin import StdinLines, stdin_lines
from .tcp import TcpLines, tcp_lines

__all__ = [
    "Chunk",
    "LineParts",
    "LineSource",
    "Source",
    "StdinLines",
    "TcpLines",
    "read_lines",
    "stdin_lines",
    "tcp_lines",
]

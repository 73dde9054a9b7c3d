"""Sources: where records come from (files, growing files, many files, TCP clients, standard input,
NATS JetStream streams, any iterable)."""

from .files import LineSource, read_lines
from .many import ManyFiles, read_files
from .nats import NatsStream, nats_stream
from .protocol import Chunk, LineParts, Source
from .stdin import StdinLines, stdin_lines
from .tcp import TcpLines, tcp_lines

__all__ = [
    "Chunk",
    "LineParts",
    "LineSource",
    "ManyFiles",
    "NatsStream",
    "Source",
    "StdinLines",
    "TcpLines",
    "nats_stream",
    "read_files",
    "read_lines",
    "stdin_lines",
    "tcp_lines",
]

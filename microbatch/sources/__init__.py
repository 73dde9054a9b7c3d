"""Sources: where records come from (files, growing files, TCP clients, any iterable).

``protocol.py`` says what the pipeline asks of a source; the other modules are the built-in ones.
"""

from .files import LineSource, TcpLines, read_lines, tcp_lines
from .protocol import Chunk, LineParts, Source

__all__ = ["Chunk", "LineParts", "LineSource", "Source", "TcpLines", "read_lines", "tcp_lines"]

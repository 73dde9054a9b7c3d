"""Sources: where records come from (files, growing files, TCP clients, any iterable)."""

from .files import LineSource, TcpLines, read_lines, tcp_lines

__all__ = ["LineSource", "TcpLines", "read_lines", "tcp_lines"]

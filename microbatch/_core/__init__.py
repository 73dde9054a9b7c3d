"""The pure core: decisions without I/O, in plain synchronous code that never imports anyio.

Each module takes what it needs (``now``, a count, an outcome) as arguments and returns what to do
next; the async shell (the pipeline, the sources, the executors) waits, reads and writes.
"""

"""The core: plain synchronous code that never imports anyio nor the rest of the package.

Most modules are decisions without I/O: each takes what it needs (``now``, a count, an outcome) as
arguments and returns what to do next; the async shell (the pipeline, the sources, the executors)
waits, reads and writes. The others are what worker and shard owner processes run, which must start
light: reading a split (``splittask``), cutting a result by owner and writing its parts
(``owners``, ``ownerwire``).
"""

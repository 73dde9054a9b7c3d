"""Everything about checkpoints: what one holds, where it is kept, and how a run resumes from it.

- ``format``: the ``Checkpoint`` record, its encoding (JSON with a SHA-256 checksum), versions and
  the validation of every field; no file I/O.
- ``atomic``: the one atomic write (temporary file, fsync, rename, fsync of the folder).
- ``store``: the ``CheckpointStore`` protocol and the loading rules every store shares.
- ``lock``: the writer lock, one run at a time per store.
- ``directory``, ``sqlite``: the built-in stores; ``targets``: which store ``checkpoint=`` names.
- ``shards``: keyed state's shard files and the manifests that name them.
- ``identity``: which file a saved byte offset belongs to, and what became of it.
- ``deadletters``: the dead-letter file, whose length each checkpoint records.
- ``session``: a run's checkpoints: lock, load, validate, fall back, save.

This package imports neither the pipeline nor the sources (``lint-imports`` checks it); see
docs/checkpoints.md.
"""

"""The pipeline: a source's batches run in workers, folded in order, checkpointed.

``pipeline.py`` holds the reusable description (``Pipeline``); ``run.py`` wires one run's stages:
``reader.py`` → ``dispatch.py`` → ``fold.py``, which saves through ``microbatch.checkpoints``.
"""

from .pipeline import Pipeline
from .run import Run
from .stats import Stats, Update

__all__ = ["Pipeline", "Run", "Stats", "Update"]

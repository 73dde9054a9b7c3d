"""The pipeline: a source's batches run in workers, folded in order, checkpointed."""

from .run import Pipeline, Stats, Update

__all__ = ["Pipeline", "Stats", "Update"]

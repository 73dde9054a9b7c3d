"""Keyed state on disk: shard files (bases and deltas) and the manifests that name them."""

from .files import MANIFEST_FORMAT, ShardFiles, merge_documents

__all__ = ["MANIFEST_FORMAT", "ShardFiles", "merge_documents"]

"""Extraction at scale: embeddings of folders, file lists and tar shards into a sharded directory.

>>> from backbone_sdk.extraction import ExtractionSettings, run, read_extraction   # doctest: +SKIP
>>> run(["photos/"], "out", ExtractionSettings(backbone="dinov2_vits14", weights="hub"))
>>> ex = read_extraction("out"); ex.shards[0].shape, ex.meta.column("status")

See :mod:`backbone_sdk.extraction.store` for the layout and docs/extract.md for recipes.
"""

from .job import ExtractionError, ExtractionSettings, launcher_rank, run
from .sources import Sample, iter_samples
from .store import Extraction, verify

__all__ = ["ExtractionError", "ExtractionSettings", "Extraction", "Sample", "iter_samples", "launcher_rank", "run",
           "read_extraction", "verify"]


def read_extraction(root) -> Extraction:
    """Open an extraction directory: memory-mapped embeddings per shard plus the metadata table."""
    return Extraction(root)

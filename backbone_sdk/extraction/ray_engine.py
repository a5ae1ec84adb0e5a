"""``--engine ray``: the same shard workers as Ray tasks on a Ray cluster (``pip install 'backbone-sdk[ray]'``).

The driver writes the manifest; each task is one worker process (one model load) that claims shards
through the output directory's lock files, exactly as torchrun ranks do, so a cluster run, a
torchrun run and a rerun after a crash all resume each other's work. The output directory must be
on storage every Ray node sees.
"""

from __future__ import annotations

import os

from ..errors import require
from .job import ExtractionSettings, prepare, run, summarize

__all__ = ["run_on_ray"]


def _worker(inputs, output: str, settings: ExtractionSettings, rank: int, world: int) -> dict:
    return run(inputs, output, settings, rank=rank, world=world)


def run_on_ray(inputs, output: str | os.PathLike, settings: ExtractionSettings, *, tasks: int = 2,
               address: str | None = None, cpus_per_task: float = 1.0, overwrite: bool = False) -> dict:
    """Run ``tasks`` shard workers as Ray tasks (``address``: an existing cluster; default a local Ray)."""
    ray = require("ray", "ray")
    layout, _ = prepare(inputs, output, settings, overwrite=overwrite, rank=0)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=cpus_per_task)(_worker)
        ray.get([task.remote(inputs, os.fspath(output), settings, rank, tasks) for rank in range(tasks)])
    finally:
        if started:
            ray.shutdown()
    import pyarrow.parquet as pq

    return summarize(layout, pq.ParquetFile(layout.manifest).num_row_groups)

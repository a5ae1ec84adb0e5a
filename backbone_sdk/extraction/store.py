"""The on-disk layout of an extraction directory, read by numpy and pyarrow without the SDK::

    extraction.json          backbone, weights (source, sha256), preprocessing, dtype, SDK version
    manifest.parquet         every input: index, key, path, offset, size, caption, shard (one row group per shard)
    emb/part-00000.npy       [n_ok, D] embeddings of the shard's successful images, in meta order
    meta/part-00000.parquet  one row per input of the shard: index, key, path, status, error, width,
                             height, caption, emb_row (row in the npy, null for a failure)
    maps/part-00000.safetensors   optional --maps, keyed "<level>" with [n_ok, C, h, w] tensors
    stats/part-00000.json    counts and timings: written last, the only "shard done" marker
    locks/part-00000.lock    a worker's claim (host, pid, time); stale claims are retaken
    summary.json             totals of the last run

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Layout", "atomic_write", "claim", "release", "verify", "Extraction", "read_extraction_dir"]

MANIFEST_COLUMNS = ("index", "key", "path", "offset", "size", "caption", "shard")


class Layout:
    """Paths inside an extraction directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def part(self, kind: str, shard: int, suffix: str) -> Path:
        return self.root / kind / f"part-{shard:05d}{suffix}"

    @property
    def config(self) -> Path:
        return self.root / "extraction.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    def emb(self, shard: int) -> Path:
        return self.part("emb", shard, ".npy")

    def meta(self, shard: int) -> Path:
        return self.part("meta", shard, ".parquet")

    def maps(self, shard: int) -> Path:
        return self.part("maps", shard, ".safetensors")

    def stats(self, shard: int) -> Path:
        return self.part("stats", shard, ".json")

    def lock(self, shard: int) -> Path:
        return self.part("locks", shard, ".lock")

    def done(self, shard: int) -> bool:
        return self.stats(shard).is_file()

    def make_dirs(self) -> None:
        for kind in ("emb", "meta", "stats", "locks"):
            (self.root / kind).mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename to ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


# -- shard claims --------------------------------------------------------------------------------------
def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: dict, stale_after: float, mtime: float) -> bool:
    """A claim of a dead process on this host, or (other hosts, unreadable claims) older than ``stale_after``."""
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner.get("pid", -1)))
    return time.time() - float(owner.get("time", mtime)) > stale_after


def claim(layout: Layout, shard: int, stale_after: float) -> bool:
    """Atomically claim ``shard`` (``O_EXCL`` lock file); a claim of a dead process on this host, or
    older than ``stale_after`` seconds, is taken over."""
    path = layout.lock(shard)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                judged = os.stat(path)
                owner = json.loads(path.read_text() or "{}")
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                owner = {}
            if not _stale(owner, stale_after, judged.st_mtime):
                return False
            aside = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            if os.stat(aside).st_ino != judged.st_ino:  # another taker replaced it meanwhile: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(_owner(), fh)
        return True
    return False


def release(layout: Layout, shard: int) -> None:
    """Remove this process's claim (never another process's)."""
    path = layout.lock(shard)
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


# -- checking and reading ------------------------------------------------------------------------------
def _num_shards(layout: Layout) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(layout.manifest).num_row_groups


def verify(root: str | os.PathLike) -> list[str]:
    """Problems of an extraction directory (empty when it is complete and consistent): every
    manifest entry appears exactly once in the metadata, npy and parquet row counts agree."""
    import pyarrow.parquet as pq

    layout = Layout(root)
    if not layout.manifest.is_file():
        return [f"{layout.manifest} is missing: not an extraction directory, or the manifest was never finished"]
    manifest = pq.ParquetFile(layout.manifest)
    problems, seen = [], np.zeros(manifest.metadata.num_rows, dtype=np.int64)
    for shard in range(manifest.num_row_groups):
        if not layout.done(shard):
            problems.append(f"shard {shard}: not done (no {layout.stats(shard).name})")
            continue
        meta = pq.read_table(layout.meta(shard)).to_pydict()
        wanted = manifest.read_row_group(shard, columns=["index"]).column("index").to_pylist()
        if meta["index"] != wanted:
            problems.append(f"shard {shard}: metadata rows {len(meta['index'])} do not match its manifest rows "
                            f"{len(wanted)}")
        np.add.at(seen, np.asarray(meta["index"], dtype=np.int64), 1)
        ok = [r for r in meta["emb_row"] if r is not None]
        rows = np.load(layout.emb(shard), mmap_mode="r").shape[0]
        if ok != list(range(rows)):
            problems.append(f"shard {shard}: {rows} embedding rows but emb_row lists {len(ok)} (must be 0..n-1)")
        if sum(s == "ok" for s in meta["status"]) != rows:
            problems.append(f"shard {shard}: {rows} embedding rows but {sum(s == 'ok' for s in meta['status'])} ok rows")
    missing, twice = int((seen == 0).sum()), int((seen > 1).sum())
    if missing and not problems:
        problems.append(f"{missing} manifest entries appear in no shard")
    if twice:
        problems.append(f"{twice} manifest entries appear more than once")
    return problems


class Extraction:
    """An extraction directory opened for reading.

    ``shards``: memory-mapped ``[n_i, D]`` arrays, one per shard; ``meta``: a pyarrow table with a
    row per input (``shard`` and ``emb_row`` locate its embedding); ``info``: ``extraction.json``.
    :attr:`embeddings` concatenates the shards in order (that copy is in memory; use ``shards`` or
    :meth:`embedding` to stay memory-mapped).
    """

    def __init__(self, root: str | os.PathLike):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.layout = Layout(root)
        self.info = json.loads(self.layout.config.read_text())
        shards = [s for s in range(_num_shards(self.layout)) if self.layout.done(s)]
        self.shards = [np.load(self.layout.emb(s), mmap_mode="r") for s in shards]
        tables = []
        for s in shards:
            table = pq.read_table(self.layout.meta(s))
            tables.append(table.append_column("shard", pa.array([s] * table.num_rows, pa.int32())))
        self.meta = pa.concat_tables(tables) if tables else pa.table({})
        self._by_shard = dict(zip(shards, self.shards))

    @property
    def embeddings(self) -> np.ndarray:
        return np.concatenate(self.shards) if self.shards else np.zeros((0, self.info["embed_dim"]), np.float32)

    def embedding(self, row: int) -> np.ndarray | None:
        """The embedding of metadata row ``row`` (``None`` for a failed image)."""
        emb_row = self.meta.column("emb_row")[row].as_py()
        return None if emb_row is None else self._by_shard[self.meta.column("shard")[row].as_py()][emb_row]

    def __len__(self) -> int:
        return self.meta.num_rows


def read_extraction_dir(root) -> Extraction:
    return Extraction(root)


def iter_shard_rows(layout: Layout, shard: int) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(layout.manifest).read_row_group(shard).to_pylist()

"""Inputs of an extraction: one streaming interface over folders, file lists and tar shards.

Every reader yields :class:`Sample` records in a stable order without building a list of all
inputs: folders are walked directory by directory (names sorted, case-insensitive extensions),
file lists are read row by row, tar shards member by member. A sample carries either a path (its
bytes are read in the decode worker) or the bytes themselves (tar members).
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import attrs

__all__ = ["Sample", "IMAGE_SUFFIXES", "iter_samples", "describe"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
CAPTION_SUFFIXES = (".txt", ".json")


@attrs.frozen
class Sample:
    """One input: ``key`` (unique, stable), the ``path`` to read, and for a tar member the ``offset``
    and ``size`` of its bytes inside the (uncompressed) tar file; ``caption`` when the input has one."""

    key: str
    path: str
    offset: int = -1
    size: int = -1
    caption: str | None = None

    def read(self) -> bytes | str:
        """The bytes of a tar member, or the path of a file (opened by the decoder)."""
        if self.offset < 0:
            return self.path
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read(self.size)


def _walk(root: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk(Path(entry.path))
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            yield Path(entry.path)


def _folder(root: Path) -> Iterator[Sample]:
    for path in _walk(root):
        yield Sample(key=str(path.relative_to(root)), path=str(path))


def _list_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip() and not line.lstrip().startswith("#"):
                    yield {"path": line.strip()}
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or ()):
                raise ValueError(f"{path}: a CSV file list needs a 'path' column, got {reader.fieldnames}")
            yield from reader
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if "path" not in table.schema_arrow.names:
            raise ValueError(f"{path}: a parquet file list needs a 'path' column, got {table.schema_arrow.names}")
        columns = [c for c in ("path", "caption") if c in table.schema_arrow.names]
        for batch in table.iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: file lists are .txt, .csv or .parquet, got {suffix!r}")


def _file_list(path: Path) -> Iterator[Sample]:
    base = path.parent
    for row in _list_rows(path):
        target = Path(row["path"]).expanduser()
        full = target if target.is_absolute() else base / target
        caption = row.get("caption")
        yield Sample(key=row["path"], path=str(full), caption=None if caption in (None, "") else str(caption))


def _caption(data: bytes, suffix: str) -> str | None:
    text = data.decode("utf-8", errors="replace")
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return obj.get("caption") if isinstance(obj, dict) else None
    return text.strip()


def _tar(path: Path) -> Iterator[Sample]:
    """webdataset layout: members sharing a basename form one sample (``x.jpg`` + ``x.txt``). Image
    bytes are not read here: the sample records where they are, and the decode worker reads them."""
    pending: dict | None = None
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise ValueError(f"{path}: not an uncompressed tar file ({exc}); webdataset shards are plain .tar, "
                         "decompress .tar.gz shards first") from exc
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, dot, ext = member.name.partition(".")
            ext = "." + ext.lower() if dot else ""
            if pending is not None and pending["stem"] != stem:
                yield from _tar_sample(path, pending)
                pending = None
            if pending is None:
                pending = {"stem": stem, "image": None, "caption": None}
            if ext.endswith(IMAGE_SUFFIXES) and pending["image"] is None:
                pending["image"] = (ext, member.offset_data, member.size)
            elif ext.endswith(CAPTION_SUFFIXES) and pending["caption"] is None:
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                pending["caption"] = _caption(data, ".json" if ext.endswith(".json") else ".txt")
    if pending is not None:
        yield from _tar_sample(path, pending)


def _tar_sample(path: Path, pending: dict) -> Iterator[Sample]:
    if pending["image"] is not None:
        ext, offset, size = pending["image"]
        yield Sample(key=f"{path.name}/{pending['stem']}{ext}", path=str(path), offset=offset, size=size,
                     caption=pending["caption"])


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def iter_samples(inputs) -> Iterator[Sample]:
    """Samples of every input in order: folders, file lists (``.txt``/``.csv``/``.parquet``), single
    images, and tar shards (brace patterns such as ``data/{00000..00099}.tar`` allowed)."""
    for spec in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        text = os.fspath(spec)
        paths = _expand(text) if "{" in text else [text]
        for item in paths:
            path = Path(item).expanduser()
            lower = path.name.lower()
            if path.is_dir():
                yield from _folder(path)
            elif lower.endswith(".tar"):
                if not path.is_file():
                    raise FileNotFoundError(f"tar shard {path} not found")
                yield from _tar(path)
            elif lower.endswith((".txt", ".csv", ".parquet")):
                yield from _file_list(path)
            elif lower.endswith(IMAGE_SUFFIXES):
                yield Sample(key=path.name, path=str(path))
            else:
                raise FileNotFoundError(f"input {item!r} is neither a folder, an image, a file list (.txt, .csv, "
                                        ".parquet) nor a tar shard")


def describe(inputs) -> list[str]:
    """The inputs as given (for provenance in ``extraction.json``)."""
    return [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]

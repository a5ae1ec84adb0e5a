"""The extraction job: manifest, shard claims, decode workers, inference, atomic shard writes.

One call of :func:`run` is one process (one model load). Under ``torchrun`` or SLURM each process
reads its rank from the launcher's environment; all of them claim shards through lock files in the
output directory, so no collective and no scheduler is needed, faster processes take the remaining
shards and a rerun resumes where a crash stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import BackboneSDKError
from ..imageio import MAX_PIXELS, DecodeError, decode_image
from .sources import describe, iter_samples
from .store import Layout, atomic_write, claim, iter_shard_rows, release, write_json

__all__ = ["ExtractionError", "ExtractionSettings", "run", "prepare", "summarize", "launcher_rank"]

log = logging.getLogger(__name__)
STORES = {"fp16": np.float16, "fp32": np.float32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: settings that change what is computed: a resume with other values is refused
FINGERPRINT = ("backbone", "weights", "weights_sha256", "weights_format", "preprocessing", "dtype", "store",
               "normalize", "maps", "shard_size", "seed", "inputs")


class ExtractionError(BackboneSDKError, RuntimeError):
    """An extraction that cannot start or continue (mismatched resume, too many failures...)."""


@attrs.frozen(kw_only=True)
class ExtractionSettings:
    """Everything that shapes one extraction (the CLI's options)."""

    backbone: str = "resnet18"
    weights: str | None = None
    weights_format: str | None = None
    size: int | None = None
    store: str = attrs.field(default="fp16", validator=attrs.validators.in_(tuple(STORES)))
    normalize: bool = False
    maps: str = attrs.field(default="none", validator=attrs.validators.in_(("none", "pyramid", "features")))
    dtype: str = attrs.field(default="fp32", validator=attrs.validators.in_(tuple(DTYPES)))
    channels_last: bool = False
    #: ``Backbone.optimize()`` before extracting (BatchNorm folding, the family's memory format)
    optimize: bool = True
    #: with ``optimize`` on a CPU: :func:`backbone_sdk.tune_cpu_allocator` in the process that runs
    #: the model (process-wide and permanent: freed memory stays in it; set False inside a process
    #: that must hand memory back)
    tune_allocator: bool = True
    #: ``torch.compile`` the backbone too (opt-in: worth it for long runs at one input size)
    compile: bool = False
    batch_size: int = 32
    shard_size: int = 10_000
    workers: int | None = None
    device: str | None = None
    max_failure_rate: float = 0.5
    decode_timeout: float | None = 30.0
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    stale_after: float = 6 * 3600.0
    threads: int | None = None


def launcher_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun (``RANK``...) or SLURM (``SLURM_PROCID``...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


# -- provenance --------------------------------------------------------------------------------------
def _weights_sha256(spec, weights) -> str | None:
    if weights is None:
        return None
    from ..weights import resolve_checkpoint, resolve_source

    digest = hashlib.sha256()
    for path in resolve_checkpoint(resolve_source(spec, weights)):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _provenance(settings: ExtractionSettings, spec, inputs, embed_dim: int) -> dict[str, Any]:
    from .. import __version__

    size = settings.size or spec.input.image_size[0]
    return {
        "backbone": spec.name, "family": spec.family, "weights": settings.weights or "random",
        "weights_sha256": _weights_sha256(spec, settings.weights), "weights_format": settings.weights_format,
        "preprocessing": {"size": [size, size], "mode": "crop", "crop_pct": spec.input.crop_pct,
                          "mean": list(spec.input.mean), "std": list(spec.input.std),
                          "interpolation": "bicubic (antialias)", "image_conversion": "backbone_sdk.imageio"},
        "dtype": settings.dtype, "store": settings.store, "normalize": settings.normalize, "maps": settings.maps,
        "shard_size": settings.shard_size, "seed": settings.seed if settings.weights is None else None,
        "inputs": describe(inputs), "embed_dim": embed_dim, "sdk_version": __version__,
    }


def _prepare_output(layout: Layout, info: dict, overwrite: bool) -> None:
    """Refuse to mix runs: an existing directory must hold the same extraction (or ``overwrite``)."""
    if layout.config.is_file():
        old = json.loads(layout.config.read_text())
        diff = [k for k in FINGERPRINT if old.get(k) != info.get(k)]
        if not diff:
            return
        if not overwrite:
            raise ExtractionError(
                f"{layout.root} holds another extraction ({', '.join(f'{k}: {old.get(k)!r} -> {info.get(k)!r}' for k in diff)}"
                "); refusing to resume or overwrite it. Pass --overwrite to replace it, or choose another --output.")
    elif layout.root.exists() and any(layout.root.iterdir()) and not overwrite:
        raise ExtractionError(f"{layout.root} exists and is not an extraction directory; choose another --output "
                              "or pass --overwrite to replace its contents.")
    if overwrite and layout.root.exists():
        shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.config, info)


def _write_manifest(layout: Layout, inputs, shard_size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index", pa.int64()), ("key", pa.string()), ("path", pa.string()), ("offset", pa.int64()),
                        ("size", pa.int64()), ("caption", pa.string()), ("shard", pa.int32())])
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with pq.ParquetWriter(tmp, schema) as writer:
            rows: dict[str, list] = {name: [] for name in schema.names}

            def flush():
                if rows["index"]:
                    writer.write_table(pa.table(rows, schema=schema), row_group_size=shard_size)
                    for values in rows.values():
                        values.clear()

            for sample in iter_samples(inputs):
                for name, value in (("index", count), ("key", sample.key), ("path", sample.path),
                                    ("offset", sample.offset), ("size", sample.size), ("caption", sample.caption),
                                    ("shard", count // shard_size)):
                    rows[name].append(value)
                count += 1
                if count % shard_size == 0:
                    flush()
            flush()

    atomic_write(layout.manifest, write)
    if count == 0:
        layout.manifest.unlink()
        raise ExtractionError(f"no images found in {describe(inputs)} (extensions: png, jpg, jpeg, bmp, webp, tif, gif)")
    return count


# -- decoding ----------------------------------------------------------------------------------------
class _ShardImages(torch.utils.data.Dataset):
    """Manifest rows of one shard -> ``(row, pixels or None, status, error, width, height)``."""

    def __init__(self, rows: list[dict], spec, size: int, timeout: float | None, max_pixels: int):
        self.rows, self.spec, self.size, self.timeout, self.max_pixels = rows, spec, size, timeout, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def _target(self, width: int, height: int) -> tuple[int, int]:
        scale = max(self.size / height, self.size / width) / self.spec.input.crop_pct
        return math.ceil(width * scale), math.ceil(height * scale)

    def __getitem__(self, i: int):
        from ..preprocess import preprocess
        from .sources import Sample

        row = self.rows[i]
        sample = Sample(key=row["key"], path=row["path"], offset=row["offset"], size=row["size"])
        try:
            try:
                data = sample.read()
            except OSError as exc:
                raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}") from exc
            image = decode_image(data, max_pixels=self.max_pixels, target=self._target, timeout=self.timeout)
            pixels = preprocess(image.array, self.spec, size=self.size)[0]
        except DecodeError as exc:
            return i, None, exc.kind, str(exc), None, None
        except Exception as exc:  # anything else about one image is that image's failure, not the run's
            return i, None, "unreadable", f"{type(exc).__name__}: {exc}", None, None
        return i, pixels, "ok", None, image.width, image.height


def _collate(items):
    ok = [it for it in items if it[1] is not None]
    pixels = torch.stack([it[1] for it in ok]) if ok else None
    return items, pixels


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


# -- the job -----------------------------------------------------------------------------------------
class _Job:
    def __init__(self, settings: ExtractionSettings, layout: Layout, info: dict, model, device: torch.device):
        self.settings, self.layout, self.info, self.model, self.device = settings, layout, info, model, device
        self.size = info["preprocessing"]["size"][0]
        self.seen = self.failed = 0
        self.timing = {"read_decode": 0.0, "inference": 0.0, "write": 0.0}

    def loader(self, rows):
        s = self.settings
        workers = s.workers if s.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
        data = _ShardImages(rows, self.model.spec, self.size, s.decode_timeout, s.max_pixels)
        return torch.utils.data.DataLoader(
            data, batch_size=s.batch_size, num_workers=workers, collate_fn=_collate, worker_init_fn=_one_thread,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
            persistent_workers=False)

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor):
        s = self.settings
        x = pixels.to(self.device, dtype=DTYPES[s.dtype], non_blocking=True)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.model.embed(x).float()
        if s.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        maps = None
        if s.maps != "none":
            out = self.model.pyramid(x) if s.maps == "pyramid" else self.model.features(x)
            maps = {k: v.to(torch.float16 if s.store == "fp16" else torch.float32).cpu() for k, v in out.items()}
        return emb.cpu().numpy().astype(STORES[s.store]), maps

    def shard(self, shard: int, bar) -> dict:
        rows = iter_shard_rows(self.layout, shard)
        embs, meta = [], []
        maps: dict[str, list[torch.Tensor]] = {}
        start = clock = time.perf_counter()
        for items, pixels in self.loader(rows):
            now = time.perf_counter()
            self.timing["read_decode"] += now - clock
            if pixels is not None:
                emb, batch_maps = self.infer(pixels)
                embs.append(emb)
                for k, v in (batch_maps or {}).items():
                    maps.setdefault(k, []).append(v)
            clock = time.perf_counter()
            self.timing["inference"] += clock - now
            for i, px, status, error, width, height in items:
                meta.append((rows[i], status, error, width, height))
            self._count(items, bar)
        clock = time.perf_counter()
        stats = self._write(shard, meta, embs, maps)
        self.timing["write"] += time.perf_counter() - clock
        stats["seconds"] = time.perf_counter() - start
        write_json(self.layout.stats(shard), stats)  # last: the shard's only "done" marker
        return stats

    def _count(self, items, bar) -> None:
        failures = sum(1 for it in items if it[1] is None)
        self.seen += len(items)
        self.failed += failures
        if bar is not None:
            bar.update(len(items))
            bar.set_postfix(failed=self.failed, refresh=False)
        rate = self.settings.max_failure_rate
        if self.seen >= 50 and self.failed > rate * self.seen:
            raise ExtractionError(
                f"{self.failed} of {self.seen} images failed ({self.failed / self.seen:.0%} > --max-failure-rate "
                f"{rate:g}): the inputs look wrong (see the 'error' column of {self.layout.root / 'meta'}). "
                "Fix the inputs or raise --max-failure-rate.")

    def _write(self, shard: int, meta, embs, maps) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = self.info["embed_dim"]
        emb = np.concatenate(embs) if embs else np.zeros((0, dim), STORES[self.settings.store])
        atomic_write(self.layout.emb(shard), lambda p: _save_npy(p, emb))
        ok_rows = iter(range(emb.shape[0]))
        table = {
            "index": [r["index"] for r, *_ in meta], "key": [r["key"] for r, *_ in meta],
            "path": [r["path"] for r, *_ in meta], "status": [m[1] for m in meta], "error": [m[2] for m in meta],
            "width": [m[3] for m in meta], "height": [m[4] for m in meta], "caption": [r["caption"] for r, *_ in meta],
            "emb_row": [next(ok_rows) if m[1] == "ok" else None for m in meta],
        }
        schema = pa.schema([("index", pa.int64()), ("key", pa.string()), ("path", pa.string()), ("status", pa.string()),
                            ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                            ("caption", pa.string()), ("emb_row", pa.int64())])
        atomic_write(self.layout.meta(shard), lambda p: pq.write_table(pa.table(table, schema=schema), p))
        if maps:
            from safetensors.torch import save_file

            tensors = {k: torch.cat(v).contiguous() for k, v in maps.items()}
            atomic_write(self.layout.maps(shard), lambda p: save_file(tensors, str(p)))
        statuses = table["status"]
        return {"shard": shard, "images": len(meta), "ok": int(emb.shape[0]),
                "failed": {k: statuses.count(k) for k in sorted(set(statuses)) if k != "ok"}}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a temporary name
        np.save(fh, array)


def _load_model(settings: ExtractionSettings, local_rank: int):
    from ..allocator import tune_cpu_allocator
    from ..factory import create_backbone

    if settings.device:
        device = torch.device(settings.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    torch.manual_seed(settings.seed)  # random weights are reproducible: a resumed run computes the same
    model = create_backbone(settings.backbone, weights=settings.weights, weights_format=settings.weights_format)
    model = model.to(device=device, dtype=DTYPES[settings.dtype]).eval()
    if settings.tune_allocator and settings.optimize and device.type == "cpu":
        log.info("CPU allocator: %s", tune_cpu_allocator())  # process-wide: see ExtractionSettings.tune_allocator
    if settings.optimize or settings.compile:
        report = model.optimize(compile=settings.compile, channels_last=True if settings.channels_last else None)
        log.info("%s: %s", settings.backbone, "; ".join(report.changes) or "nothing to optimize")
    elif settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, device


def _shard_order(num_shards: int, rank: int, world: int) -> list[int]:
    """This rank's own share first (``rank, rank + world, ...``), then everyone else's (work stealing)."""
    own = list(range(rank, num_shards, world))
    return own + [s for s in range(num_shards) if s % world != rank]


def summarize(layout: Layout, num_shards: int, timing: dict | None = None) -> dict:
    done = [json.loads(layout.stats(s).read_text()) for s in range(num_shards) if layout.done(s)]
    failed: dict[str, int] = {}
    for stats in done:
        for kind, n in stats["failed"].items():
            failed[kind] = failed.get(kind, 0) + n
    images = sum(s["images"] for s in done)
    seconds = sum(s["seconds"] for s in done)
    summary = {"shards": num_shards, "shards_done": len(done), "images": images,
               "ok": sum(s["ok"] for s in done), "failed": failed, "shard_seconds": round(seconds, 3),
               "images_per_second": round(images / seconds, 2) if seconds else None}
    if timing:
        summary["this_process_seconds"] = {k: round(v, 3) for k, v in timing.items()}
    write_json(layout.root / "summary.json", summary)
    return summary


def prepare(inputs, output, settings: ExtractionSettings, *, overwrite: bool = False, rank: int = 0):
    """Rank 0 checks or creates the output directory and writes the manifest; others wait for it."""
    from ..registry import get_spec

    layout = Layout(output)
    spec = get_spec(settings.backbone)
    info = _provenance(settings, spec, inputs, spec.embed_dim)
    if rank == 0:
        _prepare_output(layout, info, overwrite)
        layout.make_dirs()
        if not layout.manifest.is_file():
            _write_manifest(layout, inputs, settings.shard_size)
    else:
        _wait_for_config(layout, info)
    return layout, info


def _wait_for_config(layout: Layout, info: dict, timeout: float = 3600.0) -> None:
    """Ranks other than 0: wait until rank 0 has written this run's config and manifest."""
    start = time.time()
    while True:
        try:
            current = json.loads(layout.config.read_text())
        except (OSError, ValueError):
            current = None
        if current is not None and all(current.get(k) == info.get(k) for k in FINGERPRINT) \
                and layout.manifest.is_file():
            return
        if time.time() - start > timeout:
            raise ExtractionError(f"waited {timeout:.0f} s for rank 0 to prepare {layout.root} for this extraction "
                                  "(its extraction.json differs, or rank 0 did not start); check the ranks' settings")
        time.sleep(0.2)


def run(inputs, output: str | os.PathLike, settings: ExtractionSettings = ExtractionSettings(), *,
        overwrite: bool = False, progress: bool = False, rank: int | None = None, world: int | None = None) -> dict:
    """Extract embeddings of ``inputs`` into the sharded directory ``output``; returns the summary.

    Safe to re-run: done shards are skipped, partial ones redone. ``rank``/``world`` default to the
    launcher's environment (torchrun, SLURM). On a CPU, with ``settings.optimize``, the calling
    process's allocator is tuned (:func:`backbone_sdk.tune_cpu_allocator`, process-wide) unless
    ``settings.tune_allocator`` is False.
    """
    env_rank, env_world, local_rank = launcher_rank()
    rank, world = (env_rank if rank is None else rank), (env_world if world is None else world)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    layout, info = prepare(inputs, output, settings, overwrite=overwrite, rank=rank)
    import pyarrow.parquet as pq

    manifest = pq.ParquetFile(layout.manifest)
    num_shards, total = manifest.num_row_groups, manifest.metadata.num_rows
    model, device = _load_model(settings, local_rank)
    job = _Job(settings, layout, info, model, device)
    bar = None
    if progress:
        from tqdm import tqdm

        already = sum(manifest.metadata.row_group(s).num_rows for s in range(num_shards) if layout.done(s))
        bar = tqdm(total=total, initial=already, unit="img", desc=f"extract[{rank}]" if world > 1 else "extract")
    try:
        for shard in _shard_order(num_shards, rank, world):
            if layout.done(shard) or not claim(layout, shard, settings.stale_after):
                continue
            try:
                if not layout.done(shard):
                    job.shard(shard, bar)
            finally:
                release(layout, shard)
    finally:
        if bar is not None:
            bar.close()
    return summarize(layout, num_shards, job.timing)

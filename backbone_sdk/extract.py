"""Batch extraction of embeddings (and optionally maps) for a list of image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import allocator
from .factory import create_backbone
from .preprocess import load_image, preprocess

__all__ = ["run_extraction", "read_extraction"]


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_extraction(paths: Sequence[Path], name: str, weights=None, output: Path = Path("embeddings.safetensors"), *,
                   batch_size: int = 8, size: int | None = None, maps: str = "none", device: str = "cpu",
                   progress: bool = False, tune_allocator: bool = True) -> dict:
    """Embed ``paths`` with backbone ``name`` and write ``embeddings`` [N, D] (+ maps) to ``output``.

    The safetensors metadata holds the image paths (``paths``, JSON) and the backbone name. On a CPU
    it calls :func:`backbone_sdk.tune_cpu_allocator` (process-wide: freed memory stays in the
    process) unless ``tune_allocator=False``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    model = create_backbone(name, weights=weights).to(device).eval()
    model.optimize()  # BatchNorm folding and the family's memory format; exact to float rounding
    if tune_allocator and torch.device(device).type == "cpu":
        allocator.tune_cpu_allocator()  # the loop reruns the same shapes: reuse freed pages instead of faulting new ones
    tensors: dict[str, list[torch.Tensor]] = {"embeddings": []}
    bar = tqdm(total=len(paths), unit="img", disable=not progress)
    with torch.inference_mode():
        for chunk in _batches(list(paths), batch_size):
            batch = preprocess([load_image(p) for p in chunk], model.spec, size=size).to(device)
            tensors["embeddings"].append(model.embed(batch).float().cpu())
            if maps != "none":
                out = model.pyramid(batch) if maps == "pyramid" else model.features(batch)
                for key, value in out.items():
                    tensors.setdefault(f"{maps}.{key}", []).append(value.float().cpu())
            bar.update(len(chunk))
    bar.close()
    stacked = {k: torch.cat(v).contiguous() for k, v in tensors.items()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": name, "weights": str(weights) if weights is not None else "random",
            "paths": json.dumps([str(p) for p in paths])}
    save_file(stacked, str(output), metadata=meta)
    return {"count": len(paths), "dim": stacked["embeddings"].shape[1], "output": str(output)}


def read_extraction(path):
    """Read an extraction back. A directory (the default ``extract`` output) gives an
    :class:`~backbone_sdk.extraction.Extraction` (memory-mapped embeddings per shard, metadata
    table); a ``--format safetensors`` file gives ``(tensors, image_paths, metadata)``."""
    if Path(path).is_dir():
        from .extraction import read_extraction as read_dir

        return read_dir(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, json.loads(meta["paths"]), meta

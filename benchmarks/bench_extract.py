"""Extraction throughput and memory, as ratios measured in one run on this machine.

1. end-to-end ``run()`` img/s vs the model alone (``embed`` on pre-decoded tensors) for a
   model-bound backbone (ViT-B/16) and the decode share for a decode-bound one (ResNet-18);
2. ``run()`` vs the earlier single-thread loop (``backbone_sdk.extract.run_extraction``), same weights;
3. peak RSS of the main process for N and 10 N images (memory must not grow with the data set).

    python benchmarks/bench_extract.py --images 160 --rss-images 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import backbone_sdk as bs
from backbone_sdk.extract import run_extraction
from backbone_sdk.extraction import ExtractionSettings, run


def corpus(root: Path, count: int, size=(375, 500)) -> list[Path]:
    """JPEGs of an ImageNet-like size (a few distinct ones, copied)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = []
    for i in range(8):
        path = root / f"base{i}.jpg"
        smooth = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize(size[::-1], Image.BICUBIC).save(path, quality=90)
        base.append(path.read_bytes())
    paths = []
    for i in range(count):
        path = root / f"{i // 1000:03d}" / f"{i:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base[i % len(base)])
        paths.append(path)
    return paths


def model_only(name: str, count: int, batch: int) -> float:
    """``embed`` throughput on pre-decoded, preprocessed tensors (the ceiling of any pipeline)."""
    torch.manual_seed(0)
    model = bs.create_backbone(name).eval()
    x = torch.randn(batch, 3, *model.spec.input.image_size)
    with torch.inference_mode():
        model.embed(x)
        start = time.perf_counter()
        for _ in range(max(1, count // batch)):
            model.embed(x)
    return max(1, count // batch) * batch / (time.perf_counter() - start)


def end_to_end(name: str, folder: Path, out: Path, batch: int, workers: int) -> tuple[float, dict]:
    settings = ExtractionSettings(backbone=name, batch_size=batch, workers=workers, shard_size=100_000)
    start = time.perf_counter()
    summary = run([folder], out, settings)
    return summary["images"] / (time.perf_counter() - start), summary["this_process_seconds"]


def old_loop(name: str, paths: list[Path], out: Path, batch: int) -> float:
    torch.manual_seed(0)
    start = time.perf_counter()
    run_extraction(paths, name, None, out, batch_size=batch)
    return len(paths) / (time.perf_counter() - start)


RSS_CODE = """
import json, resource, sys
from backbone_sdk.extraction import ExtractionSettings, run
run([sys.argv[1]], sys.argv[2], ExtractionSettings(backbone="resnet_test", size=32, batch_size=64, workers=1,
                                                   shard_size=2000))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def peak_rss_kb(folder: Path, out: Path) -> int:
    result = subprocess.run([sys.executable, "-c", RSS_CODE, str(folder), str(out)], check=True, capture_output=True,
                            text=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rss-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = corpus(tmp / "imgs", args.images)
        for name in ("vit_base_patch16_224", "resnet18"):
            ref = model_only(name, args.images, args.batch)
            e2e, split = end_to_end(name, tmp / "imgs", tmp / f"out-{name}", args.batch, args.workers)
            total = sum(split.values())
            results[name] = {"model_only_img_s": round(ref, 2), "end_to_end_img_s": round(e2e, 2),
                             "ratio": round(e2e / ref, 3),
                             "share": {k: round(v / total, 3) for k, v in split.items()}}
            print(name, results[name], flush=True)
        old = old_loop("resnet18", paths, tmp / "old.safetensors", args.batch)
        new = results["resnet18"]["end_to_end_img_s"]
        results["resnet18_vs_single_thread_loop"] = {"375x500": {"old_img_s": round(old, 2), "new_img_s": new,
                                                                 "ratio": round(new / old, 3)}}
        photos = corpus(tmp / "photos", args.images // 2, size=(1536, 2048))  # phone-camera JPEGs
        old = old_loop("resnet18", photos, tmp / "old-photos.safetensors", args.batch)
        new, split = end_to_end("resnet18", tmp / "photos", tmp / "out-photos", args.batch, args.workers)
        results["resnet18_vs_single_thread_loop"]["1536x2048"] = {
            "old_img_s": round(old, 2), "new_img_s": round(new, 2), "ratio": round(new / old, 3),
            "share": {k: round(v / sum(split.values()), 3) for k, v in split.items()}}
        print("resnet18 vs the single-thread loop", results["resnet18_vs_single_thread_loop"], flush=True)
        small = tmp / "rss-small"
        big = tmp / "rss-big"
        corpus(small, args.rss_images, size=(24, 32))
        corpus(big, args.rss_images * 10, size=(24, 32))
        rss_small, rss_big = peak_rss_kb(small, tmp / "o1"), peak_rss_kb(big, tmp / "o2")
        results["peak_rss_kb"] = {f"{args.rss_images}": rss_small, f"{args.rss_images * 10}": rss_big,
                                  "ratio": round(rss_big / rss_small, 3)}
        print("peak RSS", results["peak_rss_kb"], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

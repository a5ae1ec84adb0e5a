"""``embed()`` throughput on a CUDA GPU: backbone_sdk vs its timm / open_clip / torchvision peer.

    python benchmarks/gpu_embed.py                        # ViT-B/16 and ViT-L/14 (DINOv2), fp16 + bf16
    python benchmarks/gpu_embed.py --compile              # also torch.compile both (adds compile time)
    python benchmarks/gpu_embed.py --only resnet50,clip_vitb16 --batch 128

Each model is cast once to the precision (``Backbone.optimize(dtype=...)`` for ours, ``.to(dtype)``
for the peer), runs SDPA attention (transformers' ``sdpa`` for ours, timm's fused attention), and
is timed with CUDA events over interleaved rounds after a warm-up. The same random weights are not
shared with the peer (different code bases); the output check compares ours with the fp32 eager
run of itself (cosine >= 0.999). The whole run stops by itself within ``--budget`` seconds (default
240): models left when the budget is spent are skipped and named.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import backbone_sdk as bs

HERE = Path(__file__).resolve().parent
DEFAULT = ("vit_base_patch16_224", "dinov2_vitl14")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _peers():
    spec = importlib.util.spec_from_file_location("bench_embed", HERE / "bench_embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fns: dict, x: torch.Tensor, warmup: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function (CUDA events), round-robin with a rotating start."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + iters):
            for n in names[r % len(names):] + names[: r % len(names)]:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n](x)
                end.record()
                torch.cuda.synchronize()
                if r >= warmup:
                    out[n].append(start.elapsed_time(end))
    return out


def bench(name: str, dtype: torch.dtype, args, peers) -> dict:
    spec = bs.get_spec(name)
    family = spec.family
    torch.manual_seed(0)
    ours = bs.create_backbone(name, **peers.OURS_OPTIONS.get(family, {})).cuda().eval()
    x32 = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    with torch.inference_mode():
        reference = ours.embed(x32).float()
    report = ours.optimize(dtype=dtype, compile=args.compile, compile_options=peers.COMPILE_OPTIONS)
    peer_lib, peer = peers.PEER[family](spec)
    peer = peer.cuda().eval().to(dtype)
    if family in peers.CNN_FAMILIES:
        peer = peer.to(memory_format=torch.channels_last)
    x = x32.to(dtype)
    fns = {"ours": ours.embed, "peer": torch.compile(peer, options=peers.COMPILE_OPTIONS) if args.compile else peer}
    start = time.perf_counter()
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        torch.cuda.synchronize()
        cosine = torch.nn.functional.cosine_similarity(ours.embed(x).float(), reference).min().item()
    first_call = time.perf_counter() - start
    ms = timed(fns, x, args.warmup, args.iters)
    ips = {k: args.batch * 1000 / statistics.median(v) for k, v in ms.items()}
    ratios = [p / o for o, p in zip(ms["ours"], ms["peer"])]
    return {"name": name, "dtype": str(dtype).removeprefix("torch."), "peer_lib": peer_lib, "ips": ips,
            "ratio": statistics.median(ratios), "best": min(ms["peer"]) / min(ms["ours"]), "cosine": cosine,
            "first_call_s": first_call, "changes": report.changes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT), help="comma-separated registered names")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (optimize) and the peer")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_embed.py needs a CUDA device; run benchmarks/bench_embed.py on CPU.", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget
    torch.backends.cuda.matmul.allow_tf32 = True
    peers = _peers()
    rows, skipped = [], []
    for name in [n for n in args.only.split(",") if n]:
        for key in [d for d in args.dtypes.split(",") if d]:
            if time.perf_counter() > deadline:
                skipped.append(f"{name} {key}")
                continue
            rows.append(bench(name, DTYPES[key], args, peers))
            print(f"done {name} {key}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, {args.size}x{args.size}, "
          f"{'compiled' if args.compile else 'eager'}, torch {torch.__version__}")
    head = f"{'model':<24} {'dtype':>5} {'ours img/s':>11} {'peer':>20} {'ours/peer':>9} {'best':>6} {'cos':>7} {'1st s':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peer = f"{r['peer_lib']} {r['ips']['peer']:.0f}"
        print(f"{r['name']:<24} {r['dtype']:>5} {r['ips']['ours']:>11.0f} {peer:>20} {r['ratio']:>9.3f} "
              f"{r['best']:>6.3f} {r['cosine']:>7.4f} {r['first_call_s']:>6.1f}")
    if skipped:
        print(f"skipped (budget of {args.budget:.0f} s spent): {', '.join(skipped)}")
    bad = [r["name"] for r in rows if r["cosine"] < 0.999]
    if bad:
        print(f"FAIL: low-precision embeddings disagree with fp32 for {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

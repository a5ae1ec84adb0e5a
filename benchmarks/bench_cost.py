"""The cost model against measurements: estimated activation memory vs the peak the CPU allocator
saw (torch.profiler with profile_memory), and estimated FLOPs vs FlopCounterMode, in one run.

    python benchmarks/bench_cost.py [--sizes 224,448] [--batch 2] [--names resnet50,vit_base_patch16_224]

Random weights (no download). Memory: the estimate is the peak of live tensors the forward creates,
on the meta device; the measurement replays the allocator's allocations and frees of a real
forward (inputs and weights excluded from both). Target (issue #15): every ratio within 0.75-1.25.
FLOPs: FlopCounterMode runs with the math attention backend, whose matrix products it counts.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import backbone_sdk as bs
from backbone_sdk.cost import estimate

NAMES = ["resnet50", "vit_base_patch16_224", "swin_tiny_patch4_window7_224", "dinov2_vits14", "clip_vitb16",
         "siglip2_so400m14_224", "dinov3_vits16", "dinov3_convnext_tiny", "aimv2_large_patch14_224"]


def measured_peak(model, x: torch.Tensor, method: str) -> int:
    """Peak bytes held by tensors allocated during ``model.<method>(x)``, from the profiler's events."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        getattr(model, method)(x)
    steps = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    steps += [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
              if e.name != "[memory]" and e.self_cpu_memory_usage]
    current = peak = 0
    for _, delta in sorted(steps):
        current += delta
        peak = max(peak, current)
    return peak


def counted_flops(model, x: torch.Tensor, method: str) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        getattr(model, method)(x)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--sizes", default="224,448")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--method", default="features", choices=["features", "embed"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    rows = []
    for name in args.names.split(","):
        model = bs.create_backbone(name, parts=()).eval()
        div = model.spec.input.size_divisibility
        for side in (int(s) for s in args.sizes.split(",")):
            side = -(-side // div) * div
            x = torch.randn(args.batch, 3, side, side)
            cost = estimate(model, size=side, batch=args.batch, method=args.method)
            peak = measured_peak(model, x, args.method)
            flops = counted_flops(model, x, args.method)
            rows.append({"name": name, "size": side, "gflops": cost.gflops, "flops_ratio": cost.total_flops / flops,
                         "est_mib": cost.activation_mb, "measured_mib": peak / 2**20,
                         "memory_ratio": cost.activation_bytes / peak})
            r = rows[-1]
            if not args.json:
                print(f"{name:30s} {side:5d}  GFLOPs {r['gflops']:8.2f} (x{r['flops_ratio']:.3f} FlopCounterMode)  "
                      f"activations est {r['est_mib']:8.1f} MiB / measured {r['measured_mib']:8.1f} MiB "
                      f"= x{r['memory_ratio']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    worst = max(rows, key=lambda r: abs(r["memory_ratio"] - 1))
    print(f"memory ratio range {min(r['memory_ratio'] for r in rows):.2f}-{max(r['memory_ratio'] for r in rows):.2f} "
          f"(worst {worst['name']} at {worst['size']}); FLOPs ratio range "
          f"{min(r['flops_ratio'] for r in rows):.4f}-{max(r['flops_ratio'] for r in rows):.4f}")


if __name__ == "__main__":
    main()

"""Where the time of ``embed()`` goes: backbone_sdk vs its peer, op by op, from ``torch.profiler``.

    python benchmarks/profile_embed.py                                   # ViT-B/16 and ResNet-50
    python benchmarks/profile_embed.py --only swin_tiny_patch4_window7_224 --top 15
    python benchmarks/profile_embed.py --optimize                        # after Backbone.optimize()
    python benchmarks/profile_embed.py --tune-allocator                  # no page faults in the element-wise ops

Same models, weights and peers as ``bench_embed.py`` (fp32, ``torch.inference_mode``, random input).
Each model runs ``--warmup`` calls, then ``--iters`` profiled calls, interleaved with the peer's. The table groups the operators'
self CPU time into classes (GEMM, convolution, attention, normalization, element-wise, data movement,
other) and gives milliseconds per image for ours and the peer, side by side, plus the share of each
class. With the GEMM ceiling measured in the same run, the GEMM row also says how fast the models'
GEMMs run against it: the FLOPs of the ``addmm``/``mm``/``bmm``/``baddbmm`` calls (``linear`` runs as these) (``FlopCounterMode``)
over their self time. That bounds what any change that keeps the GEMMs can win: the non-GEMM classes.
An operator's self time includes the page faults of its fresh output (see ``--tune-allocator``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import backbone_sdk as bs  # noqa: E402
from bench_embed import CNN_FAMILIES, OURS_OPTIONS, PEER, gemm_ceiling  # noqa: E402

#: operator names (without ``aten::`` and leading/trailing underscores) of each class
CLASSES = (
    ("GEMM", {"addmm", "mm", "bmm", "baddbmm", "addmm_activation", "mkl_linear", "linear_pointwise"}),
    ("convolution", {"convolution", "mkldnn_convolution", "slow_conv2d_forward", "conv2d", "nnpack_spatial_convolution",
                     "convolution_pointwise"}),
    ("attention", {"scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
                   "scaled_dot_product_efficient_attention", "softmax", "safe_softmax"}),
    ("normalization", {"native_layer_norm", "layer_norm", "native_batch_norm", "batch_norm", "native_group_norm",
                       "group_norm", "rms_norm", "fused_rms_norm", "batch_norm_impl_index"}),
    ("element-wise", {"gelu", "relu", "relu_", "silu", "add", "add_", "mul", "mul_", "div", "div_", "sub", "tanh",
                      "sigmoid", "clamp", "clamp_min", "clamp_min_", "where", "erf", "pow", "sqrt", "rsqrt", "exp",
                      "neg", "mean", "sum", "max_pool2d_with_indices", "adaptive_avg_pool2d", "mkldnn_adaptive_avg_pool2d",
                      "avg_pool2d", "fill", "fill_", "zero", "zero_", "var_mean", "addcmul", "lerp", "norm",
                      "linalg_vector_norm"}),
    ("data movement", {"copy", "copy_", "clone", "contiguous", "cat", "roll", "index", "index_select", "gather",
                       "pad", "constant_pad_nd", "to_dense", "to_copy", "stack", "flip", "unfold", "repeat",
                       "upsample_bicubic2d", "upsample_bilinear2d", "grid_sampler_2d"}),
)


def classify(op: str) -> str:
    name = op.split("::")[-1].strip("_")
    for cls, names in CLASSES:
        if name in names or name.rstrip("_") in names:
            return cls
    return "other"


def profiled(fns: dict, x, warmup: int, iters: int) -> dict:
    """Per model: (self CPU microseconds per class, per operator), over ``iters`` calls of each,
    profiled one call at a time in interleaved rounds with a rotating start (as bench_embed times)."""
    names = list(fns)
    out = {n: (collections.Counter(), collections.Counter()) for n in names}
    with torch.inference_mode():
        for r in range(warmup + iters):
            for n in names[r % len(names):] + names[: r % len(names)]:
                if r < warmup:
                    fns[n](x)
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fns[n](x)
                for event in prof.key_averages():
                    out[n][1][event.key] += event.self_cpu_time_total
                    out[n][0][classify(event.key)] += event.self_cpu_time_total
    return out


def gemm_flops(fn, x) -> float:
    """FLOPs of the matrix multiplies (not attention's, not convolutions) in one call of ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn(x)
    counts = counter.get_flop_counts().get("Global", {})
    return float(sum(v for k, v in counts.items() if str(k) in ("aten.addmm", "aten.mm", "aten.bmm", "aten.baddbmm")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="vit_base_patch16_224,resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="also list the N slowest operators of each")
    parser.add_argument("--optimize", action="store_true", help="Backbone.optimize() ours; CNN peers channels_last")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tune-allocator", action="store_true",
                        help="backbone_sdk.tune_cpu_allocator() first (ours and the peer alike)")
    args = parser.parse_args(argv)
    if args.tune_allocator:
        print(f"CPU allocator: {bs.tune_cpu_allocator()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = gemm_ceiling(torch.float32)
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size}, fp32, "
          f"{'optimize()' if args.optimize else 'default'}; fp32 GEMM ceiling {ceiling:.1f} GFLOP/s (this run)")
    for name in [n for n in args.only.split(",") if n]:
        spec = bs.get_spec(name)
        family = spec.family
        torch.manual_seed(0)
        ours = bs.create_backbone(name, **OURS_OPTIONS.get(family, {})).eval()
        peer_lib, peer = PEER[family](spec)
        peer.eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        if args.optimize:
            ours.optimize(example=x)
            if family in CNN_FAMILIES:
                peer = peer.to(memory_format=torch.channels_last)
        runs = {"ours": ours.embed, peer_lib: peer}
        results = profiled(runs, x, args.warmup, args.iters)
        scale = 1e3 * args.iters * args.batch  # us -> ms per image
        print(f"\n{name} (ms per image; share of the total)")
        print(f"{'class':<15} " + " ".join(f"{k:>18}" for k in runs))
        classes = [c for c, _ in CLASSES] + ["other"]
        totals = {k: sum(r[0].values()) for k, r in results.items()}
        for c in classes:
            cells = [f"{results[k][0][c] / scale:>9.2f} ({100 * results[k][0][c] / totals[k]:>4.1f}%)" for k in runs]
            print(f"{c:<15} " + " ".join(f"{cell:>18}" for cell in cells))
        print(f"{'total':<15} " + " ".join(f"{totals[k] / scale:>18.2f}" for k in runs))
        for k, fn in runs.items():
            flops = gemm_flops(fn, x)
            gemm_us = results[k][0]["GEMM"]
            if flops and gemm_us:
                rate = flops * args.iters / (gemm_us / 1e6) / 1e9
                print(f"  {k}: GEMMs {flops / args.batch / 1e9:.2f} GFLOP/img at {rate:.1f} GFLOP/s = "
                      f"{100 * rate / ceiling:.0f}% of the ceiling; non-GEMM time "
                      f"{100 * (1 - gemm_us / totals[k]):.1f}% of the total")
        for k in runs:
            print(f"  slowest operators of {k}: " + "; ".join(
                f"{op} {us / scale:.2f}" for op, us in results[k][1].most_common(args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

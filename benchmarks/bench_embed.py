"""Throughput of ``embed()``: backbone_sdk vs the raw transformers model (same weights) vs a peer
implementation of the same architecture (torchvision / timm / open_clip, random weights).

    python benchmarks/bench_embed.py                       # one variant per registered family, 224x224
    python benchmarks/bench_embed.py --only resnet50,vit_base_patch16_224 --threads 2
    python benchmarks/bench_embed.py --optimize            # Backbone.optimize() vs peers with their best flags
    python benchmarks/bench_embed.py --optimize --compile  # ... and torch.compile (inductor freezing) on both
    python benchmarks/bench_embed.py --dtype bf16          # one-time bf16 cast of ours and of the peer
    python benchmarks/bench_embed.py --tune-allocator      # freed CPU memory stays in the process (both sides)
    python benchmarks/bench_embed.py --quick               # tiny *_test variants, 2 iterations (CI smoke)

``torch.inference_mode``, random input. The models are timed in interleaved rounds (A, B, C, then
B, C, A, ...) so that load from other processes hits them alike; the table gives the median
throughput, the median of the per-round throughput ratios with their min..max spread, and the ratio
of the best (fastest) rounds, which other processes can only slow down, never speed up.

Settings: the raw transformers model is always the eager fp32 reference (same weights; its output
checks ours: max |diff| <= 1e-4 in fp32, cosine >= 0.999 in bf16). ``--optimize`` calls
``Backbone.optimize()`` and gives the peer its own best flags (channels_last for CNNs; timm's fused
attention is on by default); ``--compile`` compiles ours (``optimize(compile=True)``) and the peer
(``torch.compile``, same inductor options), and then also times the eager peer. ``--dtype bf16``
casts both once. The header reports the machine's measured fp32 and bf16 GEMM ceilings (the
fastest of ViT-B/16's GEMM shapes at batch 8 and a 2048^3 one, measured before and after the
models) and which ISA oneDNN can use; the last
column is the fraction of that ceiling each model reaches (FLOPs per image from torch's
``FlopCounterMode``, 2 per multiply-add), and the MiB of fresh pages each model faulted in per
call (median; ``getrusage`` minor faults x page size), which ``--tune-allocator``
(``backbone_sdk.tune_cpu_allocator()``, process-wide, so for the peer too) takes to ~0. The run fails (exit 1) only if an output differs from the
reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import backbone_sdk as bs  # noqa: E402

# family: (full variant, tiny variant)
VARIANTS = {
    "resnet": ("resnet50", "resnet_test"),
    "vit": ("vit_base_patch16_224", "vit_test"),
    "swin": ("swin_tiny_patch4_window7_224", "swin_test"),
    "dinov2": ("dinov2_vits14", "dinov2_test"),
    "clip": ("clip_vitb16", "clip_test"),
    "siglip": ("siglip2_vitb16_224", "siglip_test"),
    "siglip2_naflex": ("siglip2_vitb16_naflex", "siglip2_naflex_test"),
    "aimv2": ("aimv2_large_patch14_224", "aimv2_test"),
    "dinov3": ("dinov3_vits16", "dinov3_test"),
    "dinov3_convnext": ("dinov3_convnext_tiny", "dinov3_convnext_test"),
}
TOLERANCE = 1e-4
#: options of ours that make the raw transformers forward a like-for-like reference
OURS_OPTIONS = {"dinov2": {"pos_embed_offset": 0}}  # transformers resamples to the exact grid


# -- the raw transformers forward, on a copy of our wrapped model (same weights) -------------------
def raw_resnet(model):
    hf = copy.deepcopy(model.model)
    hf.pooler = nn.AdaptiveAvgPool2d((1, 1))  # our backbone drops it: embed() pools itself
    return lambda x: hf(pixel_values=x).pooler_output.flatten(1)


def raw_vit(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]


def raw_swin(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf(pixel_values=x).last_hidden_state.mean(dim=1)


def raw_dinov2(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf(pixel_values=x).pooler_output


def raw_clip(model):
    hf = copy.deepcopy(model.model)

    def forward(x):
        out = hf.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return forward


def raw_siglip(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf.vision_model(pixel_values=x, interpolate_pos_encoding=True).pooler_output


def raw_siglip2_naflex(model):
    from backbone_sdk.plugins.siglip2 import patchify

    hf, p = copy.deepcopy(model.model), model.patch_size

    def forward(x):
        b, _, h, w = x.shape
        shapes = torch.tensor([[h // p, w // p]] * b)
        mask = torch.ones(b, (h // p) * (w // p), dtype=torch.long)
        return hf.vision_model(pixel_values=patchify(x, p), pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output

    return forward


def raw_aimv2(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf(pixel_values=x).last_hidden_state.mean(dim=1)


def raw_pooler(model):
    hf = copy.deepcopy(model.model)
    return lambda x: hf(pixel_values=x).pooler_output


# -- peers: same architecture in the reference library, random weights -----------------------------
def peer_resnet(spec):
    cfg = spec.config
    bottleneck = cfg.block == "bottleneck"
    planes = tuple(w // 4 for w in cfg.widths) if bottleneck else tuple(cfg.widths)
    if cfg.stem_width == 64 and planes == (64, 128, 256, 512):
        from torchvision.models import resnet as tv

        net = tv.ResNet(tv.Bottleneck if bottleneck else tv.BasicBlock, list(cfg.depths))
        net.fc = nn.Identity()
        return "torchvision", net
    from timm.models import resnet as tm  # torchvision fixes the stem and widths; timm does not

    block = tm.Bottleneck if bottleneck else tm.BasicBlock
    return "timm", tm.ResNet(block, cfg.depths, num_classes=0, stem_width=cfg.stem_width, channels=planes)


def peer_vit(spec):
    from timm.models.vision_transformer import VisionTransformer

    cfg = spec.config
    return "timm", VisionTransformer(img_size=spec.input.image_size, patch_size=spec.input.patch_size,
                                     embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, num_classes=0)


def peer_swin(spec):
    from timm.models.swin_transformer import SwinTransformer

    cfg = spec.config
    return "timm", SwinTransformer(img_size=spec.input.image_size, patch_size=spec.input.patch_size,
                                   embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.heads,
                                   window_size=cfg.window, num_classes=0)


def peer_dinov2(spec):
    from timm.models.vision_transformer import VisionTransformer

    cfg = spec.config  # like timm's vit_*_patch14_dinov2: table at the native size, resampled per input
    return "timm", VisionTransformer(img_size=cfg.pos_embed_size, patch_size=spec.input.patch_size,
                                     embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                                     init_values=1e-5, dynamic_img_size=True, num_classes=0)


def peer_clip(spec):
    from open_clip.transformer import QuickGELU, VisionTransformer

    cfg = spec.config
    return "open_clip", VisionTransformer(image_size=spec.input.image_size[0], patch_size=spec.input.patch_size,
                                          width=cfg.dim, layers=cfg.depth, heads=cfg.heads, mlp_ratio=4.0,
                                          output_dim=cfg.projection_dim, act_layer=QuickGELU)


def peer_siglip(spec):
    from timm.models.vision_transformer import VisionTransformer

    cfg = spec.config  # like timm's vit_*_siglip_*: no CLS, MAP head, tanh GELU
    return "timm", VisionTransformer(img_size=spec.input.image_size, patch_size=spec.input.patch_size,
                                     embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                                     mlp_ratio=cfg.mlp_dim / cfg.dim, class_token=False, global_pool="map",
                                     act_layer="gelu_tanh", dynamic_img_size=True, num_classes=0)


def peer_siglip2_naflex(spec):
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    cfg = spec.config  # like timm's naflexvit_*_siglip
    net_cfg = NaFlexVitCfg(patch_size=spec.input.patch_size, embed_dim=cfg.dim, depth=cfg.depth,
                           num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.dim, act_layer="gelu_tanh",
                           global_pool="map", pos_embed_interp_mode="bilinear",
                           pos_embed_grid_size=(cfg.pos_grid, cfg.pos_grid))
    return "timm", NaFlexVit(net_cfg, num_classes=0, img_size=spec.input.image_size)


def peer_aimv2(spec):
    import timm

    cfg = spec.config  # timm's aimv2_large_patch14_224 definition at this spec's width and depth
    return "timm", timm.create_model("aimv2_large_patch14_224", pretrained=False, embed_dim=cfg.dim, depth=cfg.depth,
                                     num_heads=cfg.heads, img_size=cfg.pos_embed_size, num_classes=0)


def peer_dinov3(spec):
    import timm

    cfg = spec.config  # timm's vit_small_patch16_dinov3(_qkvb) definition at this spec's width and depth
    if cfg.swiglu:
        raise ValueError("the benchmark's timm peer covers the GELU DINOv3 sizes (S, B, L)")
    arch = "vit_small_patch16_dinov3" + ("_qkvb" if cfg.qkv_bias else "")
    return "timm", timm.create_model(arch, pretrained=False, embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                                     img_size=spec.input.image_size, num_classes=0, global_pool="token")


def peer_dinov3_convnext(spec):
    from timm.models.convnext import ConvNeXt

    cfg = spec.config
    return "timm", ConvNeXt(depths=cfg.depths, dims=cfg.dims, num_classes=0)


RAW = {"resnet": raw_resnet, "vit": raw_vit, "swin": raw_swin, "dinov2": raw_dinov2, "clip": raw_clip,
       "siglip": raw_siglip, "siglip2_naflex": raw_siglip2_naflex, "aimv2": raw_aimv2,
       "dinov3": raw_pooler, "dinov3_convnext": raw_pooler}
PEER = {"resnet": peer_resnet, "vit": peer_vit, "swin": peer_swin, "dinov2": peer_dinov2, "clip": peer_clip,
        "siglip": peer_siglip, "siglip2_naflex": peer_siglip2_naflex, "aimv2": peer_aimv2,
        "dinov3": peer_dinov3, "dinov3_convnext": peer_dinov3_convnext}


# -- timing ----------------------------------------------------------------------------------------
CNN_FAMILIES = ("resnet", "dinov3_convnext")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_OPTIONS = {"freezing": True}


def interleaved(fns: dict, x: torch.Tensor, warmup: int, iters: int, faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of every function, timed round-robin with a rotating start; the page faults
    of each timed call go to ``faults`` (same keys) when given."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + iters):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                before = minor_faults()
                start = time.perf_counter()
                fns[n](x)
                if r >= warmup:
                    times[n].append(time.perf_counter() - start)
                    if faults is not None:
                        faults.setdefault(n, []).append(minor_faults() - before)
    return times


def minor_faults() -> int:
    """Page faults of this process so far (served without I/O: fresh or reclaimed pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ratio_stats(ours: list[float], other: list[float]) -> tuple[float, float, float, float]:
    """Throughput ratios ours/other (= other time / our time): per-round median, min, max; best rounds."""
    ratios = [o / t for t, o in zip(ours, other)]
    return statistics.median(ratios), min(ratios), max(ratios), min(other) / min(ours)


#: GEMM shapes (M, K, N) of the ceiling: ViT-B/16 at batch 8 (MLP up, MLP down, qkv) and a square one
CEILING_SHAPES = ((1576, 768, 3072), (1576, 3072, 768), (1576, 768, 2304), (2048, 2048, 2048))


def gemm_ceiling(dtype: torch.dtype, seconds: float = 1.0, shapes=CEILING_SHAPES) -> float:
    """Measured GFLOP/s of the fastest of ``shapes`` GEMMs ``[M x K] x [N x K]^T`` in ``dtype``, run as
    the models run them (``F.linear``, weight ``[N, K]``: without bf16 instructions a plain
    ``[M, K] @ [K, N]`` bf16 matmul takes a ~15x slower path): the best call of each after one
    warm-up call, calling for ``seconds`` per shape (at least once)."""
    best_rate = 0.0
    for m, k, n in shapes:
        x, weight = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.nn.functional.linear(x, weight)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while best == float("inf") or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            best = min(best, time.perf_counter() - start)
        best_rate = max(best_rate, 2 * m * k * n / best / 1e9)
    return best_rate


def isa() -> str:
    """What oneDNN can dispatch on this CPU for bf16 GEMMs."""
    cpu = torch.cpu
    if cpu._is_amx_tile_supported():
        return "AMX (bf16 tiles)"
    if cpu._is_avx512_bf16_supported():
        return "AVX-512 BF16"
    return f"{torch.backends.cpu.get_cpu_capability()}, no bf16 instructions (bf16 GEMMs are emulated)"


def flops_per_image(fn, x: torch.Tensor) -> float:
    """FLOPs of ``fn`` on one image, counted by torch's ``FlopCounterMode`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn(x[:1])
    return float(counter.get_total_flops())


def bench_one(name, family, args):
    spec = bs.get_spec(name)
    size = spec.input.image_size if args.quick else (args.size, args.size)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    ours = bs.create_backbone(name, **OURS_OPTIONS.get(family, {})).eval()
    raw = RAW[family](ours)
    peer_lib, peer = PEER[family](spec)
    peer.eval()
    x32 = torch.randn(args.batch, 3, *size)
    with torch.inference_mode():
        reference = raw(x32)
        flops = flops_per_image(ours.embed, x32)
    x = x32.to(dtype)
    fns = {}
    if args.optimize or args.compile or dtype != torch.float32:
        report = ours.optimize(dtype=dtype, compile=args.compile, fold_norms=args.optimize or args.compile,
                               channels_last=None if args.optimize or args.compile else False,
                               example=x, compile_options=COMPILE_OPTIONS)
        changes = report.changes
    else:
        changes = []
    peer = peer.to(dtype)
    if (args.optimize or args.compile) and family in CNN_FAMILIES:
        peer = peer.to(memory_format=torch.channels_last)
    fns["ours"] = ours.embed
    fns["raw"] = raw if dtype == torch.float32 else (lambda t: raw(t.float()))
    if args.compile:
        eager_peer = peer
        compiled = torch.compile(peer, options=COMPILE_OPTIONS)
        with torch.inference_mode():
            compiled(x)
        fns["peer"], fns["peer eager"] = compiled, eager_peer
    else:
        fns["peer"] = peer
    with torch.inference_mode():
        got = ours.embed(x).float()
    if dtype == torch.float32:
        diff = (got - reference).abs().max().item()
        ok = diff <= TOLERANCE
    else:
        diff = torch.nn.functional.cosine_similarity(got, reference).min().item()
        ok = diff >= 0.999
    faults: dict[str, list[int]] = {}
    times = interleaved(fns, x, args.warmup, args.iters, faults)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    page = resource.getpagesize()
    fault_mib = {k: statistics.median(v) * page / 2**20 for k, v in faults.items()}
    return {"name": name, "size": size, "diff": diff, "ok": ok, "peer_lib": peer_lib, "ips": ips, "faults": fault_mib,
            "changes": changes, "gflops": flops / 1e9,
            "vs": {k: ratio_stats(times["ours"], times[k]) for k in fns if k != "ours"}}


def print_table(rows, args, ceilings):
    mode = "optimize()+compile" if args.compile else "optimize()" if args.optimize else "default"
    print(f"batch {args.batch}, {args.dtype}, {mode}, inference_mode, {torch.get_num_threads()} threads, "
          f"{args.warmup} warmup + {args.iters} timed rounds, torch {torch.__version__}")
    print(f"CPU allocator: {args.allocator}")
    print(f"GEMM ceilings (measured in this run): fp32 {ceilings['fp32']:.1f} GFLOP/s, bf16 {ceilings['bf16']:.1f} "
          f"GFLOP/s; oneDNN ISA: {isa()}")
    others = ["raw", "peer"] + (["peer eager"] if args.compile else [])
    head = (f"{'model':<28} {'size':>7} {'ours img/s':>10} {'raw HF':>7} {'peer':>17} "
            + " ".join(f"{'ours/' + o + ' [min..max] best':>31}" for o in others)
            + f" {'GFLOP/img':>9} {'% ceil':>6} {'faulted MiB/call ours|peer':>26} {'check':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ips = r["ips"]
        peer = f"{r['peer_lib']} {ips['peer']:.2f}"
        ratios = ["{:>7.3f} [{:.3f}..{:.3f}] {:.3f}".format(*r["vs"][k]) for k in others]
        fraction = 100 * r["gflops"] * ips["ours"] / r["ceiling"]
        check = f"{r['diff']:.1e}" if args.dtype == "fp32" else f"cos {r['diff']:.4f}"
        faulted = f"{r['faults']['ours']:.0f} | {r['faults']['peer']:.0f}"
        print(f"{r['name']:<28} {r['size'][0]:>3}x{r['size'][1]:<3} {ips['ours']:>10.2f} {ips['raw']:>7.2f} "
              f"{peer:>17} " + " ".join(f"{q:>31}" for q in ratios)
              + f" {r['gflops']:>9.2f} {fraction:>5.1f}% {faulted:>26} {check:>9}")
    for r in rows:
        if r["changes"]:
            print(f"  {r['name']}: " + "; ".join(r["changes"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width (ignored with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", default="", help="comma-separated registered names (default: one per family)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="one-time cast of ours and the peer")
    parser.add_argument("--optimize", action="store_true", help="Backbone.optimize(); peers with their best flags")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours and the peer (implies --optimize)")
    parser.add_argument("--quick", action="store_true", help="tiny *_test variants, 2 rounds, 1 warmup")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="backbone_sdk.tune_cpu_allocator() first (process-wide: ours and the peer alike)")
    args = parser.parse_args(argv)
    from backbone_sdk import allocator

    args.allocator = (str(bs.tune_cpu_allocator()) if args.tune_allocator
                      else str(allocator._applied) if allocator._applied  # tuned earlier in this process
                      else "as the process found it (--tune-allocator: keep freed memory)")
    if args.quick:
        args.iters, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = set(bs.list_backbones(include_test=True))
    wanted = [n for n in args.only.split(",") if n]
    names = wanted or [tiny if args.quick else full for full, tiny in VARIANTS.values()]
    seconds, shapes = (0.2, CEILING_SHAPES[:1]) if args.quick else (1.0, CEILING_SHAPES)
    ceilings = {key: gemm_ceiling(dtype, seconds, shapes) for key, dtype in DTYPES.items()}
    rows = []
    for name in names:
        if name not in registered:
            print(f"skip {name}: not registered", file=sys.stderr)
            continue
        family = bs.get_spec(name).family
        if family not in RAW:
            print(f"skip {name}: no raw/peer models for family {family!r}", file=sys.stderr)
            continue
        rows.append(bench_one(name, family, args))
        print(f"done {name}", file=sys.stderr, flush=True)
    for key, dtype in DTYPES.items():  # again after the models: the best of both (clocks vary over a run)
        ceilings[key] = max(ceilings[key], gemm_ceiling(dtype, seconds, shapes))
    for row in rows:
        row["ceiling"] = ceilings[args.dtype]
    print_table(rows, args, ceilings)
    bad = [r["name"] for r in rows if not r["ok"]]
    if not (args.optimize or args.compile or args.dtype != "fp32"):
        slow = [r["name"] for r in rows if max(r["vs"]["raw"][0], r["vs"]["raw"][3]) < 0.98]
        verdict = "not judged with --quick" if args.quick else "met" if not slow else "missed by " + ", ".join(slow)
        print(f"overhead target (ours/raw >= 0.98, median or best rounds): {verdict}")
    if bad:
        print(f"FAIL: embed() differs from raw transformers for {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of ``embed()``: backbone_sdk vs the raw transformers model (same weights) vs a peer
implementation of the same architecture (torchvision / timm / open_clip, random weights).

    python benchmarks/bench_embed.py                       # one variant per registered family, 224x224
    python benchmarks/bench_embed.py --only resnet50,vit_base_patch16_224 --threads 2
    python benchmarks/bench_embed.py --quick               # tiny *_test variants, 2 iterations (CI smoke)

fp32, ``torch.inference_mode``, random input. The three models are timed in interleaved rounds
(A, B, C, then B, C, A, ...) so that load from other processes hits them alike; the table gives the
median throughput, the median of the per-round throughput ratios with their min..max spread, and the
ratio of the best (fastest) rounds, which other processes can only slow down, never speed up.
Target: backbone_sdk within 2% of raw transformers (``ours/raw`` >= 0.98). The run fails (exit 1)
only if an ``embed()`` output differs from the raw transformers output.
"""

from __future__ import annotations

import argparse
import copy
import os
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
def interleaved(fns: dict, x: torch.Tensor, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of every function, timed round-robin with a rotating start."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + iters):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                start = time.perf_counter()
                fns[n](x)
                if r >= warmup:
                    times[n].append(time.perf_counter() - start)
    return times


def ratio_stats(ours: list[float], other: list[float]) -> tuple[float, float, float, float]:
    """Throughput ratios ours/other (= other time / our time): per-round median, min, max; best rounds."""
    ratios = [o / t for t, o in zip(ours, other)]
    return statistics.median(ratios), min(ratios), max(ratios), min(other) / min(ours)


def bench_one(name, family, args):
    spec = bs.get_spec(name)
    size = spec.input.image_size if args.quick else (args.size, args.size)
    torch.manual_seed(0)
    ours = bs.create_backbone(name).eval()
    raw = RAW[family](ours)
    peer_lib, peer = PEER[family](spec)
    peer.eval()
    x = torch.randn(args.batch, 3, *size)
    with torch.inference_mode():
        diff = (ours.embed(x) - raw(x)).abs().max().item()
    times = interleaved({"ours": ours.embed, "raw": raw, "peer": peer}, x, args.warmup, args.iters)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    return {"name": name, "size": size, "diff": diff, "peer_lib": peer_lib, "ips": ips,
            "vs_raw": ratio_stats(times["ours"], times["raw"]), "vs_peer": ratio_stats(times["ours"], times["peer"])}


def print_table(rows, args):
    print(f"batch {args.batch}, fp32, inference_mode, {torch.get_num_threads()} threads, "
          f"{args.warmup} warmup + {args.iters} timed rounds, torch {torch.__version__}")
    head = (f"{'model':<28} {'size':>7} {'ours img/s':>10} {'raw HF':>7} {'peer':>17} "
            f"{'ours/raw [min..max] best':>29} {'ours/peer [min..max] best':>29} {'max|diff|':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ips = r["ips"]
        peer = f"{r['peer_lib']} {ips['peer']:.2f}"
        ratios = ["{:>7.3f} [{:.3f}..{:.3f}] {:.3f}".format(*r[k]) for k in ("vs_raw", "vs_peer")]
        print(f"{r['name']:<28} {r['size'][0]:>3}x{r['size'][1]:<3} {ips['ours']:>10.2f} {ips['raw']:>7.2f} "
              f"{peer:>17} {ratios[0]:>29} {ratios[1]:>29} {r['diff']:>9.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width (ignored with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", default="", help="comma-separated registered names (default: one per family)")
    parser.add_argument("--quick", action="store_true", help="tiny *_test variants, 2 rounds, 1 warmup")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = set(bs.list_backbones(include_test=True))
    wanted = [n for n in args.only.split(",") if n]
    names = wanted or [tiny if args.quick else full for full, tiny in VARIANTS.values()]
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
    print_table(rows, args)
    bad = [r["name"] for r in rows if not r["diff"] <= TOLERANCE]
    slow = [r["name"] for r in rows if max(r["vs_raw"][0], r["vs_raw"][3]) < 0.98]
    verdict = "not judged with --quick" if args.quick else "met" if not slow else "missed by " + ", ".join(slow)
    print(f"overhead target (ours/raw >= 0.98, median or best rounds): {verdict}")
    if bad:
        print(f"FAIL: embed() differs from raw transformers for {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

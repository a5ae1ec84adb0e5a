"""One Faster R-CNN R-50-FPN training iteration: backbone_sdk ResNet-50 vs detectron2's own ResNet-50.

    python benchmarks/bench_detectron2.py [--runs 7] [--size 320] [--threads N] [--tune-allocator]

Both detectors come from detectron2's COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml with the same
heads, the same batch (2 images, ``--size`` px square, 3 boxes each) and detectron2's SGD optimizer
(at a tiny learning rate: random weights under fixed normalization diverge at the real one):

- native: ``build_resnet_fpn_backbone`` (FrozenBN, FREEZE_AT=2), with ``RESNETS.STRIDE_IN_1X1=False``
  so that both ResNets are the same network (stride on the 3x3 convolution, as torchvision);
- sdk: ``build_backbone_sdk_fpn_backbone`` on ``resnet50`` with FREEZE_AT=2 (= ``stages:1``) and
  ``FROZEN_BN`` (BatchNorm statistics and affine parameters fixed, as detectron2's FrozenBN).

Both compute the same function: the SDK model's BatchNorm statistics are set from one batch (random
init with statistics 0/1 blows activations up, and the RPN then proposes a handful of degenerate
boxes, which makes the ROI heads' work depend on luck), and every weight is copied into the native
model (ResNet keys mapped, FPN and heads identical). The script checks that losses agree before timing.

An iteration is forward + backward + optimizer step in training mode. The two are interleaved
(alternating which goes first), after warm-up; reported: the median of ``--runs`` iterations each,
and the ratio sdk / native. Target: ratio <= 1.05. The backbone alone (bottom-up forward +
backward) is timed the same way to show where a difference comes from.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"


def build(kind: str):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    from backbone_sdk.integrations.detectron2 import configure_pixels, use_backbone

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(CONFIG))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    # random init with fixed (identity) normalization: a real learning rate diverges within a few
    # steps; the step costs the same at any rate
    cfg.SOLVER.BASE_LR = 1e-6
    if kind == "sdk":
        use_backbone(cfg, "resnet50", frozen_bn=True)  # FINETUNE empty: follows FREEZE_AT=2 -> stages:1
    else:
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        configure_pixels(cfg, "resnet50")  # same normalized input tensor for both
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model, build_optimizer(cfg, model)


def batch(size: int, n: int = 2):
    from detectron2.structures import Boxes, Instances

    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        instances = Instances((size, size))
        xy = torch.rand(3, 2, generator=gen) * size * 0.6
        wh = torch.rand(3, 2, generator=gen) * size * 0.3 + size * 0.05
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 80, (3,), generator=gen)
        items.append({"image": torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8),
                      "instances": instances, "height": size, "width": size})
    return items


_TO_NATIVE = [  # transformers ResNet (backbone_sdk resnet50) -> detectron2 ResNet key names
    (r"bottom_up\.body\.model\.embedder\.embedder\.convolution\.", "bottom_up.stem.conv1."),
    (r"bottom_up\.body\.model\.embedder\.embedder\.normalization\.", "bottom_up.stem.conv1.norm."),
    (r"bottom_up\.body\.model\.encoder\.stages\.(\d)\.layers\.(\d+)\.",
     lambda m: f"bottom_up.res{int(m.group(1)) + 2}.{m.group(2)}."),
    (r"\.shortcut\.convolution\.", ".shortcut."),
    (r"\.shortcut\.normalization\.", ".shortcut.norm."),
    (r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m.group(1)) + 1}."),
    (r"\.layer\.(\d)\.normalization\.", lambda m: f".conv{int(m.group(1)) + 1}.norm."),
]


def calibrate(sdk_model, data) -> None:
    """BatchNorm running statistics of the SDK ResNet from one batch (cumulative average)."""
    body = sdk_model.backbone.bottom_up.body
    norms = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        body(sdk_model.preprocess_image(data).tensor)
    for m in norms:
        m.momentum = 0.1
    sdk_model.train()  # re-applies frozen BatchNorms / frozen stages


def copy_weights(sdk_model, native_model) -> None:
    state = {}
    for key, value in sdk_model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _TO_NATIVE:
            key = re.sub(pattern, repl, key)
        state[key] = value
    native_model.load_state_dict(state, strict=True)


def losses(model, data) -> dict[str, float]:
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    with torch.no_grad(), EventStorage(0):
        return {k: v.item() for k, v in model(data).items()}


def train_step(model, optimizer, data) -> float:
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)  # same proposal / ROI sampling for both
    start = time.perf_counter()
    with EventStorage(0):
        loss = sum(model(data).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def backbone_step(model, images) -> float:
    start = time.perf_counter()
    maps = model.backbone.bottom_up(images)
    sum(m.float().mean() for m in maps.values()).backward()
    return time.perf_counter() - start


def interleaved(step, runs: int, warmup: int, sides: dict) -> dict[str, list[float]]:
    times = {k: [] for k in sides}
    order = list(sides)
    for i in range(warmup + runs):
        for kind in order if i % 2 == 0 else order[::-1]:
            elapsed = step(kind)
            if i >= warmup:
                times[kind].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tune-allocator", action="store_true",
                        help="backbone_sdk.tune_cpu_allocator() first (both detectors alike; fewer page faults, less noise)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_allocator:
        import backbone_sdk

        print(f"CPU allocator: {backbone_sdk.tune_cpu_allocator()}")

    models = {kind: build(kind) for kind in ("native", "sdk")}
    data = batch(args.size)
    calibrate(models["sdk"][0], data)
    copy_weights(models["sdk"][0], models["native"][0])
    check = {k: losses(m, data) for k, (m, _) in models.items()}
    gap = max(abs(check["sdk"][k] - check["native"][k]) for k in check["sdk"])
    pairs = (f"{k} {check['native'][k]:.4f} | {check['sdk'][k]:.4f}" for k in check["sdk"])
    print("losses (native | sdk):", ", ".join(pairs))
    if gap > 1e-3:
        raise SystemExit(f"the two detectors do not compute the same function (loss gap {gap:.2e})")
    full = interleaved(lambda k: train_step(*models[k], data), args.runs, args.warmup, models)
    images = {k: m.preprocess_image(data).tensor for k, (m, _) in models.items()}
    bottom = interleaved(lambda k: backbone_step(models[k][0], images[k]), args.runs, args.warmup, models)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 2 images {args.size}x{args.size}, "
          f"median of {args.runs} (after {args.warmup} warm-up), interleaved")
    for label, times in (("Faster R-CNN train iteration", full), ("bottom-up fwd+bwd", bottom)):
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label:30s} native {med['native'] * 1e3:8.1f} ms  sdk {med['sdk'] * 1e3:8.1f} ms  "
              f"ratio {med['sdk'] / med['native']:.3f}  (min {min(times['native']) * 1e3:.1f} / "
              f"{min(times['sdk']) * 1e3:.1f} ms)")
    ratio = statistics.median(full["sdk"]) / statistics.median(full["native"])
    print("PASS" if ratio <= 1.05 else "FAIL", f"(target: train-iteration ratio <= 1.05, got {ratio:.3f})")


if __name__ == "__main__":
    main()

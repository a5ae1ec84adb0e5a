"""Train an mmseg segmentor on a backbone_sdk backbone for a few iterations on synthetic data.

    python examples/mmseg/train.py                                   # tiny ResNet + UPerHead, 40 iterations
    python examples/mmseg/train.py --backbone vit_test --iters 20
    python examples/mmseg/train.py --config examples/mmseg/upernet_swin_sdk.py --backbone swin_test
    python examples/mmseg/train.py --work-dir /tmp/run --iters 20    # then, to continue to 40:
    python examples/mmseg/train.py --work-dir /tmp/run --iters 40 --resume

The synthetic dataset is written to ``<work-dir>/data`` as PNG files in the layout mmseg's
``BaseSegDataset`` reads (``img/*.png`` + ``ann/*.png``): coloured rectangles on a noisy background,
one class per colour, so the loss falls within a few dozen iterations even on a CPU.
With ``--config`` the model comes from that file; ``--backbone`` then swaps the backbone name (and
refits the data preprocessor and decode-head channels to it), which is how the real-size example
configs are smoke-tested with tiny backbones; without ``--backbone`` the real-size model is built and
its hub weights are fetched. Runs are seeded (``--seed``) and quiet: one line at the end (loss
first -> last, where the checkpoints went); ``--verbose`` shows mmengine's log (config dump, per-10-
iteration metrics) and third-party warnings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

#: class colours (RGB) of the synthetic dataset; class 0 is the background
COLOURS = ((0, 0, 0), (220, 40, 40), (40, 200, 60), (50, 80, 230))
CLASSES = ("background", "red", "green", "blue")


def write_synthetic_dataset(root: str | os.PathLike, count: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` images and label maps under ``root/img`` and ``root/ann``; return ``root``."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(90, 150, size=(size, size, 3)).astype(np.int16)
        label = np.zeros((size, size), dtype=np.uint8)
        for cls in rng.permutation(np.arange(1, len(CLASSES)))[: rng.integers(1, len(CLASSES))]:
            h, w = rng.integers(size // 4, size // 2, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            image[y:y + h, x:x + w] = np.array(COLOURS[cls]) + rng.integers(-20, 20, size=(h, w, 3))
            label[y:y + h, x:x + w] = cls
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "img" / f"{i:04d}.png")
        Image.fromarray(label).save(root / "ann" / f"{i:04d}.png")
    return root


def dataset_cfg(root: str | os.PathLike) -> dict:
    """A ``BaseSegDataset`` config for :func:`write_synthetic_dataset`'s layout."""
    palette = [list(c) for c in COLOURS]
    return dict(
        type="BaseSegDataset", data_root=str(root), data_prefix=dict(img_path="img", seg_map_path="ann"),
        img_suffix=".png", seg_map_suffix=".png", metainfo=dict(classes=CLASSES, palette=palette),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")],
    )


def tiny_model(backbone: str, head: str = "UPerHead", channels: int = 16, **backbone_args) -> dict:
    """An ``EncoderDecoder`` config for ``backbone`` with a small UPerHead or FPNHead."""
    from backbone_sdk.integrations.mmseg import backbone_channels, backbone_strides, data_preprocessor_for

    pyramid = backbone_args.get("pyramid", False)
    out_indices = backbone_args.get("out_indices")
    in_channels = backbone_channels(backbone, out_indices, pyramid)
    decode = dict(type=head, in_channels=in_channels, in_index=list(range(len(in_channels))), channels=channels,
                  num_classes=len(CLASSES), dropout_ratio=0.0, norm_cfg=dict(type="BN", requires_grad=True),
                  align_corners=False, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    if head == "UPerHead":
        decode["pool_scales"] = (1, 2)
    elif head == "FPNHead":
        decode["feature_strides"] = backbone_strides(backbone, out_indices, pyramid)
    return dict(
        type="EncoderDecoder", data_preprocessor=data_preprocessor_for(backbone),
        backbone=dict(type="BackboneSDK", name=backbone, **backbone_args),
        decode_head=decode, train_cfg=dict(), test_cfg=dict(mode="whole"),
    )


def runner_cfg(model: dict, data_root, work_dir, iters: int = 40, lr: float = 1e-3, batch_size: int = 4,
               checkpoint_interval: int | None = None, validate: bool = True) -> dict:
    """A complete mmengine Runner config: iteration-based training, checkpoints, optional validation."""
    loader = dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                  sampler=dict(type="InfiniteSampler", shuffle=True), dataset=dataset_cfg(data_root))
    cfg = dict(
        default_scope="mmseg",
        custom_imports=dict(imports=["backbone_sdk.integrations.mmseg"], allow_failed_imports=False),
        model=model, work_dir=str(work_dir), train_dataloader=loader,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, weight_decay=0.01)),
        param_scheduler=[], randomness=dict(seed=0), log_level="WARNING", log_processor=dict(by_epoch=False),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=10),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=checkpoint_interval or iters),
        ),
        custom_hooks=[dict(type="BackboneSDKHook")],
    )
    if validate:
        cfg.update(
            val_dataloader=dict(batch_size=1, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                                dataset=dataset_cfg(data_root)),
            val_cfg=dict(type="ValLoop"), val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        )
    return cfg


def config_with_backbone(path: str, backbone: str | None) -> dict:
    """The model of an example config, fitted to the synthetic dataset; ``backbone`` swaps the backbone.

    Swapping refits everything that depends on the backbone (data preprocessor, head channels,
    strides) with the helpers of ``backbone_sdk.integrations.mmseg`` and shrinks the heads.
    """
    from mmengine.config import Config

    from backbone_sdk.integrations.mmseg import backbone_channels, backbone_strides, data_preprocessor_for

    model = Config.fromfile(path).model.to_dict()
    decode, aux = model["decode_head"], model.get("auxiliary_head")
    name = backbone or model["backbone"]["name"]
    model["data_preprocessor"] = data_preprocessor_for(name)  # the synthetic images are small: no crop size
    if backbone:
        bb = model["backbone"]
        bb.update(name=backbone, weights=None, init_cfg=None)
        bb.pop("out_indices", None)
        channels = backbone_channels(backbone, None, bb.get("pyramid", False))
        decode.update(in_channels=channels, in_index=list(range(len(channels))), channels=16)
        if "feature_strides" in decode:
            decode["feature_strides"] = backbone_strides(backbone, None, bb.get("pyramid", False))
        if aux:
            aux.update(in_channels=channels[-2], in_index=len(channels) - 2, channels=16)
        model["test_cfg"] = dict(mode="whole")
    for head in (decode, aux):
        if head:
            head["num_classes"] = len(CLASSES)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="example config (upernet_swin_sdk.py, fpn_dinov2_sdk.py) for the model")
    parser.add_argument("--backbone", default=None, help="backbone name (default: resnet_test without --config)")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --work-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="mmengine's log and third-party warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        warnings.filterwarnings("ignore")

    from mmengine.config import Config
    from mmengine.runner import Runner

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="mmseg_sdk_"))
    data_root = work_dir / "data"
    if not (data_root / "img").is_dir():
        write_synthetic_dataset(data_root)
    if args.config:
        model = config_with_backbone(args.config, args.backbone)
    else:
        model = tiny_model(args.backbone or "resnet_test")
    cfg = Config(runner_cfg(model, data_root, work_dir, iters=args.iters, checkpoint_interval=max(args.iters // 2, 1)))
    cfg.log_level = "INFO" if args.verbose else "ERROR"  # mmengine warns about its own deprecations
    cfg.randomness = dict(seed=args.seed)
    cfg.resume = args.resume
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    print(f"iterations {runner.iter}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpoints in {work_dir}")
    return runner


if __name__ == "__main__":
    main()

"""Train a detectron2 detector on a backbone_sdk backbone for a few iterations on synthetic data.

    python examples/detectron2/train.py --iters 5                        # faster_rcnn_sdk.yaml (ResNet-50)
    python examples/detectron2/train.py --backbone swin_test --tiny --iters 20
    python examples/detectron2/train.py --backbone vit_test --tiny --mask --iters 20
    python examples/detectron2/train.py --lazy --backbone dinov2_test --tiny --iters 5   # mask_rcnn_sdk_lazy.py

yacs: detectron2 resolves ``_BASE_`` relative to the yaml file, so a yaml outside the installed
package cannot name a model-zoo base. faster_rcnn_sdk.yaml therefore holds only the overrides; this
script (see :func:`yacs_cfg`) merges the model-zoo base with ``model_zoo.get_config_file`` first,
then the yaml on top. ``--backbone`` swaps the backbone name (and its pixel statistics).

The synthetic dataset (coloured rectangles on dark noise, one class per colour, boxes and polygon
masks) is written as PNG files under ``<output-dir>/data`` and registered in detectron2's
``DatasetCatalog``/``MetadataCatalog``, then read by detectron2's own ``DatasetMapper`` (in RGB).
Training runs through detectron2's ``DefaultTrainer`` (yacs) or ``SimpleTrainer`` (LazyConfig).
``--tiny`` shrinks the heads and the proposal counts for CPU smoke runs. Runs are seeded (``--seed``)
and quiet: one line at the end (loss first -> last, where the output went); ``--verbose`` shows
detectron2's own log (model repr, per-iteration metrics) and third-party warnings.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
YAML = HERE / "faster_rcnn_sdk.yaml"
LAZY = HERE / "mask_rcnn_sdk_lazy.py"
FASTER_BASE = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
MASK_BASE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
#: class colours (RGB) of the synthetic dataset
COLOURS = ((230, 50, 50), (50, 210, 70))
CLASSES = ("red", "green")


def write_synthetic_dataset(root: str | os.PathLike, count: int = 8, size: tuple[int, int] = (64, 96),
                            seed: int = 0) -> list[dict]:
    """Write ``count`` PNG images under ``root``; return detectron2 dataset dicts (boxes + polygons)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    h, w = size
    records = []
    for i in range(count):
        image = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        annotations = []
        for half in range(int(rng.integers(1, 3))):  # at most one object per half: no occlusion
            cls = int(rng.integers(len(CLASSES)))
            bw, bh = int(rng.integers(w // 6, w // 2 - 2)), int(rng.integers(h // 4, h - 8))
            x0 = int(rng.integers(0, w // 2 - bw)) + half * (w // 2)
            y0 = int(rng.integers(0, h - bh))
            image[y0:y0 + bh, x0:x0 + bw] = COLOURS[cls]
            x1, y1 = x0 + bw, y0 + bh
            annotations.append(dict(bbox=[x0, y0, bw, bh], bbox_mode=BoxMode.XYWH_ABS, category_id=cls, iscrowd=0,
                                    segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]]))
        path = root / f"{i:04d}.png"
        Image.fromarray(image).save(path)
        records.append(dict(file_name=str(path), image_id=i, height=h, width=w, annotations=annotations))
    return records


def register_synthetic(name: str, root: str | os.PathLike, count: int = 8, size=(64, 96), seed: int = 0) -> str:
    """Write the dataset and (re-)register it as ``name`` in ``DatasetCatalog`` and ``MetadataCatalog``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    records = write_synthetic_dataset(root, count, size, seed)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))
    return name


def shrink(cfg, size: int = 96) -> None:
    """Small images, heads and proposal counts for CPU smoke runs (a yacs CfgNode)."""
    m = cfg.MODEL
    m.FPN.OUT_CHANNELS = 32
    m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    m.RPN.BATCH_SIZE_PER_IMAGE, m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 64, 256, 64
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 256, 64
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    m.ROI_BOX_HEAD.FC_DIM = 64
    m.ROI_MASK_HEAD.CONV_DIM, m.ROI_MASK_HEAD.NUM_CONV = 16, 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size * 2 // 3,), size
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size * 2 // 3, size


def yacs_cfg(backbone: str | None = None, config_file: str | os.PathLike | None = YAML, mask: bool = False,
             dataset: str = "sdk_synthetic_train", iters: int = 20, output_dir: str | os.PathLike = "output",
             tiny: bool = False, size: int = 96, **options):
    """Model-zoo base + ``config_file`` overrides + ``backbone``/``options`` + synthetic-data training settings."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from backbone_sdk.integrations.detectron2 import add_backbone_sdk_config, use_backbone

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(MASK_BASE if mask else FASTER_BASE))
    add_backbone_sdk_config(cfg)
    if config_file:
        cfg.merge_from_file(str(config_file))
    use_backbone(cfg, backbone or cfg.MODEL.BACKBONE_SDK.NAME, fpn=True, **options)
    cfg.MODEL.MASK_ON = mask
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size * 2 // 3,), size
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size * 2 // 3, size
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.01, iters
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = (), min(10, iters), 10**9
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(output_dir)
    if tiny:
        shrink(cfg, size)
    return cfg


def make_trainer(cfg):
    """detectron2's ``DefaultTrainer`` writing console + JSON metrics (no tensorboard dependency)."""
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class Trainer(DefaultTrainer):
        def build_writers(self):
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return Trainer(cfg)


def lazy_cfg(backbone: str | None = None, dataset: str = "sdk_synthetic_train", tiny: bool = False, size: int = 96):
    """mask_rcnn_sdk_lazy.py fitted to the synthetic dataset; ``backbone`` swaps the backbone."""
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig
    from detectron2.data import transforms as T

    from backbone_sdk.integrations.detectron2 import configure_pixels

    cfg = LazyConfig.load(str(LAZY))
    if backbone:
        bottom_up = cfg.model.backbone.bottom_up
        bottom_up.name = backbone
        configure_pixels(cfg, backbone)
    cfg.model.roi_heads.num_classes = len(CLASSES)
    train = cfg.dataloader.train
    train.dataset.names = dataset
    train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=size * 2 // 3, max_size=size)]
    train.total_batch_size, train.num_workers = 2, 0
    if tiny:
        heads = cfg.model.roi_heads
        cfg.model.backbone.out_channels = 32
        cfg.model.proposal_generator.head.in_channels = 32
        cfg.model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
        cfg.model.proposal_generator.batch_size_per_image = 64
        cfg.model.proposal_generator.pre_nms_topk, cfg.model.proposal_generator.post_nms_topk = (256, 256), (64, 64)
        heads.batch_size_per_image = 32
        heads.box_head.input_shape.channels, heads.box_head.fc_dims = 32, [64, 64]
        heads.box_predictor.input_shape.channels = 64
        heads.mask_head.input_shape.channels, heads.mask_head.conv_dims = 32, [16, 16]
    return cfg


def train_lazy(cfg, iters: int):
    """Instantiate model, optimizer and data loader from a LazyConfig; train with ``SimpleTrainer``."""
    from detectron2.config import instantiate
    from detectron2.engine import SimpleTrainer

    from backbone_sdk.integrations.detectron2 import check_pixels

    model = instantiate(cfg.model)
    check_pixels(model)  # the yacs builders check this themselves; LazyConfigs are checked here
    cfg.optimizer.params.model = model
    cfg.optimizer.lr = 0.01
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), instantiate(cfg.optimizer))
    trainer.train(0, iters)
    return trainer


def quiet_logs() -> None:
    """Hide detectron2's INFO log (model repr, metrics), torch's and third-party warnings.

    detectron2's ``DefaultTrainer`` installs its own console logger when the ``detectron2`` logger is
    not enabled for INFO; an INFO-level logger whose only handler passes warnings keeps it out.
    """
    warnings.filterwarnings("ignore")
    logger = logging.getLogger("detectron2")
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    import torch  # noqa: F401  (torch configures its loggers on import; quiet them afterwards)

    logging.getLogger("torch").setLevel(logging.ERROR)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="backbone_sdk name (default: the one in the config)")
    parser.add_argument("--config", default=str(YAML), help="yacs overrides merged on the model-zoo base")
    parser.add_argument("--lazy", action="store_true", help=f"use the LazyConfig {LAZY.name} instead")
    parser.add_argument("--mask", action="store_true", help="Mask R-CNN (yacs; the LazyConfig always is)")
    parser.add_argument("--tiny", action="store_true", help="small heads and proposal counts")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="longest image side")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python's random")
    parser.add_argument("--verbose", action="store_true", help="detectron2's log and third-party warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_logs()
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(args.seed)

    output = Path(args.output_dir or tempfile.mkdtemp(prefix="d2_sdk_"))
    dataset = register_synthetic("sdk_synthetic_train", output / "data", size=(args.size * 2 // 3, args.size))
    if args.lazy:
        trainer = train_lazy(lazy_cfg(args.backbone, dataset, args.tiny, args.size), args.iters)
    else:
        cfg = yacs_cfg(args.backbone, args.config, args.mask, dataset, args.iters, output, args.tiny, args.size)
        node = cfg.MODEL.BACKBONE_SDK
        if not node.WEIGHTS and (node.NORM_EVAL or node.FROZEN_BN):
            # fixed BatchNorm statistics only make sense for pretrained weights: random ones are 0/1
            print("no backbone weights given: training BatchNorm layers (NORM_EVAL=False, FROZEN_BN=False)")
            node.NORM_EVAL = node.FROZEN_BN = False
        trainer = make_trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    losses = trainer.storage.history("total_loss").values()
    first, last = losses[0][0], losses[-1][0]
    print(f"total_loss: first {first:.4f}, last {last:.4f} over {len(losses)} iterations; output in {output}")
    if not all(math.isfinite(v) for v, _ in losses):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()

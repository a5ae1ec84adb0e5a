"""Mask R-CNN + FPN (detectron2 LazyConfig) on a backbone_sdk Swin-T.

Built from detectron2's own model-zoo pieces, loaded from the installed package with
``model_zoo.get_config`` (relative ``from ..common`` imports only work inside detectron2's tree).
Only the FPN's ``bottom_up`` changes, plus the pixel statistics. Load and build with::

    cfg = LazyConfig.load("examples/detectron2/mask_rcnn_sdk_lazy.py")
    model = instantiate(cfg.model)
    check_pixels(model)        # LazyConfigs have no builder hook that could check this for you

Point ``cfg.dataloader.train.dataset.names`` at a registered dataset before training.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from backbone_sdk.integrations.detectron2 import SDKFPN, Detectron2Backbone, configure_pixels

BACKBONE = "swin_tiny_patch4_window7_224"

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up = L(Detectron2Backbone)(
    name=BACKBONE,
    weights=None,                 # "hub" or a checkpoint file for pretrained weights
    out_features=["res2", "res3", "res4", "res5"],   # = backbone.pyramid() p2..p5, FPN in_features
    freeze_at=2,                  # detectron2's FREEZE_AT: stem + first stage (block for plain ViTs) frozen
    frozen_bn=True,               # BatchNorm as detectron2's FrozenBN (no effect on Swin's LayerNorms)
    use_pyramid=True,
)
# detectron2's FPN pads inputs to multiples of 32; SDKFPN also honours the bottom-up's own
# constraint (e.g. 224 for patch-14 DINOv2). Same state-dict keys as FPN.
model.backbone._target_ = SDKFPN

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""        # the detectron2 ImageNet R-50 checkpoint does not fit this backbone

# RGB input, PIXEL_MEAN/STD = the backbone's mean/std * 255 on the model; the mappers read RGB too
configure_pixels(model, BACKBONE)
dataloader.train.mapper.image_format = "RGB"
dataloader.test.mapper.image_format = "RGB"

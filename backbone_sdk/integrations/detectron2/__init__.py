"""Detectron2 integration: every backbone_sdk backbone as a detectron2 ``Backbone``.

Importing this module registers two builders in detectron2's ``BACKBONE_REGISTRY``:

- ``build_backbone_sdk_backbone``: the backbone alone (single-scale heads, or a plain ViT's simple
  feature pyramid fed straight to the heads, ViTDet style);
- ``build_backbone_sdk_fpn_backbone``: the backbone under detectron2's own ``FPN`` +
  ``LastLevelMaxPool``, for the ``*_FPN_*`` model-zoo configs.

yacs::

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    use_backbone(cfg, "swin_tiny_patch4_window7_224")   # builder, MODEL.BACKBONE_SDK.NAME, pixels
    model = build_model(cfg)

LazyConfig::

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.backbone.bottom_up = L(Detectron2Backbone)(name="resnet50", out_features=["res2", "res3", "res4", "res5"])
    model.backbone._target_ = SDKFPN          # needed when the patch size does not divide 32 (DINOv2)
    configure_pixels(model, "resnet50")

Level names: with ``use_pyramid`` (the default) the backbone returns ``backbone.pyramid()``'s
``p2..p5`` under detectron2's bottom-up names ``res2..res5`` (same strides 4..32). They cannot be
called ``p*``: detectron2's FPN reads its top block's input (``"p5"``) from the bottom-up outputs
when a map of that name exists there, and would skip its own lateral/output convs. See docs/detectron2.md.
"""

from ...errors import require

require("detectron2", "detectron2")

from ._common import CFG_PREFIX, PYRAMID_NAMES, ConfigError, PixelMismatchError  # noqa: E402
from .backbone import (  # noqa: E402
    SDKFPN,
    Detectron2Backbone,
    SDKBackbone,
    available_levels,
    default_out_features,
)
from .config import (  # noqa: E402
    add_backbone_sdk_config,
    build_backbone_sdk_backbone,
    build_backbone_sdk_fpn_backbone,
    use_backbone,
)
from .pixels import check_pixels, configure_pixels, expected_pixels  # noqa: E402

__all__ = [
    "Detectron2Backbone",
    "SDKBackbone",
    "SDKFPN",
    "ConfigError",
    "PixelMismatchError",
    "PYRAMID_NAMES",
    "CFG_PREFIX",
    "available_levels",
    "default_out_features",
    "add_backbone_sdk_config",
    "use_backbone",
    "configure_pixels",
    "check_pixels",
    "expected_pixels",
    "build_backbone_sdk_backbone",
    "build_backbone_sdk_fpn_backbone",
]

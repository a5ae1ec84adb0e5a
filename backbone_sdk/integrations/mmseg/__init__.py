"""mmsegmentation (1.x) integration: every backbone_sdk backbone as an mmseg backbone.

Importing this module registers :class:`BackboneSDK` in ``mmseg.registry.MODELS`` and
:class:`BackboneSDKHook` in ``mmseg.registry.HOOKS``; configs load it with
``custom_imports=dict(imports=['backbone_sdk.integrations.mmseg'], allow_failed_imports=False)``::

    model = dict(
        type='EncoderDecoder',
        data_preprocessor=data_preprocessor_for('swin_tiny_patch4_window7_224', (512, 512)),
        backbone=dict(type='BackboneSDK', name='swin_tiny_patch4_window7_224', frozen_stages=1,
                      init_cfg=dict(type='Pretrained', checkpoint='seg.pth', prefix='backbone.')),
        decode_head=dict(type='UPerHead', in_channels=backbone_channels('swin_tiny_patch4_window7_224'), ...))

A ``Pretrained`` ``init_cfg`` is loaded through backbone_sdk's strict loader: every missing,
unexpected or mis-shaped key raises :class:`~backbone_sdk.CheckpointMismatchError` with the key
report instead of mmengine's silent partial load. See docs/mmseg.md.
"""

from ...errors import require

require("mmseg", "mmseg")
require("mmengine", "mmseg")

from .backbone import (  # noqa: E402
    BackboneSDK,
    MMSegBackbone,
    backbone_channels,
    backbone_strides,
    read_checkpoint,
)
from .hook import BackboneSDKHook, restore_checkpoint, safe_checkpoint  # noqa: E402
from .preprocess import check_data_preprocessor, data_preprocessor_for  # noqa: E402

__all__ = [
    "MMSegBackbone",
    "BackboneSDK",
    "BackboneSDKHook",
    "backbone_channels",
    "backbone_strides",
    "data_preprocessor_for",
    "check_data_preprocessor",
    "read_checkpoint",
    "safe_checkpoint",
    "restore_checkpoint",
]

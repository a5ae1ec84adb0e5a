# UPerNet + Swin-T (backbone_sdk) on ADE20K, 512x512 crops, 160k iterations.
# mmengine config: `python tools/train.py examples/mmseg/upernet_swin_sdk.py` with mmseg's train script, or
# `python examples/mmseg/train.py --config examples/mmseg/upernet_swin_sdk.py --backbone swin_test` for a smoke run.
# The literal numbers below come from backbone_sdk.integrations.mmseg helpers (tests check they still agree):
#   backbone_channels('swin_tiny_patch4_window7_224') -> [96, 192, 384, 768]
#   data_preprocessor_for('swin_tiny_patch4_window7_224', (512, 512))
_base_ = ['_base_/ade20k.py', '_base_/runtime.py']

backbone_name = 'swin_tiny_patch4_window7_224'
crop_size = (512, 512)  # as in _base_/ade20k.py
num_classes = 150
norm_cfg = dict(type='SyncBN', requires_grad=True)

data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)

model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='BackboneSDK',
        name=backbone_name,
        weights='hub',  # ImageNet weights of microsoft/swin-tiny-patch4-window7-224, loaded strictly
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        grad_checkpoint=False),
    decode_head=dict(
        type='UPerHead',
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# -- schedule (Swin paper's UPerNet recipe) ---------------------------------------------------------------
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)

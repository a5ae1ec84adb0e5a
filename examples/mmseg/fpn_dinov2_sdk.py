# Semantic FPN head on a frozen DINOv2 ViT-S/14 (backbone_sdk) on ADE20K, 518x518 crops, 40k iterations.
# The trunk is frozen (finetune='frozen': no gradients, eval mode); only the simple feature pyramid
# (pyramid=True: p2..p5 at strides 4-32 from the last block) and the FPN head train.
# Smoke run with a tiny backbone:
#   python examples/mmseg/train.py --config examples/mmseg/fpn_dinov2_sdk.py --backbone dinov2_test
# The literal numbers below come from backbone_sdk.integrations.mmseg helpers (tests check they still agree):
#   backbone_channels('dinov2_vits14', pyramid=True) -> [256, 256, 256, 256]
#   backbone_strides('dinov2_vits14', pyramid=True) -> [4, 8, 16, 32]
#   data_preprocessor_for('dinov2_vits14', (518, 518))
_base_ = ['_base_/ade20k.py', '_base_/runtime.py']

backbone_name = 'dinov2_vits14'
crop_size = (518, 518)  # a multiple of the patch size 14
num_classes = 150
norm_cfg = dict(type='SyncBN', requires_grad=True)

data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    test_cfg=dict(size_divisor=14))

model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='BackboneSDK',
        name=backbone_name,
        weights='hub',  # facebook/dinov2-small, loaded strictly
        pyramid=True,
        finetune='frozen'),
    decode_head=dict(
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# -- ADE20K at 518x518 crops: the base pipelines, resized for patch 14 ------------------------------------
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2072, 518), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2072, 518), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# -- schedule ---------------------------------------------------------------------------------------------
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=1000),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1000, end=40000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))

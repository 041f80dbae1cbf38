"""MAE-Lite's pretraining of ViT-Tiny on ImageNet-1k (REFERENCE.md §3; wangsr126/mae-lite,
projects/mae_lite): MAE with a lightweight decoder.

* Encoder ``mae_vit_tiny16``: width 192, 12 blocks of 12 heads x 16, MLP 768, qkv bias, LayerNorm
  eps 1e-6, the fixed 2-D sin-cos position embedding (CLS row zeros).
* Decoder: width 96, 1 block, 3 heads, MLP 384, its own fixed sin-cos embedding; prediction of
  the 16 x 16 x 3 pixels of every patch.
* Masking: 75 % of the 196 patches per image (49 visible), random per image; loss on the masked
  patches, each patch's pixels normalised by its mean and unbiased variance (norm_pix_loss).
* 400 epochs, batch 4096, AdamW (0.9, 0.95), eps 1e-8, weight decay 0.05 (not on biases and
  norms), lr 1.5e-4 x 4096 / 256, 40 warmup epochs from 0, cosine to 0, no clipping.
* Augmentation: RandomResizedCrop (0.08, 1) at 224 px and a horizontal flip, nothing else.

Differences from the reference run: the crops are resampled bilinearly with 2x supersampling
(``data/multicrop.py``; MAE: bicubic); the encoder's blocks start from a truncated normal(0.02)
(MAE: xavier_uniform for every linear). MAE-Lite's distilled variant adds
``distill=dict(teacher=...)`` with an MAE-Base teacher (``mae_vit_base16``; its released weights
come with the zoo).

Data: TFDS ``imagenet2012`` (prepared by hand as TFDS describes), or a folder of images:
``--override=data.source='folder' --override=data.path=/data/imagenet/train``.
"""
RECIPE = dict(
    method="mae",
    backbone=dict(config="mae_vit_tiny16"),
    head=dict(dim=96, depth=1, num_heads=3, mlp_ratio=4.0),
    data=dict(source="tfds", name="imagenet2012", split="train", global_size=224,
              num_global=1, num_local=0, global_scale=(0.08, 1.0), flip_prob=0.5),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.95, epsilon=1e-8),
    train=dict(epochs=400, batch_size=4096, lr=1.5e-4, lr_scaling="linear", min_lr=0.0,
               warmup_epochs=40, weight_decay=0.05, mask_ratio=0.75, norm_pix_loss=True,
               clip_grad=None),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

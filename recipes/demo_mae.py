"""The CPU demo of MAE (REFERENCE.md §3): MAE-Lite's recipe scaled down to the embedded shapes
data set, 32 x 32 images with 4 x 4 patches (64 patches, 16 visible at the ratio 0.75).

* Encoder ``vit_mae_demo``: width 64, 4 blocks of 4 heads x 16, fixed sin-cos position
  embedding; decoder width 32, 1 block, 2 heads (MAE-Lite's decoder is half the encoder's width:
  96 for 192).
* AdamW (0.9, 0.95), weight decay 0.05, batch 64, lr 1.5e-4 x 64 / 256 scaled up 10x (a short
  run), 5 warmup epochs, cosine to 0, 60 epochs of 80 steps; RandomResizedCrop (0.4, 1) (the
  shapes are small: smaller crops often miss them, as in the POA demo) and a flip.

Time (PyTorch, one thread): about 0.08 s per step, 4800 steps, about 7 minutes.

recipes/demo_mae_distill.py trains the same encoder with MAE-Lite's attention distillation from
a wider MAE (recipes/demo_mae_teacher.py).
"""
RECIPE = dict(
    method="mae",
    backbone=dict(config="vit_mae_demo"),
    head=dict(dim=32, depth=1, num_heads=2, mlp_ratio=4.0),
    data=dict(source="shapes", palette="light_on_dark", num_images=5120, num_val=2000,
              image_size=32, seed=0, threads=1, global_size=32, num_global=1, num_local=0,
              global_scale=(0.4, 1.0), flip_prob=0.5),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.95, epsilon=1e-8),
    train=dict(epochs=60, batch_size=64, lr=1.5e-3, lr_scaling="linear", min_lr=0.0,
               warmup_epochs=5, weight_decay=0.05, mask_ratio=0.75, norm_pix_loss=True),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

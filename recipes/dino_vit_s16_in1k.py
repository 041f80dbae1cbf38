"""DINO ViT-S/16 on ImageNet-1k (facebookresearch/dino; REFERENCE.md §2): the README's boosted
run (300 epochs, teacher temperature 0.04 -> 0.07 over 30 epochs, no last-layer normalisation)
with main_dino.py's defaults for everything else, on 16 GPUs x 64 images = batch 1024.

    poa-keras pretrain --recipe=dino_vit_s16_in1k --data=/path/to/imagenet/train
"""
RECIPE = dict(
    method="dino",
    backbone=dict(config="vit_s16", drop_path_rate=0.1, drop_path_uniform=False,
                  pos_embed_resize="dino"),   # DINO's (g + 0.1) / sqrt(N) rule at 96 px crops
    head=dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=False),
    data=dict(
        source="folder", path=None,
        global_size=224, local_size=96, num_local=8,
        global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
    ),
    optimizer=dict(beta_1=0.9, beta_2=0.999),
    train=dict(
        epochs=300, batch_size=1024,
        lr=5e-4, lr_scaling="linear", reference_batch=256, min_lr=1e-6, warmup_epochs=10,
        truncate=1.0,
        weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.996, final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
        freeze_last_layer_epochs=1, clip_grad=3.0,
        layer_decay=1.0, patch_embed_lr_mult=1.0,
        student_temp=0.1, centering="center", center_momentum=0.9,
    ),
    checkpoint=dict(every_epochs=20, keep=2),   # saveckp_freq 20
    seed=0,
)

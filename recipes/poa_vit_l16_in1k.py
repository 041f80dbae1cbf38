"""POA ViT-L/16 elastic teacher on ImageNet-1k, as released by the authors (alipay/POA,
poa/configs/vit_ssl_default_config.yaml + poa/configs/train/vit_ee1200.yaml; REFERENCE.md §1).

The reference run: 32 A100 GPUs x 50 images = batch 1600, 346 epochs of 800 iterations
(OFFICIAL_EPOCH_LENGTH; "effective 1200 epochs" of the three branches), 276,800 iterations.
Give the data on the command line, e.g.
    poa-keras pretrain --recipe=poa_vit_l16_in1k --data=/path/to/imagenet/train
(an image folder; or --override=data.source='tfds' for tensorflow_datasets' imagenet2012).
"""
RECIPE = dict(
    method="poa",
    backbone=dict(
        config="vit_l16_elastic",      # widths 384..1024 step 64, depths 12..24, head dim 64
        drop_path_rate=0.2, drop_path_uniform=True, layer_scale_init=1e-5,
        pos_embed_resize="dino",       # POA's (DINOv2's) (g + 0.1) / sqrt(N) resize rule
    ),
    head=dict(hidden_dim=2048, bottleneck_dim=256, out_dims=(8192, 16384, 32768, 65536)),
    data=dict(
        source="folder", path=None,
        steps_per_epoch=800,           # OFFICIAL_EPOCH_LENGTH of vit_ee1200.yaml
        global_size=224, local_size=96, num_local=8,
        global_scale=(0.32, 1.0), local_scale=(0.05, 0.32),
        # iBOT block masks on the global views (mask_sample_probability, mask_ratio_min_max)
        masks=True, mask_patch_size=16, mask_probability=0.5, mask_ratio=(0.1, 0.5),
    ),
    optimizer=dict(beta_1=0.9, beta_2=0.999),
    train=dict(
        epochs=346, batch_size=1600,
        lr=0.004, lr_scaling="sqrt", reference_batch=1024, min_lr=2e-5, warmup_epochs=10,
        truncate=0.78,                 # iter_num_scale: the cosine is cut at 78 % of its length
        weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.992, final_momentum_teacher=0.9999,
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
        freeze_last_layer_epochs=1, clip_grad=1.5,
        layer_decay=0.9, patch_embed_lr_mult=0.2,
        student_temp=0.1, centering="sinkhorn", sinkhorn_iterations=3,
        lambda_ie=0.8, same_view_temp=0.1, koleo_weight=0.1,
        ibot_weight=1.0, ibot_start_epoch=30,            # ibot.loss_weight, ibot_activate_epochs
        ibot_mask_probability=0.5, ibot_mask_ratio=(0.1, 0.5),
        sampler_seed=0, net_select_scale=3,
    ),
    checkpoint=dict(every_epochs=20, keep=2),   # saveckp_freq 20
    seed=0,
)

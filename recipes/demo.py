"""The CPU demo: POA on the embedded shapes data set (poa_keras.data.synthetic), a small
elastic ViT (widths 96..192, depths 4..8: 20 subnets), about 10 minutes on 2 CPU cores with the
PyTorch backend (jax and tensorflow compile one program per subnet first: see the README).

The paper's settings (REFERENCE.md §1) scaled down: 64 x 64 images, 2 global crops of 64 and 4
local crops of 32 (8 in the paper), two projection heads of 1024 and 2048 prototypes, and
schedules measured in (fractional) epochs of the short run. Labels of the data set are never
used by the training; benchmarks/quality.py uses them for k-NN.
"""
RECIPE = dict(
    method="poa",
    # LayerScale starts at 0.1, not the paper's 1e-5: at 1e-5 the CLS output of this small
    # network hardly depends on the image (std over a batch 6e-5, measured), so in a run of 200
    # steps the heads settle on uniform predictions (the loss stayed at lambda * ln K) and the
    # features never separate the classes.
    backbone=dict(config="vit_elastic_demo", drop_path_rate=0.0, layer_scale_init=0.1),
    head=dict(hidden_dim=512, bottleneck_dim=128, out_dims=(1024, 2048)),
    data=dict(
        source="shapes", num_images=3200, num_val=2000, image_size=64, seed=0,
        threads=1,                     # leave the 2 cores to the train step
        global_size=64, local_size=32, num_local=4,
        global_scale=(0.32, 1.0), local_scale=(0.05, 0.32),
    ),
    optimizer=dict(beta_1=0.9, beta_2=0.999),
    train=dict(
        epochs=2, batch_size=32,       # 100 steps per epoch, about 2.7 s each with PyTorch
        lr=0.004, lr_scaling="sqrt", reference_batch=1024, min_lr=2e-5, warmup_epochs=0.5,
        truncate=0.78,
        weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.99, final_momentum_teacher=0.999,
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1,
        freeze_last_layer_epochs=0.25, clip_grad=1.5,
        layer_decay=0.9, patch_embed_lr_mult=0.2,
        student_temp=0.1, centering="sinkhorn", sinkhorn_iterations=3,
        lambda_ie=0.8, same_view_temp=0.1, koleo_weight=0.1,
        sampler_seed=0,
    ),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

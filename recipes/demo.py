"""The CPU demo: POA on the embedded shapes data set (poa_keras.data.synthetic), a small
elastic ViT (``vit_elastic_demo``: 32 x 32 images, patch 8, widths 48..96, depths 3..6: 16
subnets), about 6.5-7.5 minutes of training on 2 CPU cores with the PyTorch backend (jax and tensorflow compile
one program per subnet first: see the README).

The paper's recipe (REFERENCE.md §1) scaled down to a network of 0.7 M parameters and a run of
a thousand steps; what differs and why (measured on this data, k-NN of the teacher's CLS
feature on held-out images):

* images of 32 px, 2 global crops of 32 and 2 local crops of 16 (10 in the paper);
* Adam lr 5e-4 without the sqrt batch rule: the paper's 4e-3 changes the weights of this small
  network by 30-56 % within 30 steps, a random walk from which the features never recover;
* teacher temperature 0.02 and projection heads of 256 and 512 prototypes: with 0.04-0.07 and
  thousands of prototypes the teacher's targets stay near uniform in so short a run and the
  loss does not fall;
* strong colour augmentation (saturation 0.8, hue 0.5, always on; grayscale 0.3): the classes
  are shapes of random tints, and without it the cheapest agreement between views is colour;
* no layer-wise lr decay and no patch-embedding lr multiplier (0.9 and 0.2 in the paper are
  meant for fine-tuning-sized learning rates on deep networks);
* LayerScale starts at 0.1, not 1e-5: at 1e-5 the CLS output of this small network hardly
  depends on the image (std over a batch 6e-5, measured), so the heads settle on uniform
  predictions and the features never separate the classes.

Labels of the data set are never used by the training; benchmarks/quality.py and the sweep use
them for k-NN.
"""
RECIPE = dict(
    method="poa",
    backbone=dict(config="vit_elastic_demo", drop_path_rate=0.0, layer_scale_init=0.1),
    head=dict(hidden_dim=512, bottleneck_dim=128, out_dims=(256, 512)),
    data=dict(
        source="shapes", palette="light_on_dark", num_images=6400, num_val=2000,
        image_size=32, seed=0,
        threads=1,                     # leave the 2 cores to the train step
        global_size=32, local_size=16, num_local=2,
        global_scale=(0.4, 1.0), local_scale=(0.1, 0.4),
        color_jitter=(0.4, 0.4, 0.8, 0.5), jitter_prob=1.0, grayscale_prob=0.3,
    ),
    optimizer=dict(beta_1=0.9, beta_2=0.999),
    train=dict(
        epochs=8, batch_size=64,       # 100 steps per epoch
        lr=5e-4, lr_scaling="none", min_lr=1e-5, warmup_epochs=1,
        weight_decay=0.04, weight_decay_end=0.2,
        momentum_teacher=0.99, final_momentum_teacher=0.999,
        warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=0.25, clip_grad=3.0,
        layer_decay=1.0, patch_embed_lr_mult=1.0,
        student_temp=0.1, centering="sinkhorn", sinkhorn_iterations=3,
        lambda_ie=0.8, same_view_temp=0.1, koleo_weight=0.1,
        sampler_seed=0,
    ),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

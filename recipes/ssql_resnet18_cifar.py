"""SSQL on CIFAR-10 with the CIFAR ResNet-18: the paper's setting (REFERENCE.md §5; the authors'
megvii-research/SSQL-ECCV2022: configs/cifar/resnet18_ssql_simsiam_cifar.yaml,
utils/ssl_algorithms/Qsimsiam.py).

* Encoder: the CIFAR ResNet-18 with BatchNorm (``resnet18_cifar_bn``: 3 x 3/1 stem, no max pool,
  zero-initialised last BN of every block) + SimSiam's projector 512 -> 2048 -> 2048 -> 2048
  (its linears' weights fixed at 8 bits when quantized); predictor 2048 -> 2048 -> 2048
  (the config's HIDDEN_DIM 2048, DIM 2048).
* Bits: weights uniform in 2..8, activations in 4..8, drawn every step (``BIT_RANGE`` [2, 9]
  and [4, 9], upper bounds exclusive).
* 400 epochs, batch 512, SGD momentum 0.9, lr 0.05 (not scaled with the batch), cosine to 0
  per step, no warmup, weight decay 5e-4 as PyTorch SGD applies it (coupled, on every
  parameter: ``weight_decay_mode="l2"``), one lr for all parameters.
* Augmentation of both views: random resized crop (0.2, 1) at 32 px, flip 0.5, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2; no blur on CIFAR.

Differences from the reference run (see methods/ssql.py and methods/simsiam.py): activation
ranges from each quantizer's own input in the quantized forward ("batch" ranges) rather than
from the float forward's observers; one forward over both views, so BatchNorm normalises over
the 2 x 512 views (the reference: 128 images of one view per GPU, 4 GPUs, no SyncBN); the
images are normalised with ImageNet's mean and std (the reference: CIFAR's; a BatchNorm
follows the first conv either way); crops are resampled bilinearly with 2x supersampling
(``data/multicrop.py``).

Data: TFDS ``cifar10`` (``pip install "poa_keras[tfds]"``; downloaded by TFDS into
``data.data_dir``).
"""
RECIPE = dict(
    method="ssql",
    backbone=dict(config="resnet18_cifar_bn"),
    head=dict(projector=dict(hidden_dim=2048, out_dim=2048), predictor=dict(hidden_dim=2048)),
    data=dict(
        source="tfds", name="cifar10", split="train",
        global_size=32, num_local=0,
        global_scale=(0.2, 1.0), flip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(0.0, 0.0, 0.0), solarize_prob=(0.0, 0.0, 0.0),
    ),
    optimizer=dict(name="sgd", momentum=0.9),
    train=dict(
        epochs=400, batch_size=512,
        lr=0.05, lr_scaling="none", min_lr=0.0, warmup_epochs=0,
        weight_decay=5e-4, weight_decay_mode="l2", clip_grad=None,
        weight_bits=(2, 3, 4, 5, 6, 7, 8), activation_bits=(4, 5, 6, 7, 8), sampler_seed=0,
    ),
    checkpoint=dict(every_epochs=10, keep=2),
    seed=0,
)

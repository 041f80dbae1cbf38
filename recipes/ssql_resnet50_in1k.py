"""SSQL on ImageNet-1k with ResNet-50: the paper's setting (REFERENCE.md §5; the authors'
megvii-research/SSQL-ECCV2022: configs/imagenet/resnet50_ssql_simsiam_imagenet.yaml,
utils/ssl_algorithms/Qsimsiam.py).

* Encoder: ResNet-50 with BatchNorm (``resnet50_bn``, zero-initialised last BN of every block,
  as the reference builds its encoder) + SimSiam's projector 2048 -> 512 -> 512 -> 2048 (its
  linears' weights fixed at 8 bits when quantized); predictor 2048 -> 512 -> 2048. The width
  512 is the config's HIDDEN_DIM, which Qsimsiam.py uses for the projector's hidden layers as
  well as the predictor's (REFERENCE.md summarises the projector as max(backbone_dim, 2048)
  wide: ``head.projector.hidden_dim=2048`` gives that).
* Bits: weights uniform in 2..8, activations in 4..8, drawn every step.
* 100 epochs (REFERENCE.md §5; the released config file says 200), batch 256, SGD momentum
  0.9, lr 0.05 (not scaled), cosine to 0 per step, no warmup, weight decay 1e-4 as PyTorch
  SGD applies it (coupled, every parameter), one lr for all parameters.
* Augmentation of both views: random resized crop (0.2, 1) at 224 px, flip 0.5, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, Gaussian blur sigma ~ U(0.1, 2) with p 0.5.

Differences from the reference run (see methods/ssql.py and methods/simsiam.py): activation
ranges from each quantizer's own input in the quantized forward ("batch" ranges) rather than
the float forward's observers; one forward over both views, so BatchNorm normalises over the
2 x 256 views of a step (the reference: SyncBN over the 256 images of one view); crops are
resampled bilinearly with 2x supersampling (``data/multicrop.py``).

Data: TFDS ``imagenet2012`` (prepared by hand as TFDS describes), or a folder of images:
``--override=data.source='folder' --override=data.path=/data/imagenet/train`` (an epoch is
then images // 256 steps).
"""
RECIPE = dict(
    method="ssql",
    backbone=dict(config="resnet50_bn", zero_init_residual=True),
    head=dict(projector=dict(hidden_dim=512, out_dim=2048), predictor=dict(hidden_dim=512)),
    data=dict(
        source="tfds", name="imagenet2012", split="train",
        global_size=224, num_local=0,
        global_scale=(0.2, 1.0), flip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(0.5, 0.5, 0.0), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.0, 0.0),
    ),
    optimizer=dict(name="sgd", momentum=0.9),
    train=dict(
        epochs=100, batch_size=256,
        lr=0.05, lr_scaling="none", min_lr=0.0, warmup_epochs=0,
        weight_decay=1e-4, weight_decay_mode="l2", clip_grad=None,
        weight_bits=(2, 3, 4, 5, 6, 7, 8), activation_bits=(4, 5, 6, 7, 8), sampler_seed=0,
    ),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

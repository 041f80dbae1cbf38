"""The CPU demo of SSQL (REFERENCE.md §5): SimSiam + a quantized branch at bit-widths drawn every
step (weights 2..8, activations 4..8), on the embedded shapes data set, with the small
BatchNorm ResNet ``resnet_bn_demo`` (a quarter-width ResNet-18 with one block per stage, 64 x
64 images). recipes/demo_simsiam.py is the float baseline trained identically.

Time (PyTorch, one thread, on a shared 2-core machine): 0.54-0.61 s per step, 960 steps, about
10 minutes (the SimSiam baseline: 0.21-0.33 s per step, about 5 minutes). Measured with 10
epochs (held-out k-NN, k = 20, of the backbone's pooled feature; 10 classes): the random
initialisation 22.4 %, SimSiam 54.1 %, SSQL 57.8 % (one seed each).

SSQL's recipe (recipes/ssql_resnet18_cifar.py) scaled down; what differs and why:

* 64 px shapes instead of CIFAR-10, 5120 training images, batch 64 (80 steps per epoch), 12
  epochs;
* lr 0.3 instead of 0.05 (still not scaled, cosine to 0, no warmup): in so short a run 0.05
  hardly moves the features (k-NN 22.4 % -> 23.2 % after 3 epochs, 28.2 % with 0.3);
* crops of (0.4, 1) of the image instead of (0.2, 1): the shapes are small, and smaller crops
  often miss them (as in the POA demo, recipes/demo.py);
* the projector 128 -> 512 -> 512 -> 512 and predictor 512 -> 128 -> 512 instead of 2048 wide:
  the backbone's feature has 128 channels (SimSiam's 4:1 predictor bottleneck kept);
* colour jitter as the POA demo's (saturation 0.8, hue 0.5, always on; grayscale 0.3): the
  classes are shapes of random tints, and without it the cheapest agreement between the two
  views is their colour; no blur (64 px, like CIFAR).

The rest is SSQL's: SGD momentum 0.9, PyTorch-style weight decay 5e-4, one lr for every
parameter. Labels are never used by the training; the evaluation (k-NN, PTQ at several
bit-widths) uses them.
"""
RECIPE = dict(
    method="ssql",
    backbone=dict(config="resnet_bn_demo"),
    head=dict(projector=dict(hidden_dim=512, out_dim=512), predictor=dict(hidden_dim=128)),
    data=dict(
        source="shapes", palette="light_on_dark", num_images=5120, num_val=2000,
        image_size=64, seed=0,
        threads=1,                     # leave the 2 cores to the train step
        global_size=64, num_local=0,
        global_scale=(0.4, 1.0), flip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.8, 0.5), jitter_prob=1.0, grayscale_prob=0.3,
        blur_prob=(0.0, 0.0, 0.0), solarize_prob=(0.0, 0.0, 0.0),
    ),
    optimizer=dict(name="sgd", momentum=0.9),
    train=dict(
        epochs=12, batch_size=64,
        lr=0.3, lr_scaling="none", min_lr=0.0, warmup_epochs=0,
        weight_decay=5e-4, weight_decay_mode="l2", clip_grad=None,
        weight_bits=(2, 3, 4, 5, 6, 7, 8), activation_bits=(4, 5, 6, 7, 8), sampler_seed=0,
    ),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)

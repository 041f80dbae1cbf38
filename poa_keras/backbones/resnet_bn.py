"""ResNet: the plain (non-elastic) BatchNorm ResNet of torchvision, with BasicBlocks (ResNet-18
/ 34) or bottlenecks (ResNet-50, v1.5), for SSQL / SimSiam recipes and converted checkpoints
such as DINO's ResNet-50 (REFERENCE.md §5; torchvision's ``models/resnet.py`` layout).

Layout (channels-last, PyTorch's padding everywhere):

* stem: 7 x 7/2 conv (padding 3, no bias) -> BatchNorm -> ReLU -> 3 x 3/2 max pool (padding 1);
  or the CIFAR stem: 3 x 3/1 conv (padding 1) -> BatchNorm -> ReLU, no pool;
* stages of blocks with ``widths`` (64, 128, 256, 512) channels (x 4 at a bottleneck's output),
  stride 1 in the first stage and 2 in the others, on the first block of the stage:

  - ``ResNetBasicBlock``: 3 x 3/s conv -> BN -> ReLU -> 3 x 3 conv -> BN, plus the shortcut;
  - ``ResNetBottleneck``: 1 x 1 -> BN -> ReLU -> 3 x 3/s -> BN -> ReLU -> 1 x 1 (x 4) -> BN,
    plus the shortcut (the stride on the 3 x 3 conv: torchvision's v1.5);
  - shortcut: the identity, or a 1 x 1/s conv + BN where the shape changes; the block output
    is ReLU(residual + shortcut);

* feature: the global average of the last stage (no final norm).

Built from the elastic layers, never sliced (the family has one size, ``IntactSubnet()``):
3 x 3 and 7 x 7 convs are ``ElasticConv2D`` (explicit symmetric padding), 1 x 1 convs are
``ElasticDense`` on the channel axis (a strided one on ``x[:, ::s, ::s]``), as in
``ElasticBottleneck``. So fake quantization lives in one place (the elastic layers quantize
their kernels inside a ``quantization_scope``) and the 1 x 1 convs of a deployed network
quantize to int8 with ``model.quantize`` (Keras' Conv2D has no int8 kernel).

BatchNorm is ``keras.layers.BatchNormalization``, in float and never folded, with PyTorch's
settings: momentum 0.1 in torch's convention (``moving = 0.9 moving + 0.1 batch``, Keras'
``momentum=0.9``), epsilon 1e-5. One difference from torch that no option removes: Keras
updates the moving variance with the biased batch variance (torch: the unbiased one, n / (n -
1) larger, n = batch x height x width; 1 / 50,000 for a 16-image batch of 56 x 56 maps).

Fake quantization (SSQL's placement, REFERENCE.md §5): conv -> BN -> ReLU -> activation
quantizer; no quantizer after the last conv of a block nor after the shortcut conv; the block
output (after the add and the ReLU) is quantized; the stem conv has fixed 8-bit weights and an
8-bit output. Pools are not quantized.
"""
from __future__ import annotations


import keras
import numpy as np
from keras import ops

from poa_keras.backbones.base import (NonElasticBackbone, check_bn_momentum,
                                      check_drop_path_rate)
from poa_keras.backbones.resnet import resnet_layer_id
from poa_keras.elastic.conv import ElasticConv2D, conv_output_size, kaiming_normal_fan_out
from poa_keras.elastic.layers import ElasticDense, HostInitializer, StochasticDepth
from poa_keras.quantization.observer import ActivationQuantizer, current_quant
from poa_keras.validation import positive_ints

BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
_IMAGENET_WIDTHS = (64, 128, 256, 512)

CONFIGS = {
    # torchvision's ImageNet ResNets (the fc layer excluded).
    "resnet18_bn": dict(image_size=224, block="basic", depths=(2, 2, 2, 2),
                        widths=_IMAGENET_WIDTHS),
    "resnet34_bn": dict(image_size=224, block="basic", depths=(3, 4, 6, 3),
                        widths=_IMAGENET_WIDTHS),
    "resnet50_bn": dict(image_size=224, block="bottleneck", depths=(3, 4, 6, 3),
                        widths=_IMAGENET_WIDTHS),
    # SSQL's CIFAR-10 ResNet-18: 3 x 3/1 stem, no max pool (32 x 32 images keep 32 x 32 maps
    # in stage 1, 4 x 4 in stage 4).
    "resnet18_cifar_bn": dict(image_size=32, block="basic", depths=(2, 2, 2, 2),
                              widths=_IMAGENET_WIDTHS, cifar_stem=True, zero_init_residual=True),
    # Tiny, for tests: 2 stages of one BasicBlock, 8 and 16 channels.
    "resnet_bn_test": dict(image_size=32, block="basic", depths=(1, 1), widths=(8, 16),
                           cifar_stem=True),
    # A ResNet-18 at a quarter of the width and one block per stage, for ~10-minute CPU
    # pretraining demos on 64 x 64 images. The ImageNet stem: a 64 x 64 image gives the
    # 16 / 8 / 4 / 2 maps of a 224 x 224 image's 56 / 28 / 14 / 7 in a ResNet (so a recipe's
    # structure carries over, local crops of 32 pixels included), at 12 MFLOPs per image;
    # the CIFAR stem would cost 16 times that for maps larger than a small data set needs.
    "resnet_bn_demo": dict(image_size=64, block="basic", depths=(1, 1, 1, 1),
                           widths=(16, 32, 64, 128), zero_init_residual=True),
}

_STEM_PARTS = ("stem_conv", "stem_norm", "stem_quant")


def _batch_norm(momentum, epsilon, gamma, policy, name):
    """A BatchNormalization over the channel axis; ``gamma`` its initial scale (0 for a
    zero-initialised residual)."""
    return keras.layers.BatchNormalization(
        axis=-1, momentum=momentum, epsilon=epsilon,
        gamma_initializer=HostInitializer("constant", value=gamma),
        beta_initializer=HostInitializer("zeros"), dtype=policy, name=name)


class _ResidualBlock(keras.layers.Layer):
    """What both block types share: the shortcut (identity, or 1 x 1/s conv + BN), stochastic
    depth on the residual branch and the quantized block output.

    ``residual(x, training, quantized)`` (the block's own layers) gives (B, H', W', out_channels);
    the block returns ``quant_out(relu(drop_path(residual) + shortcut))``."""

    expansion = 1

    def __init__(self, in_channels, channels, strides=1, drop_path=0.0,
                 zero_init_residual=False, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.in_channels = int(in_channels)
        self.channels = int(channels)
        self.out_channels = self.channels * self.expansion
        self.strides = int(strides)
        self.drop_path_rate = float(drop_path)
        self.zero_init_residual = bool(zero_init_residual)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.has_downsample = self.strides != 1 or self.in_channels != self.out_channels

    def _add_shortcut_and_output(self):
        """The layers after a block's own (called last in its __init__, so that the weights
        come in call order): the shortcut conv + BN, stochastic depth, the output quantizer."""
        if self.has_downsample:
            self.downsample = self.dense(self.in_channels, self.out_channels, "downsample")
            self.downsample_norm = self.norm("downsample_norm")
        else:
            self.downsample = self.downsample_norm = None
        self.drop_path = StochasticDepth(self.drop_path_rate, dtype=self.dtype_policy,
                                         name="drop_path")
        self.quant_out = ActivationQuantizer(dtype=self.dtype_policy, name="quant_out")

    # -- parts ---------------------------------------------------------------------------------
    def conv(self, in_channels, filters, kernel_size, strides, name):
        """A k x k conv (padding k // 2, no bias: a BatchNorm follows)."""
        return ElasticConv2D(in_channels, filters, kernel_size, strides=strides,
                             padding=kernel_size // 2, dtype=self.dtype_policy, name=name)

    def dense(self, in_channels, filters, name):
        """A 1 x 1 conv as a dense layer on the channel axis (torchvision's fan-out init)."""
        return ElasticDense(in_channels, filters, use_bias=False,
                            kernel_initializer=kaiming_normal_fan_out(1, filters),
                            dtype=self.dtype_policy, name=name)

    def norm(self, name, gamma=1.0):
        return _batch_norm(self.bn_momentum, self.bn_epsilon, gamma, self.dtype_policy, name)

    def activation(self, quantizer, norm, y, training, quantized):
        """relu(norm(y)), then the quantizer inside a quantization scope."""
        y = ops.relu(norm(y, training=training))
        return quantizer(y) if quantized else y

    def build_layers(self, convs, norms, quantizers):
        """Builds the block's own layers (convs, (BatchNorm, channels) pairs, quantizers),
        then the shortcut, stochastic depth and the output quantizer."""
        if self.has_downsample:
            convs = list(convs) + [self.downsample]
            norms = list(norms) + [(self.downsample_norm, self.out_channels)]
        for conv in convs:
            conv.build()
        for norm, channels in norms:
            norm.build((None, None, None, channels))
        for quantizer in list(quantizers) + [self.quant_out]:
            quantizer.build()
        self.drop_path.build(None)   # weightless, but Model.quantize wants every layer built

    def residual(self, x, training, quantized):
        raise NotImplementedError

    def call(self, x, training=None):
        # No conditional around the block (``elastic.layers.skippable``'s boundary): on JAX a
        # BatchNorm's moving-statistics update inside a branch would leave the branch.
        quantized = current_quant() is not None
        noise = self.drop_path.noise(x, training)
        y = self.residual(x, training, quantized)
        shortcut = x
        if self.has_downsample:
            if self.strides != 1:   # a 1 x 1/s conv reads every s-th pixel from the first
                shortcut = shortcut[:, ::self.strides, ::self.strides, :]
            shortcut = self.downsample_norm(self.downsample(shortcut), training=training)
        out = ops.relu(self.drop_path.apply(y, noise) + shortcut)
        return self.quant_out(out) if quantized else out

    def get_config(self):
        config = super().get_config()
        config.update(in_channels=self.in_channels, channels=self.channels,
                      strides=self.strides, drop_path=self.drop_path_rate,
                      zero_init_residual=self.zero_init_residual,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ResNetBasicBlock(_ResidualBlock):
    """ResNet-18 / 34 block::

        y = quant1(relu(bn1(conv3x3/s(x))))      in_channels -> channels
        y = bn2(conv3x3(y))                      channels -> channels (gamma 0: zero init)
        out = quant_out(relu(drop_path(y) + shortcut(x)))

    Input (B, H, W, in_channels) -> (B, H', W', channels), H' = floor((H - 1) / s) + 1.
    """

    expansion = 1

    def __init__(self, in_channels, channels, strides=1, **kwargs):
        super().__init__(in_channels, channels, strides, **kwargs)
        c = self.channels
        self.conv1 = self.conv(self.in_channels, c, 3, self.strides, "conv1")
        self.norm1 = self.norm("norm1")
        self.quant1 = ActivationQuantizer(dtype=self.dtype_policy, name="quant1")
        self.conv2 = self.conv(c, c, 3, 1, "conv2")
        self.norm2 = self.norm("norm2", 0.0 if self.zero_init_residual else 1.0)
        self._add_shortcut_and_output()

    def build(self, input_shape=None):
        c = self.channels
        self.build_layers([self.conv1, self.conv2], [(self.norm1, c), (self.norm2, c)],
                          [self.quant1])

    def residual(self, x, training, quantized):
        y = self.activation(self.quant1, self.norm1, self.conv1(x), training, quantized)
        return self.norm2(self.conv2(y), training=training)


@keras.saving.register_keras_serializable(package="poa_keras")
class ResNetBottleneck(_ResidualBlock):
    """ResNet-50 block (v1.5: the stride on the 3 x 3 conv)::

        y = quant1(relu(bn1(conv1x1(x))))        in_channels -> channels
        y = quant2(relu(bn2(conv3x3/s(y))))      channels -> channels
        y = bn3(conv1x1(y))                      channels -> 4 channels (gamma 0: zero init)
        out = quant_out(relu(drop_path(y) + shortcut(x)))

    Input (B, H, W, in_channels) -> (B, H', W', 4 channels), H' = floor((H - 1) / s) + 1.
    """

    expansion = 4

    def __init__(self, in_channels, channels, strides=1, **kwargs):
        super().__init__(in_channels, channels, strides, **kwargs)
        c = self.channels
        self.conv1 = self.dense(self.in_channels, c, "conv1")
        self.norm1 = self.norm("norm1")
        self.quant1 = ActivationQuantizer(dtype=self.dtype_policy, name="quant1")
        self.conv2 = self.conv(c, c, 3, self.strides, "conv2")
        self.norm2 = self.norm("norm2")
        self.quant2 = ActivationQuantizer(dtype=self.dtype_policy, name="quant2")
        self.conv3 = self.dense(c, self.out_channels, "conv3")
        self.norm3 = self.norm("norm3", 0.0 if self.zero_init_residual else 1.0)
        self._add_shortcut_and_output()

    def build(self, input_shape=None):
        c = self.channels
        self.build_layers([self.conv1, self.conv2, self.conv3],
                          [(self.norm1, c), (self.norm2, c), (self.norm3, self.out_channels)],
                          [self.quant1, self.quant2])

    def residual(self, x, training, quantized):
        y = self.activation(self.quant1, self.norm1, self.conv1(x), training, quantized)
        y = self.activation(self.quant2, self.norm2, self.conv2(y), training, quantized)
        return self.norm3(self.conv3(y), training=training)


_BLOCK_CLASSES = {"basic": ResNetBasicBlock, "bottleneck": ResNetBottleneck}


@keras.saving.register_keras_serializable(package="poa_keras")
class ResNet(NonElasticBackbone):
    """torchvision's BatchNorm ResNet (see the module docstring): one size, no slicing.

    Args:
        image_size: the training resolution (default size of ``subnet_flops`` and of the
            default preprocessing); any input size works.
        in_channels: image channels.
        block: "basic" (ResNet-18 / 34) or "bottleneck" (ResNet-50 and deeper, v1.5).
        depths: blocks per stage (ResNet-18: (2, 2, 2, 2); ResNet-34 / 50: (3, 4, 6, 3)).
        widths: channels of each stage's blocks (a bottleneck outputs 4 times as many); the
            stem has ``widths[0]`` channels. Stage 1 has stride 1, the others stride 2.
        cifar_stem: a 3 x 3/1 stem conv without max pool (CIFAR ResNets) instead of the
            7 x 7/2 conv and the 3 x 3/2 max pool.
        zero_init_residual: initialise the last BatchNorm scale of every block to 0, so every
            block starts as ``relu(shortcut)`` (Goyal et al.; SSQL and SimSiam use it).
        bn_momentum: Keras' momentum of the moving statistics (``moving = m moving +
            (1 - m) batch``): 0.9 is PyTorch's 0.1.
        bn_epsilon: BatchNorm epsilon (PyTorch's 1e-5).
        drop_path_rate: stochastic depth of the residual branches (torchvision: 0), the same
            for every block if ``drop_path_uniform``, else rising linearly from 0 over the
            blocks.
        preprocessing: see ``Backbone``.

    Call: ``model(images, subnet=None, training=None, return_feature_maps=False,
    quant=None)`` with images (B, H, W, in_channels). ``training``: BatchNorm normalises with
    the batch's statistics and updates its moving ones (and stochastic depth drops). Returns
    ``{"cls": (B, C), "pooled": (B, C)}``, the global average of the last stage (C =
    ``feature_dim()``; "cls" too, so trainers and k-NN work unchanged), and with
    ``return_feature_maps=True`` ``"feature_maps"``: every stage's output, a list of
    (B, H_i, W_i, C_i). ``quant``: a ``QuantConfig`` (or "W/A", or a pair) runs the forward
    fake-quantized (SSQL; see ``Backbone.quantization``).
    """

    configs = CONFIGS
    family = "ResNet-BN"
    supports_masks = False

    def __init__(self, image_size=224, in_channels=3, block="basic", depths=(2, 2, 2, 2),
                 widths=_IMAGENET_WIDTHS, cifar_stem=False, zero_init_residual=False,
                 bn_momentum=0.9, bn_epsilon=1e-5, drop_path_rate=0.0, drop_path_uniform=True,
                 **kwargs):
        super().__init__(**kwargs)
        if block not in BLOCKS:
            raise ValueError(f"unknown ResNet block {block!r}; valid: {BLOCKS}")
        depths = positive_ints(depths, "depths")
        widths = positive_ints(widths, "widths")
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} must have one entry per "
                             "stage")
        for what, value in (("image_size", image_size), ("in_channels", in_channels)):
            if int(value) < 1:
                raise ValueError(f"{what} must be a positive int, got {value}")
        for what, value in (("cifar_stem", cifar_stem),
                            ("zero_init_residual", zero_init_residual),
                            ("drop_path_uniform", drop_path_uniform)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{what} must be True or False, got {value!r}")
        check_bn_momentum(bn_momentum)
        if not float(bn_epsilon) > 0.0:
            raise ValueError(f"bn_epsilon must be positive, got {bn_epsilon}")
        check_drop_path_rate(drop_path_rate)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.block = block
        self.depths = depths
        self._widths = widths   # tuples: Keras would wrap a list attribute
        self.cifar_stem = bool(cifar_stem)
        self.zero_init_residual = bool(zero_init_residual)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_uniform = bool(drop_path_uniform)
        self.expansion = EXPANSION[block]
        self.num_stages = len(depths)
        self.stem_channels = widths[0]
        self.stage_out_channels = tuple(w * self.expansion for w in widths)
        self.strides = (1,) + (2,) * (self.num_stages - 1)

        policy = self.dtype_policy
        # SSQL keeps the stem at 8 bits (weights and its output activation)
        kernel = 3 if self.cifar_stem else 7
        self.stem_conv = ElasticConv2D(self.in_channels, self.stem_channels, kernel,
                                       strides=1 if self.cifar_stem else 2,
                                       padding=kernel // 2, weight_bits=8, dtype=policy,
                                       name="stem_conv")
        self.stem_norm = _batch_norm(self.bn_momentum, self.bn_epsilon, 1.0, policy,
                                     "stem_norm")
        self.stem_quant = ActivationQuantizer(8, dtype=policy, name="stem_quant")
        total = sum(depths)
        rates = ([self.drop_path_rate] * total if self.drop_path_uniform
                 else [float(r) for r in np.linspace(0.0, self.drop_path_rate, total)])
        block_class = _BLOCK_CLASSES[block]
        self.blocks = []
        offsets = []   # index in self.blocks of each stage's first block
        in_ch = self.stem_channels
        for s in range(self.num_stages):
            offsets.append(len(self.blocks))
            for j in range(depths[s]):
                self.blocks.append(block_class(
                    in_ch, widths[s], strides=self.strides[s] if j == 0 else 1,
                    drop_path=rates[len(self.blocks)],
                    zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon, dtype=policy, name=f"stage{s + 1}_block{j}"))
                in_ch = self.stage_out_channels[s]
        self.stage_offsets = tuple(offsets)
        self.build()

    def build(self, input_shape=None):
        self.stem_conv.build()
        self.stem_norm.build((None, None, None, self.stem_channels))
        self.stem_quant.build()
        for block in self.blocks:
            block.build()
        self.built = True

    @property
    def widths(self):
        """Channels of each stage's blocks (a bottleneck's mid width)."""
        return list(self._widths)

    # -- the family's hooks --------------------------------------------------------------------
    def feature_dim(self, subnet=None):
        """Channels of ``cls`` / ``pooled``: the last stage's output (512 for ResNet-18 / 34,
        2048 for ResNet-50)."""
        self.resolve_subnet(subnet)
        return self.stage_out_channels[-1]

    def block_ids(self, subnet=None):
        """Per stage, the indices of its blocks (all of them: the family is not elastic)."""
        self.resolve_subnet(subnet)
        return [list(range(d)) for d in self.depths]

    def layer_id(self, path):
        """Layer id of a variable for layer-wise lr decay (``ElasticResNet``'s rule): 0 = the
        stem, ``sum(depths[:s]) + j + 1`` = block j of stage s (its shortcut included)."""
        return resnet_layer_id(path, self.depths, _STEM_PARTS, self.name)

    @property
    def max_layer_id(self):
        """``sum(depths)``: the last block gets the multiplier 1 (no final norm)."""
        return sum(self.depths)

    def subnet_params(self, subnet=None):
        """The number of weights, BatchNorm moving statistics included (= ``count_params()``;
        ``trainable_params()`` without them), counted from the configuration (an ``unbuilt``
        instance answers too)."""
        self.resolve_subnet(subnet)
        trainable, statistics = self._param_counts()
        return trainable + statistics

    def trainable_params(self):
        """The number of trainable weights (torchvision's count without the fc layer:
        11,176,512 for ResNet-18, 23,508,032 for ResNet-50)."""
        return self._param_counts()[0]

    def _param_counts(self):
        """(trainable weights, BatchNorm moving statistics): a BN has 2 of each per channel."""
        k = 3 if self.cifar_stem else 7
        convs = k * k * self.in_channels * self.stem_channels
        norms = self.stem_channels
        in_ch = self.stem_channels
        for s, depth in enumerate(self.depths):
            w, out = self._widths[s], self.stage_out_channels[s]
            for j in range(depth):
                c_in = in_ch if j == 0 else out
                if self.block == "basic":
                    convs += 9 * c_in * w + 9 * w * w
                    norms += 2 * w
                else:
                    convs += c_in * w + 9 * w * w + w * out
                    norms += 2 * w + out
                if j == 0 and (self.strides[s] != 1 or c_in != out):
                    convs += c_in * out
                    norms += out
            in_ch = out
        return int(convs + 2 * norms), int(2 * norms)

    def subnet_flops(self, spec=None, image_size=None, include_norms=False, breakdown=False):
        """Analytic forward FLOPs of one image (``spec``: None or the intact spec).

        Convention (as ``ElasticResNet.subnet_flops``): a multiply-add counts as 2 FLOPs; a
        k x k conv from C_in to C_out channels with an H' x W' output costs 2 H' W' k^2 C_in
        C_out; sizes follow floor((H + 2p - k) / s) + 1. Terms: ``stem``, and over the blocks
        ``conv1``, ``conv2``, ``conv3`` (bottlenecks only; a BasicBlock's two 3 x 3 convs are
        conv1 and conv2) and ``downsample`` (the 1 x 1/s shortcut convs). With
        ``include_norms``, ``norms``: 2 FLOPs per normalised element (an inference BatchNorm is
        one per-channel multiply-add once its statistics are folded). Not counted: ReLU, max
        pool, residual adds, the global average pool. (ResNet-18 at 224: 1.82 G multiply-adds,
        ResNet-50: 4.09 G; the fc layer excluded.)

        Args:
            spec: None or ``IntactSubnet()``.
            image_size: an int or (height, width); default the configuration's ``image_size``.
            include_norms: also count the BatchNorms.
            breakdown: return a dict of the terms and their ``total`` instead of an int.
        """
        self.resolve_subnet(spec)
        h, w = self.flops_image_hw(image_size)
        terms = dict(stem=0, conv1=0, conv2=0, conv3=0, downsample=0, norms=0)
        k, stride = (3, 1) if self.cifar_stem else (7, 2)
        h, w = conv_output_size(h, k, stride, k // 2), conv_output_size(w, k, stride, k // 2)
        terms["stem"] = 2 * h * w * k * k * self.in_channels * self.stem_channels
        terms["norms"] += 2 * h * w * self.stem_channels
        if not self.cifar_stem:
            h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        in_ch = self.stem_channels
        for s, depth in enumerate(self.depths):
            mid, out = self._widths[s], self.stage_out_channels[s]
            for j in range(depth):
                c_in = in_ch if j == 0 else out
                stride = self.strides[s] if j == 0 else 1
                ho, wo = conv_output_size(h, 3, stride, 1), conv_output_size(w, 3, stride, 1)
                if self.block == "basic":
                    terms["conv1"] += 2 * ho * wo * 9 * c_in * mid
                    terms["conv2"] += 2 * ho * wo * 9 * mid * mid
                    terms["norms"] += 2 * ho * wo * 2 * mid
                else:
                    terms["conv1"] += 2 * h * w * c_in * mid
                    terms["conv2"] += 2 * ho * wo * 9 * mid * mid
                    terms["conv3"] += 2 * ho * wo * mid * out
                    terms["norms"] += 2 * (h * w * mid + ho * wo * (mid + out))
                if j == 0 and (stride != 1 or c_in != out):
                    terms["downsample"] += 2 * ho * wo * c_in * out
                    terms["norms"] += 2 * ho * wo * out
                h, w = ho, wo
            in_ch = out
        if self.block == "basic":
            del terms["conv3"]
        if not include_norms:
            del terms["norms"]
        return self._flops_total(terms, breakdown)

    # -- forward -------------------------------------------------------------------------------
    def _check_images(self, images):
        self._check_image_sizes(images)

    def stem(self, images, training=None):
        """conv -> BatchNorm -> ReLU -> [8-bit quantizer] (-> 3 x 3/2 max pool, padding 1):
        (B, H, W, in_channels) -> (B, H / 4, W / 4, widths[0]) with the ImageNet stem (sizes
        rounded up), (B, H, W, widths[0]) with the CIFAR stem."""
        x = ops.relu(self.stem_norm(self.stem_conv(images), training=training))
        if current_quant() is not None:
            x = self.stem_quant(x)
        if self.cifar_stem:
            return x
        # zero padding equals PyTorch's -inf padding here: the input is >= 0 after the ReLU
        # (and after the quantizer, whose grid holds 0 and nothing below the ReLU's minimum)
        x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        return ops.max_pool(x, pool_size=3, strides=2, padding="valid")

    def call(self, images, subnet=None, training=None, masks=None, return_feature_maps=False,
             quant=None):
        with self.quantization(quant, training):
            return self._forward(images, subnet, training, masks, return_feature_maps)

    def _forward(self, images, subnet, training, masks, return_feature_maps):
        self.reject_masks(masks)
        self.resolve_subnet(subnet)
        self._check_images(images)
        x = self.stem(images, training)
        maps = []
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                x = self.blocks[self.stage_offsets[s] + j](x, training=training)
            maps.append(x)
        pooled = ops.mean(x, axis=(1, 2))
        return self.feature_outputs(pooled, maps, return_feature_maps)

    def layer_representations(self, images, subnet=None):
        """The tensors the layer-wise analysis (``eval/analysis.py``, CKA) compares, in depth
        order, in inference mode (BatchNorm with its moving statistics) and in float (outside
        any fake quantization): ``{"stem": ...}``, the stem's output (after its max pool, if
        any), then ``{"stage_{s}_block_{j}": (B, H_s, W_s, C_s)}``, every block's output map
        (s, j from 0; the last one's mean is the ``pooled`` feature). ``subnet``: None or the
        intact spec. The same computation as the call; the default call is unchanged."""
        with self.quantization(None, False):
            self.resolve_subnet(subnet)
            self._check_images(images)
            x = self.stem(images, training=False)
            found = {"stem": x}
            for s, depth in enumerate(self.depths):
                for j in range(depth):
                    x = self.blocks[self.stage_offsets[s] + j](x, training=False)
                    found[f"stage_{s}_block_{j}"] = x
            return found

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, in_channels=self.in_channels, block=self.block,
            depths=list(self.depths), widths=list(self._widths), cifar_stem=self.cifar_stem,
            zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, drop_path_rate=self.drop_path_rate,
            drop_path_uniform=self.drop_path_uniform)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

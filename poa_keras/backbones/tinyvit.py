"""TinyViT (Wu et al., ECCV 2022; microsoft/Cream/TinyViT ``models/tiny_vit.py``): a
non-elastic hybrid of MBConv and window-attention stages (REFERENCE.md §4).

Layout (channels-last maps (B, H, W, C) throughout; every "conv + BN" is a ``TinyViTConvBN``:
a bias-free conv followed by a BatchNorm, eps 1e-5; GELU is the exact erf GELU):

* stem (``patch_embed``): 3 x 3/2 conv (C0 / 2) + BN -> GELU -> 3 x 3/2 conv (C0) + BN,
  padding 1: (B, H, W, 3) -> (B, ceil(H / 4), ceil(W / 4), C0);
* stage 0: ``depths[0]`` MBConv blocks: 1 x 1 (4 C) + BN -> GELU -> depthwise 3 x 3 + BN ->
  GELU -> 1 x 1 (C) + BN (its gamma initialised to 0) -> drop path -> + shortcut -> GELU;
* stages 1..: window-attention blocks (``TinyViTBlock``)::

      x = x + drop_path(window_attention(x))     # LayerNorm inside the attention
      x = local_conv(x)                          # depthwise 3 x 3 + BN, no residual
      x = x + drop_path(mlp(x))                  # LayerNorm, fc1, GELU, fc2

  The windows (``window_sizes[i]`` tokens a side) are not shifted; a map whose sides are not
  multiples of the window is zero-padded at the bottom / right, attended WITHOUT a mask (the
  padded tokens go through the LayerNorm and take part in every window's softmax, as in the
  reference) and cropped back. Attention: qkv laid out per head as [q | k | v], head dim =
  dim / heads (32 in the published models), scale head_dim^-0.5, plus a LeViT-style bias
  table ``attention_biases`` (heads, M * M) gathered by the offsets (|dy|, |dx|) of the two
  tokens (index |dy| M + |dx|; ``attention_bias_index``);
* patch merging (``downsample``) at the end of every stage but the last: 1 x 1 + BN -> GELU ->
  depthwise 3 x 3/2 + BN -> GELU -> 1 x 1 + BN: (B, H, W, C_i) -> (B, ceil(H/2), ceil(W/2),
  C_{i+1});
* feature: the mean of the last stage's tokens -> LayerNorm (``norm_head``): ``cls`` and
  ``pooled``. The reference's classifier (``head``, a Linear) is ``ImageClassifier``'s Dense.

Any image size works (no size has to be a multiple of anything: the convs round up and the
windows pad); the published models are trained at 224 (windows 7, 7, 14, 7: no padding) and
fine-tuned at 384 / 512 with larger windows (``window_sizes``).

Weights and the official state dict (``ckpt["model"]``; drop ``*attention_bias_idxs``), one to
one. Keras paths are below the model's name; torch conv kernels (out, in, k, k) are Keras
(k, k, in, out), depthwise (C, 1, k, k) are (k, k, C, 1), Linear weights are transposed;
a BN's ``weight, bias, running_mean, running_var`` are ``gamma, beta, moving_mean,
moving_variance``; a LayerNorm's ``weight, bias`` are ``gamma, beta``::

    patch_embed.seq.{0,2}.c.weight         patch_embed_seq_{0,2}/c/conv/kernel
    patch_embed.seq.{0,2}.bn.*             patch_embed_seq_{0,2}/bn/*
    layers.0.blocks.j.conv{1,3}.c.weight   layers_0_blocks_j/conv{1,3}/c/dense/kernel (1 x 1)
    layers.0.blocks.j.conv2.c.weight       layers_0_blocks_j/conv2/c/kernel (depthwise)
    layers.0.blocks.j.conv{1,2,3}.bn.*     layers_0_blocks_j/conv{1,2,3}/bn/*
    layers.i.downsample.conv{1,3}.c.weight layers_i_downsample/conv{1,3}/c/dense/kernel
    layers.i.downsample.conv2.c.weight     layers_i_downsample/conv2/c/kernel (depthwise)
    layers.i.downsample.conv{1,2,3}.bn.*   layers_i_downsample/conv{1,2,3}/bn/*
    layers.i.blocks.j.attn.norm.*          layers_i_blocks_j/attn/norm/*
    layers.i.blocks.j.attn.{qkv,proj}.*    layers_i_blocks_j/attn/{qkv,proj}/dense/{kernel,bias}
    layers.i.blocks.j.attn.attention_biases  layers_i_blocks_j/attn/attention_biases (same shape)
    layers.i.blocks.j.local_conv.c.weight  layers_i_blocks_j/local_conv/c/kernel (depthwise)
    layers.i.blocks.j.local_conv.bn.*      layers_i_blocks_j/local_conv/bn/*
    layers.i.blocks.j.mlp.{norm,fc1,fc2}.* layers_i_blocks_j/mlp/{norm,fc1,fc2}/...
    norm_head.*                            norm_head/*
    head.{weight,bias}                     ImageClassifier's head (Dense)

The qkv rows need no reordering: the reference's ``qkv(x).view(B, N, heads, -1)`` split as
[q | k | v] per head is exactly the (heads, 3, head_dim) order used here.

Not elastic (``IntactSubnet()`` is its one spec): see docs/families.md for what an elastic
TinyViT would take. 1 x 1 convs and linears are ``ElasticDense`` layers (plain Keras ``Dense``
inside), so ``model.quantize("int8")`` quantizes them; the 3 x 3 and depthwise convs stay float
(Keras 3 has no int8 convolution).
"""
from __future__ import annotations

import math
import re

import keras
import numpy as np
from keras import ops

from poa_keras.backbones.base import (NonElasticBackbone, check_bn_momentum,
                                      check_drop_path_rate)
from poa_keras.elastic.conv import ElasticConv2D, conv_output_size
from poa_keras.elastic.layers import ElasticDense, HostInitializer, StochasticDepth, trunc_normal
from poa_keras.elastic.window import window_partition, window_reverse
from poa_keras.validation import image_hw, positive_ints

_DEPTHS = (2, 2, 6, 2)
_LAYER_PART = re.compile(r"layers_(\d+)_(?:blocks_(\d+)|downsample)")
_WINDOWS_224 = (7, 7, 14, 7)

CONFIGS = {
    # The published models at 224 px (stage 0's window and heads are unused: an MBConv stage).
    "tinyvit_5m": dict(image_size=224, embed_dims=(64, 128, 160, 320), depths=_DEPTHS,
                       num_heads=(2, 4, 5, 10), window_sizes=_WINDOWS_224),
    "tinyvit_11m": dict(image_size=224, embed_dims=(64, 128, 256, 448), depths=_DEPTHS,
                        num_heads=(2, 4, 8, 14), window_sizes=_WINDOWS_224),
    "tinyvit_21m": dict(image_size=224, embed_dims=(96, 192, 384, 576), depths=_DEPTHS,
                        num_heads=(3, 6, 12, 18), window_sizes=_WINDOWS_224),
    # Tiny, for tests: 32 px images give maps of 8, 4, 2, 1 tokens a side; windows of 3 pad
    # stage 1 (4 -> 6, four windows) and stage 2 (2 -> 3, one window), the 2-window pads
    # stage 3's single token (1 -> 2).
    "tinyvit_test": dict(image_size=32, embed_dims=(8, 16, 16, 24), depths=(1, 1, 2, 1),
                         num_heads=(1, 2, 2, 3), window_sizes=(3, 3, 3, 2)),
}

EXPECTED_PARAMS = {   # trainable parameters with a 1000-class head (the official models)
    "tinyvit_5m": 5_392_764, "tinyvit_11m": 10_996_972, "tinyvit_21m": 21_198_568,
}


def gelu(x):
    """The exact (erf) GELU of the reference (Keras' default is the tanh approximation)."""
    return ops.gelu(x, approximate=False)


def attention_bias_index(window_size):
    """(M*M, M*M) int32: for the tokens p, q of an M x M window (row-major), the column of the
    bias table ``attention_biases`` (heads, M*M) their score gets: |dy| M + |dx| (the order in
    which the reference's offset dictionary first meets the offsets, from token (0, 0))."""
    m = int(window_size)
    ys, xs = np.divmod(np.arange(m * m), m)
    return (np.abs(ys[:, None] - ys[None, :]) * m
            + np.abs(xs[:, None] - xs[None, :])).astype("int32")


def _depthwise_by_taps():
    """Whether depthwise convs run as a sum of shifted products (``depthwise_taps``): on JAX's
    CPU backend, where XLA's grouped convolution is 10-30 times slower (32 x 32 maps, 128
    channels: 13 ms vs 0.4 ms forward, 83 ms vs 7 ms with the gradient)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def depthwise_taps(x, kernel, strides):
    """A depthwise k x k conv without padding (the input padded already): (B, H, W, C) and a
    kernel (k, k, C, 1) -> (B, (H - k) // s + 1, (W - k) // s + 1, C), as the sum over the k^2
    taps of the strided shifted input times that tap's per-channel weight. Backend-native
    strided slicing (JAX, TensorFlow, PyTorch tensors alike)."""
    k = int(kernel.shape[0])
    height, width = int(x.shape[1]), int(x.shape[2])
    rows, cols = (height - k) // strides + 1, (width - k) // strides + 1
    kernel = ops.cast(kernel, x.dtype)
    out = None
    for dy in range(k):
        for dx in range(k):
            tap = x[:, dy:dy + strides * (rows - 1) + 1:strides,
                    dx:dx + strides * (cols - 1) + 1:strides, :] * kernel[dy, dx, :, 0]
            out = tap if out is None else out + tap
    return out


def _torch_default_conv_init(fan_in):
    # the variance of PyTorch's default conv init (uniform, bound 1 / sqrt(fan_in)), drawn on
    # the host (the reference re-initialises only its Linear and LayerNorm layers)
    return HostInitializer("normal", stddev=math.sqrt(1.0 / (3.0 * fan_in)))


def _layer_norm(epsilon, policy, name):
    return keras.layers.LayerNormalization(
        epsilon=epsilon, gamma_initializer=HostInitializer("ones"),
        beta_initializer=HostInitializer("zeros"), dtype=policy, name=name)


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTConvBN(keras.layers.Layer):
    """The reference's ``Conv2d_BN``: a bias-free conv ``c`` then a BatchNorm ``bn``.

    ``kernel_size`` 1: a dense layer on the channel axis (``ElasticDense``, int8-quantizable);
    ``depthwise``: a depthwise k x k conv (``filters == in_channels``); else a full k x k conv.
    Padding k // 2 on every side (PyTorch's). (B, H, W, in_channels) -> (B, H', W', filters),
    H' = floor((H + 2 (k // 2) - k) / s) + 1. ``bn_gamma``: the BN's initial scale.
    """

    def __init__(self, in_channels, filters, kernel_size=1, strides=1, depthwise=False,
                 bn_gamma=1.0, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.in_channels, self.filters = int(in_channels), int(filters)
        self.kernel_size, self.strides = int(kernel_size), int(strides)
        self.depthwise = bool(depthwise)
        self.bn_gamma, self.bn_momentum = float(bn_gamma), float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.padding = self.kernel_size // 2
        policy = self.dtype_policy
        k = self.kernel_size
        if self.depthwise:
            if self.filters != self.in_channels:
                raise ValueError(f"{self.name}: a depthwise conv keeps the channels "
                                 f"({self.in_channels}), got filters={self.filters}")
            self.c = keras.layers.DepthwiseConv2D(
                k, strides=self.strides, padding="valid", use_bias=False,
                depthwise_initializer=_torch_default_conv_init(k * k), dtype=policy, name="c")
        elif k == 1:
            if self.strides != 1:
                raise ValueError(f"{self.name}: a 1 x 1 conv here has stride 1, got "
                                 f"{self.strides}")
            self.c = ElasticDense(self.in_channels, self.filters, use_bias=False,
                                  kernel_initializer=_torch_default_conv_init(self.in_channels),
                                  dtype=policy, name="c")
        else:
            self.c = ElasticConv2D(self.in_channels, self.filters, k, strides=self.strides,
                                   padding=self.padding,
                                   kernel_initializer=_torch_default_conv_init(
                                       k * k * self.in_channels),
                                   dtype=policy, name="c")
        self.bn = keras.layers.BatchNormalization(
            axis=-1, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            gamma_initializer=HostInitializer("constant", value=self.bn_gamma),
            beta_initializer=HostInitializer("zeros"), dtype=policy, name="bn")

    def build(self, input_shape=None):
        if self.depthwise:
            self.c.build((None, None, None, self.in_channels))
        else:
            self.c.build()
        self.bn.build((None, None, None, self.filters))

    def call(self, x, training=None):
        if self.depthwise and self.padding:
            p = self.padding
            x = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        if self.depthwise and _depthwise_by_taps():
            y = depthwise_taps(x, ops.convert_to_tensor(self.c.kernel), self.strides)
        else:
            y = self.c(x)
        return self.bn(y, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(in_channels=self.in_channels, filters=self.filters,
                      kernel_size=self.kernel_size, strides=self.strides,
                      depthwise=self.depthwise, bn_gamma=self.bn_gamma,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        return config


class _ConvBNStack(keras.layers.Layer):
    """What MBConv and patch merging share: ``conv1`` 1 x 1 -> GELU -> ``conv2`` depthwise
    3 x 3 (stride s) -> GELU -> ``conv3`` 1 x 1, each conv + BN."""

    def __init__(self, in_channels, hidden, out_channels, strides, last_gamma, bn_momentum,
                 bn_epsilon, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        bn = dict(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=policy)
        self.conv1 = TinyViTConvBN(in_channels, hidden, 1, name="conv1", **bn)
        self.conv2 = TinyViTConvBN(hidden, hidden, 3, strides, depthwise=True, name="conv2",
                                   **bn)
        self.conv3 = TinyViTConvBN(hidden, out_channels, 1, bn_gamma=last_gamma, name="conv3",
                                   **bn)

    def build(self, input_shape=None):
        for conv in (self.conv1, self.conv2, self.conv3):
            conv.build()

    def stack(self, x, training):
        x = gelu(self.conv1(x, training=training))
        x = gelu(self.conv2(x, training=training))
        return self.conv3(x, training=training)


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTMBConv(_ConvBNStack):
    """Stage-0 block: gelu(drop_path(conv3(gelu(conv2(gelu(conv1(x)))))) + x); the hidden
    width is ``expand_ratio`` x dim and conv3's BN scale starts at 0. (B, H, W, dim) in and
    out."""

    def __init__(self, dim, expand_ratio=4.0, drop_path=0.0, bn_momentum=0.9, bn_epsilon=1e-5,
                 **kwargs):
        self.dim, self.expand_ratio = int(dim), float(expand_ratio)
        self.drop_path_rate = float(drop_path)
        self.bn_momentum, self.bn_epsilon = float(bn_momentum), float(bn_epsilon)
        super().__init__(self.dim, int(self.dim * self.expand_ratio), self.dim, 1, 0.0,
                         self.bn_momentum, self.bn_epsilon, **kwargs)
        self.drop_path = StochasticDepth(self.drop_path_rate, dtype=self.dtype_policy,
                                         name="drop_path")

    def build(self, input_shape=None):
        super().build()
        self.drop_path.build(None)

    def call(self, x, training=None):
        y = self.stack(x, training)
        return gelu(self.drop_path(y, training=training) + x)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, expand_ratio=self.expand_ratio,
                      drop_path=self.drop_path_rate, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTPatchMerging(_ConvBNStack):
    """(B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim): conv1 1 x 1 -> GELU ->
    depthwise 3 x 3/2 -> GELU -> conv3 1 x 1 (each + BN)."""

    def __init__(self, dim, out_dim, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        self.dim, self.out_dim = int(dim), int(out_dim)
        self.bn_momentum, self.bn_epsilon = float(bn_momentum), float(bn_epsilon)
        super().__init__(self.dim, self.out_dim, self.out_dim, 2, 1.0, self.bn_momentum,
                         self.bn_epsilon, **kwargs)

    def call(self, x, training=None):
        return self.stack(x, training)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, out_dim=self.out_dim, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTAttention(keras.layers.Layer):
    """Attention inside (B', M*M, dim) windows: LayerNorm ``norm`` -> ``qkv`` (per head
    [q | k | v]) -> softmax(q kᵀ scale + attention_biases[:, index]) v -> ``proj``."""

    def __init__(self, dim, num_heads, window_size, norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.window_size, self.norm_epsilon = int(window_size), float(norm_epsilon)
        self.head_dim = self.dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        policy = self.dtype_policy
        self.norm = _layer_norm(self.norm_epsilon, policy, "norm")
        self.qkv = ElasticDense(self.dim, 3 * self.dim, kernel_initializer=trunc_normal(),
                                dtype=policy, name="qkv")
        self.proj = ElasticDense(self.dim, self.dim, kernel_initializer=trunc_normal(),
                                 dtype=policy, name="proj")
        self.bias_index = attention_bias_index(self.window_size).reshape(-1)

    def build(self, input_shape=None):
        self.norm.build((None, self.dim))
        self.qkv.build()
        self.proj.build()
        self.attention_biases = self.add_weight(
            shape=(self.num_heads, self.window_size ** 2), initializer=HostInitializer("zeros"),
            name="attention_biases")

    def bias(self):
        """(heads, M*M, M*M): the bias table gathered by the tokens' offsets."""
        n = self.window_size ** 2
        table = ops.take(self.attention_biases, ops.convert_to_tensor(self.bias_index), axis=1)
        return ops.reshape(table, (self.num_heads, n, n))

    def call(self, x):
        n = x.shape[1]
        qkv = ops.reshape(self.qkv(self.norm(x)), (-1, n, self.num_heads, 3, self.head_dim))
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        scores = ops.einsum("bqhd,bkhd->bhqk", q, k) * ops.cast(self.scale, q.dtype)
        scores = scores + ops.cast(self.bias(), scores.dtype)[None]
        attn = ops.softmax(scores, axis=-1)
        y = ops.reshape(ops.einsum("bhqk,bkhd->bqhd", attn, v), (-1, n, self.dim))
        return self.proj(y)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
                      norm_epsilon=self.norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTMLP(keras.layers.Layer):
    """LayerNorm ``norm`` -> ``fc1`` -> GELU -> ``fc2`` on (..., dim)."""

    def __init__(self, dim, mlp_ratio=4.0, norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.mlp_ratio = int(dim), float(mlp_ratio)
        self.norm_epsilon = float(norm_epsilon)
        self.hidden = int(self.dim * self.mlp_ratio)
        policy = self.dtype_policy
        self.norm = _layer_norm(self.norm_epsilon, policy, "norm")
        self.fc1 = ElasticDense(self.dim, self.hidden, kernel_initializer=trunc_normal(),
                                dtype=policy, name="fc1")
        self.fc2 = ElasticDense(self.hidden, self.dim, kernel_initializer=trunc_normal(),
                                dtype=policy, name="fc2")

    def build(self, input_shape=None):
        self.norm.build((None, self.dim))
        self.fc1.build()
        self.fc2.build()

    def call(self, x):
        return self.fc2(gelu(self.fc1(self.norm(x))))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, mlp_ratio=self.mlp_ratio, norm_epsilon=self.norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViTBlock(keras.layers.Layer):
    """Window-attention block on a (B, H, W, dim) map (any H, W; see the module docstring):
    x + drop_path(attn(windows(x))), then ``local_conv`` (depthwise 3 x 3 + BN, no residual),
    then x + drop_path(mlp(x))."""

    def __init__(self, dim, num_heads, window_size, mlp_ratio=4.0, drop_path=0.0,
                 norm_epsilon=1e-5, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.window_size = int(dim), int(num_heads), int(window_size)
        self.mlp_ratio, self.drop_path_rate = float(mlp_ratio), float(drop_path)
        self.norm_epsilon = float(norm_epsilon)
        self.bn_momentum, self.bn_epsilon = float(bn_momentum), float(bn_epsilon)
        policy = self.dtype_policy
        self.attn = TinyViTAttention(self.dim, self.num_heads, self.window_size,
                                     self.norm_epsilon, dtype=policy, name="attn")
        self.drop_path = StochasticDepth(self.drop_path_rate, dtype=policy, name="drop_path")
        self.local_conv = TinyViTConvBN(self.dim, self.dim, 3, depthwise=True,
                                        bn_momentum=self.bn_momentum,
                                        bn_epsilon=self.bn_epsilon, dtype=policy,
                                        name="local_conv")
        self.mlp = TinyViTMLP(self.dim, self.mlp_ratio, self.norm_epsilon, dtype=policy,
                              name="mlp")

    def build(self, input_shape=None):
        self.attn.build()
        self.drop_path.build(None)
        self.local_conv.build()
        self.mlp.build()

    def windowed_attention(self, x):
        """Zero-pad to multiples of the window, attend in every window (no mask), crop."""
        _, h, w, _ = x.shape
        m = self.window_size
        pad_b, pad_r = (-h) % m, (-w) % m
        if pad_b or pad_r:
            x = ops.pad(x, [[0, 0], [0, pad_b], [0, pad_r], [0, 0]])
        y = window_reverse(self.attn(window_partition(x, m)), m, h + pad_b, w + pad_r)
        return y[:, :h, :w] if (pad_b or pad_r) else y

    def call(self, x, training=None):
        noise = [self.drop_path.noise(x, training) for _ in range(2)]
        x = x + self.drop_path.apply(self.windowed_attention(x), noise[0])
        x = self.local_conv(x, training=training)
        return x + self.drop_path.apply(self.mlp(x), noise[1])

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
                      mlp_ratio=self.mlp_ratio, drop_path=self.drop_path_rate,
                      norm_epsilon=self.norm_epsilon, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class TinyViT(NonElasticBackbone):
    """TinyViT (see the module docstring): one size, no slicing.

    Args:
        image_size: the training resolution (default preprocessing and FLOPs); any input size
            works.
        in_channels: image channels.
        embed_dims: channels of each stage (the stem outputs ``embed_dims[0]``).
        depths: blocks per stage (stage 0: MBConv blocks; the others: attention blocks).
        num_heads: attention heads per stage (``embed_dims[i]`` must be a multiple; stage 0's
            entry is unused, as in the reference's configurations).
        window_sizes: window side per stage (stage 0's entry is unused).
        mlp_ratio: the attention blocks' MLP hidden width / dim (4).
        mbconv_expand_ratio: the MBConv hidden width / dim (4).
        drop_path_rate: stochastic depth, rising linearly from 0 over all the blocks (the
            reference), or the same for every block if ``drop_path_uniform``.
        bn_momentum: Keras' momentum of the BatchNorm statistics (0.9 is PyTorch's 0.1).
        bn_epsilon, norm_epsilon: BatchNorm and LayerNorm epsilon (1e-5).
        preprocessing: see ``Backbone``.

    Call: ``model(images, subnet=None, training=None, return_feature_maps=False)`` with float
    images (B, H, W, in_channels) (static H, W). Returns ``{"cls": (B, C), "pooled": (B, C)}``
    (C = ``embed_dims[-1]``: the LayerNorm of the last stage's token mean) and with
    ``return_feature_maps`` ``"feature_maps"``: each stage's output before its patch merging,
    a list of (B, H_i, W_i, embed_dims[i]).
    """

    configs = CONFIGS
    family = "TinyViT"
    supports_masks = False

    def __init__(self, image_size=224, in_channels=3, embed_dims=(64, 128, 160, 320),
                 depths=_DEPTHS, num_heads=(2, 4, 5, 10), window_sizes=_WINDOWS_224,
                 mlp_ratio=4.0, mbconv_expand_ratio=4.0, drop_path_rate=0.0,
                 drop_path_uniform=False, bn_momentum=0.9, bn_epsilon=1e-5, norm_epsilon=1e-5,
                 **kwargs):
        super().__init__(**kwargs)
        embed_dims = positive_ints(embed_dims, "embed_dims")
        depths = positive_ints(depths, "depths")
        num_heads = positive_ints(num_heads, "num_heads")
        window_sizes = positive_ints(window_sizes, "window_sizes")
        lengths = {"embed_dims": embed_dims, "depths": depths, "num_heads": num_heads,
                   "window_sizes": window_sizes}
        if len(embed_dims) < 2 or len({len(v) for v in lengths.values()}) != 1:
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes need one entry per stage, at "
                "least 2 stages (an MBConv stage, then attention stages); got " + ", ".join(
                    f"{k}={v}" for k, v in lengths.items()))
        for i in range(1, len(embed_dims)):
            if embed_dims[i] % num_heads[i]:
                raise ValueError(f"embed_dims[{i}]={embed_dims[i]} is not a multiple of "
                                 f"num_heads[{i}]={num_heads[i]} (head dim = dim / heads)")
        if embed_dims[0] < 2:
            raise ValueError(f"embed_dims[0]={embed_dims[0]}: the stem's first conv has "
                             "embed_dims[0] // 2 channels, so it must be at least 2")
        for what, value in (("image_size", image_size), ("in_channels", in_channels)):
            if int(value) < 1:
                raise ValueError(f"{what} must be a positive int, got {value}")
        for what, value in (("mlp_ratio", mlp_ratio),
                            ("mbconv_expand_ratio", mbconv_expand_ratio),
                            ("bn_epsilon", bn_epsilon), ("norm_epsilon", norm_epsilon)):
            if not float(value) > 0.0:
                raise ValueError(f"{what} must be positive, got {value}")
        if not isinstance(drop_path_uniform, (bool, np.bool_)):
            raise ValueError(f"drop_path_uniform must be True or False, got "
                             f"{drop_path_uniform!r}")
        check_bn_momentum(bn_momentum)
        check_drop_path_rate(drop_path_rate)
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        self.embed_dims, self.depths = embed_dims, depths   # tuples (Keras wraps lists)
        self.num_heads, self.window_sizes = num_heads, window_sizes
        self.mlp_ratio, self.mbconv_expand_ratio = float(mlp_ratio), float(mbconv_expand_ratio)
        self.drop_path_rate, self.drop_path_uniform = float(drop_path_rate), \
            bool(drop_path_uniform)
        self.bn_momentum, self.bn_epsilon = float(bn_momentum), float(bn_epsilon)
        self.norm_epsilon = float(norm_epsilon)
        self.num_stages = len(embed_dims)

        policy = self.dtype_policy
        bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=policy)
        c0 = embed_dims[0]
        self.patch_embed = [
            TinyViTConvBN(self.in_channels, c0 // 2, 3, 2, name="patch_embed_seq_0", **bn),
            TinyViTConvBN(c0 // 2, c0, 3, 2, name="patch_embed_seq_2", **bn)]
        total = sum(depths)
        rates = ([self.drop_path_rate] * total if self.drop_path_uniform
                 else [float(r) for r in np.linspace(0.0, self.drop_path_rate, total)])
        self.blocks, self.downsamples = [], []   # flat lists (stage after stage)
        k = 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            blocks = self.blocks
            for j in range(depth):
                name = f"layers_{i}_blocks_{j}"
                if i == 0:
                    blocks.append(TinyViTMBConv(dim, self.mbconv_expand_ratio, rates[k],
                                                name=name, **bn))
                else:
                    blocks.append(TinyViTBlock(dim, num_heads[i], window_sizes[i],
                                               self.mlp_ratio, rates[k], self.norm_epsilon,
                                               name=name, **bn))
                k += 1
            if i + 1 < self.num_stages:
                self.downsamples.append(TinyViTPatchMerging(
                    dim, embed_dims[i + 1], name=f"layers_{i}_downsample", **bn))
        self.norm_head = _layer_norm(self.norm_epsilon, policy, "norm_head")
        self.build()

    def build(self, input_shape=None):
        for layer in self.patch_embed:
            layer.build()
        for layer in list(self.blocks) + list(self.downsamples):
            layer.build()
        self.norm_head.build((None, self.embed_dims[-1]))
        self.built = True

    def stage_blocks(self):
        """The blocks of each stage: a list per stage."""
        offsets = [int(o) for o in np.cumsum((0,) + self.depths)]
        return [self.blocks[offsets[i]:offsets[i + 1]] for i in range(self.num_stages)]

    # -- the family's hooks --------------------------------------------------------------------
    def feature_dim(self, subnet=None):
        """Channels of ``cls`` / ``pooled``: ``embed_dims[-1]`` (320 / 448 / 576)."""
        self.resolve_subnet(subnet)
        return self.embed_dims[-1]

    def block_ids(self, subnet=None):
        """Per stage, the indices of its blocks (all of them: the family is not elastic)."""
        self.resolve_subnet(subnet)
        return [list(range(d)) for d in self.depths]

    def layer_id(self, path):
        """Layer id of a variable for layer-wise lr decay, the reference's rule
        (``TinyViT.set_layer_lr_decay``, scales ``decay ** (sum(depths) - 1 - k)``): block k
        (counted over all stages from 0) has id k, the stem shares block 0's id, a patch
        merging the id of its stage's last block, ``norm_head`` (and a classifier head) the
        last block's, ``sum(depths) - 1``."""
        offsets = [int(o) for o in np.cumsum((0,) + self.depths)]
        for part in str(path).split("/"):
            if part.startswith("patch_embed_seq_"):
                return 0
            match = _LAYER_PART.fullmatch(part)
            if match:
                stage = int(match.group(1))
                if not 0 <= stage < self.num_stages:
                    raise ValueError(f"{path}: no stage {stage} in {self.name} "
                                     f"({self.num_stages} stages)")
                if match.group(2) is None:   # the downsample of this stage
                    return offsets[stage + 1] - 1
                block = int(match.group(2))
                if block >= self.depths[stage]:
                    raise ValueError(f"{path}: no block {block} in stage {stage} of "
                                     f"{self.name} (depths {self.depths})")
                return offsets[stage] + block
        return self.max_layer_id

    @property
    def max_layer_id(self):
        """``sum(depths) - 1``: the last block, ``norm_head`` and the head get the
        multiplier 1."""
        return sum(self.depths) - 1

    def _param_counts(self):
        """(trainable weights, BatchNorm moving statistics), from the configuration."""
        trainable, stats = 0, 0

        def conv_bn(c_in, c_out, k, depthwise=False):
            nonlocal trainable, stats
            trainable += (k * k * c_out if depthwise else k * k * c_in * c_out) + 2 * c_out
            stats += 2 * c_out

        def layer_norm(c):
            nonlocal trainable
            trainable += 2 * c

        c0 = self.embed_dims[0]
        conv_bn(self.in_channels, c0 // 2, 3)
        conv_bn(c0 // 2, c0, 3)
        for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
            for _ in range(depth):
                if i == 0:
                    hidden = int(dim * self.mbconv_expand_ratio)
                    conv_bn(dim, hidden, 1)
                    conv_bn(hidden, hidden, 3, depthwise=True)
                    conv_bn(hidden, dim, 1)
                else:
                    hidden = int(dim * self.mlp_ratio)
                    layer_norm(dim)
                    trainable += dim * 3 * dim + 3 * dim + dim * dim + dim   # qkv, proj
                    trainable += self.num_heads[i] * self.window_sizes[i] ** 2
                    conv_bn(dim, dim, 3, depthwise=True)
                    layer_norm(dim)
                    trainable += dim * hidden + hidden + hidden * dim + dim   # fc1, fc2
            if i + 1 < self.num_stages:
                out = self.embed_dims[i + 1]
                conv_bn(dim, out, 1)
                conv_bn(out, out, 3, depthwise=True)
                conv_bn(out, out, 1)
        layer_norm(self.embed_dims[-1])
        return int(trainable), int(stats)

    def subnet_params(self, subnet=None):
        """The number of weights, BatchNorm moving statistics included (= ``count_params()``),
        counted from the configuration (an ``unbuilt`` instance answers too)."""
        self.resolve_subnet(subnet)
        return sum(self._param_counts())

    def trainable_params(self, num_classes=None):
        """Trainable weights from the configuration; with ``num_classes`` plus a Linear
        classifier on the feature (the reference's count: 5,392,764 / 10,996,972 /
        21,198,568 for the 5M / 11M / 21M models with 1000 classes)."""
        count = self._param_counts()[0]
        if num_classes is not None:
            count += (self.embed_dims[-1] + 1) * int(num_classes)
        return count

    def stage_sizes(self, image_size=None):
        """[(H_i, W_i)] of every stage's token map for an image size (an int or (H, W);
        default ``image_size``): the stem's two 3 x 3/2 convs and each patch merging's
        3 x 3/2 conv round up."""
        h, w = image_hw(self.image_size if image_size is None else image_size)
        for _ in range(2):
            h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        sizes = [(h, w)]
        for _ in range(self.num_stages - 1):
            h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
            sizes.append((h, w))
        return sizes

    def subnet_flops(self, spec=None, image_size=None, include_norms=False, breakdown=False):
        """Analytic forward FLOPs of one image (``spec``: None or the intact spec).

        Convention (as the other families): a multiply-add counts as 2 FLOPs; a k x k conv
        (depthwise: one input channel per output) from C_in to C_out channels with an H' x W'
        output costs 2 H' W' k^2 C_in C_out. Terms: ``stem`` (its two convs), ``mbconv`` (the
        three convs of every MBConv block), ``qkv``: 2 Lp c (3c), ``attn_scores``: 2 Lp N c,
        ``attn_values``: 2 Lp N c, ``proj``: 2 Lp c^2 (Lp: the tokens of the padded map, N =
        M^2 per window), ``local_conv``: 2 L 9 c, ``mlp``: 2 L c h 2, ``merge``: the three
        convs of every patch merging. With ``include_norms``, ``norms``: 2 FLOPs per
        BatchNorm element (one multiply-add once folded) and 7 per LayerNorm element (the
        padded tokens of the attention's norm included). Not counted: GELU, softmax, the bias
        table add, residual adds, the token mean, padding. (At 224: 1.25 / 2.02 / 4.25 G
        multiply-adds for the 5M / 11M / 21M models; the paper's MACs: 1.3 / 2.0 / 4.3 G.)

        Args:
            spec: None or ``IntactSubnet()``.
            image_size: an int or (height, width); default the configuration's ``image_size``.
            include_norms: also count the norms.
            breakdown: return a dict of the terms and their ``total`` instead of an int.
        """
        self.resolve_subnet(spec)
        h, w = self.flops_image_hw(image_size)
        sizes = self.stage_sizes((h, w))
        terms = dict.fromkeys(("stem", "mbconv", "qkv", "attn_scores", "attn_values", "proj",
                               "local_conv", "mlp", "merge", "norms"), 0)
        c0 = self.embed_dims[0]
        h1, w1 = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        l1, l0 = h1 * w1, sizes[0][0] * sizes[0][1]
        terms["stem"] = 2 * l1 * 9 * self.in_channels * (c0 // 2) + 2 * l0 * 9 * (c0 // 2) * c0
        terms["norms"] += 2 * (l1 * (c0 // 2) + l0 * c0)
        for i, (c, depth) in enumerate(zip(self.embed_dims, self.depths)):
            hi, wi = sizes[i]
            tokens = hi * wi
            if i == 0:
                hidden = int(c * self.mbconv_expand_ratio)
                terms["mbconv"] += depth * 2 * tokens * (c * hidden + 9 * hidden + hidden * c)
                terms["norms"] += depth * 2 * tokens * (2 * hidden + c)
            else:
                m = self.window_sizes[i]
                padded = math.ceil(hi / m) * m * math.ceil(wi / m) * m
                hidden = int(c * self.mlp_ratio)
                terms["qkv"] += depth * 2 * padded * c * 3 * c
                terms["attn_scores"] += depth * 2 * padded * m * m * c
                terms["attn_values"] += depth * 2 * padded * m * m * c
                terms["proj"] += depth * 2 * padded * c * c
                terms["local_conv"] += depth * 2 * tokens * 9 * c
                terms["mlp"] += depth * 2 * tokens * c * hidden * 2
                terms["norms"] += depth * (7 * padded * c + 2 * tokens * c + 7 * tokens * c)
            if i + 1 < self.num_stages:
                out = self.embed_dims[i + 1]
                ho, wo = sizes[i + 1]
                terms["merge"] += 2 * tokens * c * out + 2 * ho * wo * out * (9 + out)
                terms["norms"] += 2 * (tokens * out + 2 * ho * wo * out)
        terms["norms"] += 7 * self.embed_dims[-1]
        if not include_norms:
            del terms["norms"]
        return self._flops_total(terms, breakdown)

    # -- forward -------------------------------------------------------------------------------
    def _check_images(self, images):
        shape = self._check_rank_and_channels(images)
        for what, size in (("height", shape[1]), ("width", shape[2])):
            if size is None:
                raise ValueError(f"{self.name} ({type(self).__name__}) needs a static image "
                                 f"{what} (its windows are laid out for a known map size); "
                                 f"got shape {shape}")
            if size < 1:
                raise ValueError(f"image {what} {size} must be at least 1; got shape {shape}")

    def stem(self, images, training=None):
        x = gelu(self.patch_embed[0](images, training=training))
        return self.patch_embed[1](x, training=training)

    def call(self, images, subnet=None, training=None, masks=None, return_feature_maps=False):
        self.reject_masks(masks)
        self.resolve_subnet(subnet)
        self._check_images(images)
        x = self.stem(images, training)
        maps = []
        for i, blocks in enumerate(self.stage_blocks()):
            for block in blocks:
                x = block(x, training=training)
            maps.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x, training=training)
        pooled = self.norm_head(ops.mean(x, axis=(1, 2)))
        return self.feature_outputs(pooled, maps, return_feature_maps)

    def layer_representations(self, images, subnet=None):
        """In inference mode: ``{"stem": (B, H_0, W_0, C_0)}``, then
        ``{"stage_{i}_block_{j}": (B, H_i, W_i, C_i)}`` for every block (before the patch
        merging that ends its stage)."""
        self.resolve_subnet(subnet)
        self._check_images(images)
        x = self.stem(images, training=False)
        found = {"stem": x}
        for i, blocks in enumerate(self.stage_blocks()):
            for j, block in enumerate(blocks):
                x = block(x, training=False)
                found[f"stage_{i}_block_{j}"] = x
            if i < len(self.downsamples):
                x = self.downsamples[i](x, training=False)
        return found

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, in_channels=self.in_channels,
            embed_dims=list(self.embed_dims), depths=list(self.depths),
            num_heads=list(self.num_heads), window_sizes=list(self.window_sizes),
            mlp_ratio=self.mlp_ratio, mbconv_expand_ratio=self.mbconv_expand_ratio,
            drop_path_rate=self.drop_path_rate, drop_path_uniform=self.drop_path_uniform,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            norm_epsilon=self.norm_epsilon)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

"""Elastic convolutional layers: a k x k convolution, GroupNorm and the ResNet bottleneck block.

The same two forwards as ``elastic/layers.py``:

* ``layer(x)``: the plain full layer (ordinary Keras ``Conv2D`` / ``Dense`` /
  ``GroupNormalization``), the only path an extracted network takes;
* ``layer(x, active=...)``: the first channels of every weight, with every elastic conv input
  scaled by ``alpha = max_in / active_in``, folded into the sliced kernel exactly as extraction
  stores it.

1 x 1 convolutions are ``ElasticDense`` layers applied to the channel axis (a 1 x 1 convolution
with stride 1 IS a dense layer on (B, H, W, C); a strided one is a dense layer on
``x[:, ::s, ::s]``). Numerically the same products, and Keras quantizes ``Dense`` to int8 while
its ``Conv2D`` has no ``quantize`` (Keras 3.15), so most of the weights of an extracted ResNet
are quantizable.

GroupNorm over a sliced channel count keeps the NUMBER of groups fixed and shrinks the group
size: ``active / groups`` channels per group (the reference's ``F.group_norm(x, num_groups,
...)`` on the sliced tensor, poa/layers/dynamic_ops.py). With the reference's 32 groups the
bottleneck mid widths 64 / 96 / 128 of stage 1 have groups of 2 / 3 / 4 channels. An extracted
network holds a ``GroupNormalization(groups)`` over ``active`` channels, which computes exactly
the same statistics; the elastic path below repeats Keras' formula op for op so the two agree to
the last bits.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from poa_keras.elastic.layers import (ElasticDense, HostInitializer, StochasticDepth,
                                      check_active, check_not_quantized, fold_alpha,
                                      read_weight, skippable)
from poa_keras.quantization.observer import (ActivationQuantizer, check_policy, current_quant,
                                             quantize_kernel)


def kaiming_normal_fan_out(kernel_size, filters):
    """He initialisation with the fan-out of a conv (torchvision's and timm's ResNet rule):
    N(0, 2 / (k * k * filters))."""
    return HostInitializer("normal", stddev=math.sqrt(2.0 / (kernel_size ** 2 * filters)))


def conv_output_size(size, kernel_size, strides, padding):
    """floor((size + 2 p - k) / s) + 1: the output length of a padded convolution or pooling
    (PyTorch's rule, which the reference uses)."""
    return (int(size) + 2 * padding - kernel_size) // strides + 1


def _pad(x, padding):
    if not padding:
        return x
    return ops.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticConv2D(keras.layers.Layer):
    """k x k convolution with symmetric zero padding whose first `active_in` input and first
    `active_out` output channels can be taken.

    The padding is explicit (``padding`` pixels on every side, then a "valid" convolution): it
    is PyTorch's ``Conv2d(padding=p)``; Keras' ``padding="same"`` pads one pixel more at the
    bottom/right than at the top/left for stride 2 and would shift every feature map.

    Input (B, H, W, in_channels) -> (B, H', W', filters) with
    H' = floor((H + 2 p - k) / s) + 1; sliced: (B, H, W, active_in) -> (B, H', W', active_out).

    Inside a ``quantization_scope`` the kernel is fake-quantized per output channel at
    ``weight_bits`` ("auto": the scope's; an int: fixed; None: never). Activations are
    quantized where the family places an ``ActivationQuantizer`` (after conv-norm-ReLU).
    """

    def __init__(self, in_channels, filters, kernel_size, strides=1, padding=0, use_bias=False,
                 kernel_initializer=None, bias_initializer=None, weight_bits="auto", **kwargs):
        super().__init__(**kwargs)
        self.weight_bits = check_policy(weight_bits, f"{self.name}: weight bits")
        self.in_channels = int(in_channels)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = int(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or kaiming_normal_fan_out(self.kernel_size, self.filters))
        self.bias_initializer = keras.initializers.get(bias_initializer or HostInitializer())
        self.conv = keras.layers.Conv2D(
            self.filters, self.kernel_size, strides=self.strides, padding="valid",
            use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer, dtype=self.dtype_policy, name="conv")

    def build(self, input_shape=None):
        self.conv.build((None, None, None, self.in_channels))

    def sliced_weights(self, active_in, active_out, on_host=False):
        """(kernel * alpha, bias or None): kernel (k, k, active_in, active_out)."""
        check_not_quantized(self.conv, self)
        check_active(active_in, self.in_channels, "inputs", self.name)
        check_active(active_out, self.filters, "outputs", self.name)
        kernel = read_weight(self.conv.kernel, on_host)[:, :, :active_in, :active_out]
        bias = read_weight(self.conv.bias, on_host)[:active_out] if self.use_bias else None
        return fold_alpha(kernel, self.in_channels, active_in), bias

    def call(self, x, active_in=None, active_out=None):
        x = _pad(x, self.padding)
        quantized = current_quant() is not None and self.weight_bits is not None
        if active_in is None and active_out is None and not quantized:
            return self.conv(x)
        active_in = self.in_channels if active_in is None else active_in
        active_out = self.filters if active_out is None else active_out
        kernel, bias = self.sliced_weights(active_in, active_out)
        if quantized:
            kernel = quantize_kernel(kernel, self.weight_bits, self)
        y = ops.conv(x, ops.cast(kernel, x.dtype), strides=self.strides, padding="valid")
        if bias is not None:
            y = y + ops.cast(bias, y.dtype)
        return y

    def get_config(self):
        config = super().get_config()
        config.update(
            in_channels=self.in_channels, filters=self.filters, kernel_size=self.kernel_size,
            strides=self.strides, padding=self.padding, use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            weight_bits=self.weight_bits,
        )
        return config


def group_norm(x, gamma, beta, groups, epsilon):
    """GroupNorm of channels-last x (..., C) with `groups` groups of C / groups consecutive
    channels, float32 statistics; the formula of ``keras.layers.GroupNormalization`` op for op
    (moments, rsqrt, gamma folded into the inverse), so that a sliced GroupNorm and the
    extracted layer agree exactly."""
    channels = int(x.shape[-1])
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} "
                         "groups")
    shape = ops.shape(x)
    group_shape = [-1] + [shape[i] if x.shape[i] is None else x.shape[i]
                          for i in range(1, len(x.shape) - 1)] + [groups, channels // groups]
    y = ops.reshape(x, group_shape)
    inputs_dtype = y.dtype
    y = ops.cast(y, keras.backend.result_type(inputs_dtype, "float32"))
    axes = list(range(1, len(group_shape)))
    axes.pop(-2)  # the group axis
    mean, variance = ops.moments(y, axes=axes, keepdims=True)
    broadcast = [1] * (len(group_shape) - 2) + [groups, channels // groups]
    inv = ops.rsqrt(variance + epsilon)
    inv = inv * ops.cast(ops.reshape(gamma, broadcast), y.dtype)
    res = -mean * inv + ops.cast(ops.reshape(beta, broadcast), y.dtype)
    y = ops.cast(y * inv + res, inputs_dtype)
    return ops.reshape(y, shape)


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticGroupNorm(keras.layers.Layer):
    """GroupNorm with a FIXED number of groups over the active channels.

    ``active`` channels (a multiple of `groups`) are normalised in `groups` groups of
    ``active / groups`` consecutive channels, with the first-`active` gamma and beta: what
    ``GroupNormalization(groups)`` of an extracted network of width `active` computes.
    Input/output (B, H, W, channels) or (B, H, W, active).
    """

    def __init__(self, channels, groups=32, epsilon=1e-5, gamma_init=1.0, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.groups = int(groups)
        self.epsilon = float(epsilon)
        self.gamma_init = float(gamma_init)
        if self.channels % self.groups:
            raise ValueError(f"{self.name}: {self.channels} channels are not a multiple of "
                             f"the {self.groups} GroupNorm groups")
        self.norm = keras.layers.GroupNormalization(
            groups=self.groups, axis=-1, epsilon=self.epsilon,
            gamma_initializer=HostInitializer("constant", value=self.gamma_init),
            beta_initializer=HostInitializer("zeros"), dtype=self.dtype_policy, name="norm")

    def build(self, input_shape=None):
        self.norm.build((None, None, None, self.channels))

    def sliced_weights(self, active, on_host=False):
        check_active(active, self.channels, "channels", self.name)
        if active % self.groups:
            raise ValueError(f"{self.name}: active channels {active} are not a multiple of the "
                             f"{self.groups} GroupNorm groups")
        return (read_weight(self.norm.gamma, on_host)[:active],
                read_weight(self.norm.beta, on_host)[:active])

    def call(self, x, active=None):
        if active is None:
            return self.norm(x)
        gamma, beta = self.sliced_weights(active)
        return ops.cast(group_norm(x, gamma, beta, self.groups, self.epsilon),
                        self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, groups=self.groups, epsilon=self.epsilon,
                      gamma_init=self.gamma_init)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticBottleneck(keras.layers.Layer):
    """ResNet bottleneck (v1.5: the stride sits on the 3 x 3 conv) with GroupNorm and an
    elastic MID width::

        y = relu(gn1(conv1x1(x)))            in_channels -> mid
        y = relu(gn2(conv3x3/s(y)))          mid -> mid (stride s, padding 1)
        y = gn3(conv1x1(y))                  mid -> out_channels
        out = relu(drop_path(y) + shortcut)  shortcut = gn(conv1x1/s(x)) or x

    ``active`` = the mid width of the sub-network (first channels of conv1's outputs, of conv2
    and gn1/gn2, of conv3's inputs). The input and output channels are never elastic, so alpha
    is max_mid / active on conv2 and conv3 and 1 on conv1 and the shortcut. Convolutions have no
    bias (each is followed by a GroupNorm).

    Input (B, H, W, in_channels) -> (B, H', W', out_channels), H' = floor((H - 1) / s) + 1.
    """

    def __init__(self, in_channels, mid_channels, out_channels, strides=1, groups=32,
                 epsilon=1e-5, drop_path=0.0, zero_init_residual=False, downsample=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.in_channels = int(in_channels)
        self.mid_channels = int(mid_channels)
        self.out_channels = int(out_channels)
        self.strides = int(strides)
        self.groups = int(groups)
        self.epsilon = float(epsilon)
        self.drop_path_rate = float(drop_path)
        self.zero_init_residual = bool(zero_init_residual)
        if downsample is None:
            downsample = self.strides != 1 or self.in_channels != self.out_channels
        self.has_downsample = bool(downsample)
        policy = self.dtype_policy

        def dense(n_in, n_out, name):
            return ElasticDense(n_in, n_out, use_bias=False,
                                kernel_initializer=kaiming_normal_fan_out(1, n_out),
                                dtype=policy, name=name)

        def norm(channels, name, gamma_init=1.0):
            return ElasticGroupNorm(channels, self.groups, self.epsilon, gamma_init,
                                    dtype=policy, name=name)

        self.conv1 = dense(self.in_channels, self.mid_channels, "conv1")
        self.norm1 = norm(self.mid_channels, "norm1")
        self.conv2 = ElasticConv2D(self.mid_channels, self.mid_channels, 3, self.strides, 1,
                                   dtype=policy, name="conv2")
        self.norm2 = norm(self.mid_channels, "norm2")
        self.conv3 = dense(self.mid_channels, self.out_channels, "conv3")
        self.norm3 = norm(self.out_channels, "norm3",
                          0.0 if self.zero_init_residual else 1.0)
        if self.has_downsample:
            self.downsample = dense(self.in_channels, self.out_channels, "downsample")
            self.downsample_norm = norm(self.out_channels, "downsample_norm")
        else:
            self.downsample = self.downsample_norm = None
        self.drop_path = StochasticDepth(self.drop_path_rate, dtype=policy, name="drop_path")
        # SSQL's placement (REFERENCE.md §5): conv -> norm -> ReLU -> quantizer, except after
        # the last conv and the shortcut; the block output (after add + ReLU) is quantized.
        self.quant1 = ActivationQuantizer(dtype=policy, name="quant1")
        self.quant2 = ActivationQuantizer(dtype=policy, name="quant2")
        self.quant_out = ActivationQuantizer(dtype=policy, name="quant_out")

    def build(self, input_shape=None):
        for layer in (self.conv1, self.norm1, self.conv2, self.norm2, self.conv3, self.norm3,
                      self.downsample, self.downsample_norm, self.quant1, self.quant2,
                      self.quant_out):
            if layer is not None:
                layer.build()
        self.drop_path.build(None)  # weightless, but Model.quantize wants every layer built

    def call(self, x, active=None, training=None, keep=None):
        """``keep``: None, or a run-time 0/1 scalar; 0 skips the block (``skippable``; only a
        block whose output has its input's shape can be skipped)."""
        noise = self.drop_path.noise(x, training)
        quantized = current_quant() is not None

        def quant(quantizer, y):
            return quantizer(y) if quantized else y

        def body(x):
            if active is None:
                y = quant(self.quant1, ops.relu(self.norm1(self.conv1(x))))
                y = quant(self.quant2, ops.relu(self.norm2(self.conv2(y))))
                y = self.norm3(self.conv3(y))
            else:
                y = quant(self.quant1, ops.relu(self.norm1(self.conv1(x, active_out=active),
                                                           active=active)))
                y = quant(self.quant2, ops.relu(self.norm2(
                    self.conv2(y, active_in=active, active_out=active), active=active)))
                y = self.norm3(self.conv3(y, active_in=active))
            shortcut = x
            if self.has_downsample:
                if self.strides != 1:
                    shortcut = shortcut[:, ::self.strides, ::self.strides, :]
                shortcut = self.downsample_norm(self.downsample(shortcut))
            return quant(self.quant_out, ops.relu(self.drop_path.apply(y, noise) + shortcut))

        if keep is not None and self.has_downsample:
            raise ValueError(f"{self.name}: a block with a downsampling shortcut changes the "
                             "shape of its input and cannot be skipped")
        # a downsampling block changes x's shape: no conditional around it
        return skippable(keep, x, body, boundary=training and not self.has_downsample)

    def sliced_weights(self, active, on_host=True):
        """{sub-layer name: weights} of the sub-block with mid width `active` (alpha folded):
        conv1 (in, active), norm1 / norm2 (active,) x 2, conv2 (3, 3, active, active),
        conv3 (active, out), norm3 and the shortcut unchanged."""
        out = {
            "conv1": self.conv1.sliced_weights(self.in_channels, active, on_host)[0],
            "norm1": self.norm1.sliced_weights(active, on_host),
            "conv2": self.conv2.sliced_weights(active, active, on_host)[0],
            "norm2": self.norm2.sliced_weights(active, on_host),
            "conv3": self.conv3.sliced_weights(active, self.out_channels, on_host)[0],
            "norm3": self.norm3.sliced_weights(self.out_channels, on_host),
        }
        if self.has_downsample:
            out["downsample"] = self.downsample.sliced_weights(
                self.in_channels, self.out_channels, on_host)[0]
            out["downsample_norm"] = self.downsample_norm.sliced_weights(
                self.out_channels, on_host)
        return out

    def load_sliced_weights(self, weights):
        """Assigns what ``sliced_weights`` of a wider block returned (extraction)."""
        self.conv1.dense.kernel.assign(weights["conv1"])
        self.conv2.conv.kernel.assign(weights["conv2"])
        self.conv3.dense.kernel.assign(weights["conv3"])
        for name in ("norm1", "norm2", "norm3"):
            gamma, beta = weights[name]
            getattr(self, name).norm.gamma.assign(gamma)
            getattr(self, name).norm.beta.assign(beta)
        if self.has_downsample:
            self.downsample.dense.kernel.assign(weights["downsample"])
            gamma, beta = weights["downsample_norm"]
            self.downsample_norm.norm.gamma.assign(gamma)
            self.downsample_norm.norm.beta.assign(beta)

    def get_config(self):
        config = super().get_config()
        config.update(
            in_channels=self.in_channels, mid_channels=self.mid_channels,
            out_channels=self.out_channels, strides=self.strides, groups=self.groups,
            epsilon=self.epsilon, drop_path=self.drop_path_rate,
            zero_init_residual=self.zero_init_residual, downsample=self.has_downsample)
        return config

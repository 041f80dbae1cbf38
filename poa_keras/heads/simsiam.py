"""SimSiam's projector and predictor, as SSQL builds them (REFERENCE.md §5;
megvii-research/SSQL-ECCV2022 utils/ssl_algorithms/Qsimsiam.py).

Projector (part of the encoder: backbone feature -> z)::

    x (B, in_dim) -> Linear(no bias) -> BN -> ReLU          (hidden_dim)
                  -> Linear(no bias) -> BN -> ReLU          (hidden_dim)
                  -> Linear(no bias) -> BN(affine=False)    (out_dim)      = z

Predictor (z -> p)::

    z (B, dim) -> Linear(no bias) -> BN -> ReLU (hidden_dim) -> Linear (dim, with bias) = p

Widths: the projector's ``hidden_dim`` and ``out_dim`` default to max(in_dim, 2048) (2048 for
ResNet-18 and ResNet-50); the predictor's hidden width is 2048 in SSQL's ResNet-18 runs and 512
in its ResNet-50 run (its ``SSL.SETTING.HIDDEN_DIM``; SimSiam's default 512). Tests and demos
pass tiny widths.

BatchNorm is ``keras.layers.BatchNormalization`` with PyTorch's BatchNorm1d settings: torch's
momentum 0.1 is Keras' ``momentum=0.9`` (Keras keeps ``moving = 0.9 moving + 0.1 batch``),
epsilon 1e-5; ``affine=False`` is ``center=False, scale=False`` (no offset, no gain: the
output is the standardised batch). Keras updates its moving variance with the biased batch
variance where torch uses the unbiased one (a factor B / (B - 1)); the moving statistics only
serve an inference-mode forward of the heads, which no trainer here runs.

The reference's last projector Linear has a bias that it freezes ("not use bias as it is
followed by BN"): a constant bias before a batch-normalising BN changes nothing in a training
forward, so here that Linear has none.

Quantization (SSQL): the projector is part of the quantized encoder; its three linears are
``ElasticDense(weight_bits=8)``: inside a ``quantization_scope`` their kernels are
fake-quantized at 8 bits whatever the scope's weight bit-width (and left in float in a float
scope), and they have no activation quantizer (REFERENCE §5 "Projector weights fixed 8-bit, no
activation quantization"). The predictor is never quantized: plain Dense layers, which no scope
affects.

Initialisation: every kernel (and the predictor's bias) is drawn with the variance of PyTorch's
default Linear init, 1 / (3 fan_in) (a normal here, a uniform there); BN gains 1, offsets 0.
"""
from __future__ import annotations

import math

import keras

from poa_keras.elastic.layers import ElasticDense, HostInitializer

# PyTorch BatchNorm1d's momentum 0.1 and eps, in Keras' convention.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
DEFAULT_WIDTH = 2048


def torch_linear_init(fan_in):
    """A host initializer with the variance of PyTorch's default nn.Linear init
    (uniform in +-1/sqrt(fan_in): variance 1 / (3 fan_in))."""
    return HostInitializer("normal", stddev=math.sqrt(1.0 / (3.0 * int(fan_in))))


def _positive(value, what):
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _batch_norm(affine, momentum, epsilon, policy, name):
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, center=affine,
                                           scale=affine, dtype=policy, name=name)


@keras.saving.register_keras_serializable(package="poa_keras")
class SimSiamProjector(keras.layers.Layer):
    """SimSiam's 3-layer projector (see the module docstring), quantizable at 8 bits.

    Args:
        in_dim: the backbone's feature width (``backbone.feature_dim()``).
        out_dim: width of z; None: max(in_dim, 2048).
        hidden_dim: width of the two hidden layers; None: max(in_dim, 2048).
        num_layers: linears (>= 1); SimSiam 3 (ResNet-18 on CIFAR in SimSiam's paper: 2).
            Every layer but the last is Linear-BN-ReLU; the last is Linear-BN(affine=False).
        weight_bits: the linears' quantization policy (``ElasticDense``): 8 (SSQL: fixed
            8-bit), "auto" (the scope's bit-width) or None (never quantized).
        bn_momentum, bn_epsilon: Keras BatchNormalization settings (PyTorch's defaults).

    Call: ``projector(x, training=None)`` with x (B, in_dim) -> z (B, out_dim).
    """

    def __init__(self, in_dim, out_dim=None, hidden_dim=None, num_layers=3, weight_bits=8,
                 bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.in_dim = _positive(in_dim, "in_dim")
        width = max(self.in_dim, DEFAULT_WIDTH)
        self.out_dim = width if out_dim is None else _positive(out_dim, "out_dim")
        self.hidden_dim = width if hidden_dim is None else _positive(hidden_dim, "hidden_dim")
        self.num_layers = _positive(num_layers, "num_layers")
        self.weight_bits = weight_bits
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        policy = self.dtype_policy
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.out_dim]
        fan_ins = [self.in_dim] + widths[:-1]
        self.linears, self.norms = [], []
        for i, (fan_in, units) in enumerate(zip(fan_ins, widths)):
            self.linears.append(ElasticDense(
                fan_in, units, use_bias=False, kernel_initializer=torch_linear_init(fan_in),
                weight_bits=weight_bits, dtype=policy, name=f"linear_{i}"))
            last = i == self.num_layers - 1
            self.norms.append(_batch_norm(not last, self.bn_momentum, self.bn_epsilon, policy,
                                          f"bn_{i}"))
        self._fan_ins, self._widths = fan_ins, widths
        # Built now (variables exist before the first step), within this layer's name scope:
        # paths read "<name>/linear_0/dense/kernel", "<name>/bn_0/gamma".
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        for linear, norm, units in zip(self.linears, self.norms, self._widths):
            linear.build()
            norm.build((None, units))
        self.built = True

    def call(self, x, training=None):
        h = x
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            h = norm(linear(h), training=training)
            if i < self.num_layers - 1:
                h = keras.activations.relu(h)
        return h

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(in_dim=self.in_dim, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                      num_layers=self.num_layers, weight_bits=self.weight_bits,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class SimSiamPredictor(keras.layers.Layer):
    """SimSiam's 2-layer predictor (see the module docstring); never quantized.

    Args:
        dim: the width of z (the projector's ``out_dim``), in and out.
        hidden_dim: the bottleneck width (SSQL: 2048 for ResNet-18, 512 for ResNet-50;
            SimSiam: 512).
        bn_momentum, bn_epsilon: Keras BatchNormalization settings (PyTorch's defaults).

    Call: ``predictor(z, training=None)`` with z (B, dim) -> p (B, dim).
    """

    def __init__(self, dim, hidden_dim=512, bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim = _positive(dim, "dim")
        self.hidden_dim = _positive(hidden_dim, "hidden_dim")
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        policy = self.dtype_policy
        self.hidden = keras.layers.Dense(
            self.hidden_dim, use_bias=False, kernel_initializer=torch_linear_init(self.dim),
            dtype=policy, name="linear_0")
        self.norm = _batch_norm(True, self.bn_momentum, self.bn_epsilon, policy, "bn_0")
        self.out = keras.layers.Dense(
            self.dim, kernel_initializer=torch_linear_init(self.hidden_dim),
            bias_initializer=torch_linear_init(self.hidden_dim), dtype=policy, name="linear_1")
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.hidden.build((None, self.dim))
        self.norm.build((None, self.hidden_dim))
        self.out.build((None, self.hidden_dim))
        self.built = True

    def call(self, z, training=None):
        h = keras.activations.relu(self.norm(self.hidden(z), training=training))
        return self.out(h)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dim,)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, hidden_dim=self.hidden_dim, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon)
        return config

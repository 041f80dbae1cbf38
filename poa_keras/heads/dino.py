"""DINO projection head and POA's multiple projection heads (REFERENCE.md §1 "Heads and losses",
§2 DINO).

A head maps backbone features to prototype logits::

    x (..., w) -> [ElasticDense -> GELU -> (Dense -> GELU) * (num_layers - 2) -> Dense]
               -> L2-normalise -> weight-normalised Dense (no bias) -> logits (..., out_dim)

The first linear is elastic: an elastic student's features of width ``w < in_dim`` use the first
``w`` input rows of the same kernel, scaled by ``alpha = in_dim / w`` (the ``ElasticDense`` rule),
so every sub-network trains the one shared head.

The last layer is a weight-normalised linear map (Salimans & Kingma, as torch's ``weight_norm``
in the reference): ``W[:, j] = g[j] * v[:, j] / ||v[:, j]||``, one unit-direction per prototype,
the norm taken over the bottleneck axis. ``g`` starts at 1; ``norm_last_layer=True`` (DINO) keeps
it fixed at 1 (non-trainable), so every prototype keeps unit norm and the logits are cosine
similarities.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from poa_keras.elastic.layers import ElasticDense, HostInitializer, trunc_normal

# Squared-norm floor of the L2 normalisations: the reference divides by max(||x||, 1e-12).
# It is applied to the squared norm in float32 (1e-24 would underflow in float16).
_EPS_SQUARED = 1e-24


def l2_normalize(x, axis=-1):
    """x / max(||x||, 1e-12) along `axis`, computed in float32 and cast back to x's dtype.

    Written with rsqrt of a floored squared norm so the gradient stays finite at x = 0."""
    dtype = x.dtype
    x32 = ops.cast(x, "float32")
    sq = ops.sum(ops.square(x32), axis=axis, keepdims=True)
    return ops.cast(x32 * ops.rsqrt(ops.maximum(sq, _EPS_SQUARED)), dtype)


@keras.saving.register_keras_serializable(package="poa_keras")
class WeightNormalizedDense(keras.layers.Layer):
    """Linear map without bias whose kernel is ``g * v / ||v||`` per output unit.

    Weights: ``weight_v`` (in_features, units) and ``weight_g`` (units,), g initialised to 1 and
    trainable only if ``gain_trainable``. Input (..., in_features) -> output (..., units).

    ``v`` is drawn like the reference's (torch's default Linear init, which the reference head
    keeps for its last layer: uniform with variance 1 / (3 * in_features)); here a normal with
    that variance, so the per-prototype norms ``||v||`` — which set the effective step size of
    the directions — match the reference.
    """

    def __init__(self, in_features, units, gain_trainable=False, kernel_initializer=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.in_features = int(in_features)
        self.units = int(units)
        if self.in_features < 1 or self.units < 1:
            raise ValueError(f"in_features and units must be >= 1, got {in_features}, {units}")
        self.gain_trainable = bool(gain_trainable)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or HostInitializer("normal", stddev=float(np.sqrt(1.0 / (3.0 * self.in_features)))))

    def build(self, input_shape=None):
        if self.built:
            return
        self.weight_v = self.add_weight(
            shape=(self.in_features, self.units), initializer=self.kernel_initializer,
            name="weight_v")
        self.weight_g = self.add_weight(
            shape=(self.units,), initializer=HostInitializer("ones"),
            trainable=self.gain_trainable, name="weight_g")
        self.built = True

    def column_scale(self):
        """g / ||v|| per output unit, float32, shape (units,)."""
        v = ops.cast(self.weight_v, "float32")
        sq = ops.sum(ops.square(v), axis=0)
        return ops.cast(self.weight_g, "float32") * ops.rsqrt(ops.maximum(sq, _EPS_SQUARED))

    def effective_kernel(self):
        """The kernel the layer applies, ``g * v / ||v||``: (in_features, units), float32."""
        return ops.cast(self.weight_v, "float32") * self.column_scale()[None, :]

    def call(self, x):
        # (x @ v) * (g / ||v||) equals x @ (g * v / ||v||) without materialising the normalised
        # (bottleneck x prototypes) kernel every step.
        y = ops.matmul(x, ops.cast(self.weight_v, x.dtype))
        return y * ops.cast(self.column_scale(), y.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(in_features=self.in_features, units=self.units,
                      gain_trainable=self.gain_trainable,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


def _resolve_active_in(x, active_in, in_dim, owner):
    """The active input width: the given one, else the static width of x when narrower than
    in_dim (None: the full head, no slicing). A given width must match x's static width."""
    static = x.shape[-1] if hasattr(x, "shape") and len(x.shape) else None
    static = int(static) if static is not None else None
    if active_in is None:
        active_in = static if static is not None and static != in_dim else None
    elif static is not None and static != int(active_in):
        raise ValueError(f"{owner}: active_in={active_in} but the input has {static} channels")
    if active_in is not None:
        active_in = int(active_in)
        if not 0 < active_in <= in_dim:
            raise ValueError(f"{owner}: active input width {active_in} must lie in "
                             f"[1, {in_dim}]")
        if active_in == in_dim:
            active_in = None  # the full head: the plain Dense path, no slicing
    return active_in


@keras.saving.register_keras_serializable(package="poa_keras")
class DINOHead(keras.layers.Layer):
    """DINO projection head with an elastic input.

    Args:
        in_dim: the backbone's full feature width (the elastic maximum).
        out_dim: number of prototypes (DINO 65536; POA's heads 8192..65536).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: width before the L2 normalisation (256).
        num_layers: linears before the normalisation, >= 1 (3: Linear-GELU-Linear-GELU-Linear;
            1: a single Linear in_dim -> bottleneck).
        norm_last_layer: keep the weight-norm gain g fixed at 1 (non-trainable). DINO's default
            is True; POA's heads leave g trainable (pass False).
        use_bias: biases of the MLP linears (the last layer never has one).

    Call: ``head(x, active_in=None)`` with x (..., w), w <= in_dim. ``active_in`` defaults to
    the static width of x; a narrower input uses the first w rows of the first kernel times
    alpha = in_dim / w. Returns logits (..., out_dim).
    """

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, num_layers=3,
                 norm_last_layer=True, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        for what, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim)):
            if int(value) < 1:
                raise ValueError(f"{what} must be >= 1, got {value}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.num_layers = int(num_layers)
        self.norm_last_layer = bool(norm_last_layer)
        self.use_bias = bool(use_bias)
        policy = self.dtype_policy
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        # DINO / DINOv2 / POA initialise every head MLP linear with trunc_normal(std=0.02),
        # bias 0.
        self.mlp = [ElasticDense(self.in_dim, widths[0], use_bias=self.use_bias,
                                 kernel_initializer=trunc_normal(),
                                 bias_initializer=HostInitializer("zeros"), dtype=policy,
                                 name="mlp_0")]
        for i, units in enumerate(widths[1:], start=1):
            self.mlp.append(keras.layers.Dense(
                units, use_bias=self.use_bias, kernel_initializer=trunc_normal(),
                bias_initializer=HostInitializer("zeros"), dtype=policy, name=f"mlp_{i}"))
        # The prototype logits are computed in float32 under any policy (mixed_bfloat16
        # included): the teacher and student temperatures (0.04-0.1) multiply their rounding
        # errors by 10-25 before the softmax.
        self.last_layer = WeightNormalizedDense(
            self.bottleneck_dim, self.out_dim, gain_trainable=not self.norm_last_layer,
            dtype="float32", name="last_layer")
        # Built now (variables exist for optimizers and EMA before the first call), within this
        # layer's name scope: paths read "<name>/mlp_0/...", "<name>/last_layer/weight_v".
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.mlp[0].build()
        for layer, fan_in in zip(self.mlp[1:], [self.hidden_dim] * (self.num_layers - 1)):
            layer.build((None, fan_in))
        self.last_layer.build()
        self.built = True

    def last_layer_variables(self):
        """Trainable variables of the weight-normalised last layer (weight_v, plus weight_g
        when norm_last_layer=False): the ones a trainer freezes during the first epoch."""
        return list(self.last_layer.trainable_variables)

    def bottleneck(self, x, active_in=None):
        """The L2-normalised bottleneck features (..., bottleneck_dim), float32."""
        active_in = _resolve_active_in(x, active_in, self.in_dim, self.name)
        h = self.mlp[0](x) if active_in is None else self.mlp[0](x, active_in=active_in)
        for layer in self.mlp[1:]:
            h = layer(keras.activations.gelu(h, approximate=False))
        return l2_normalize(ops.cast(h, "float32"))   # float32 into the logits (see __init__)

    def call(self, x, active_in=None):
        return self.last_layer(self.bottleneck(x, active_in=active_in))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(in_dim=self.in_dim, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                      bottleneck_dim=self.bottleneck_dim, num_layers=self.num_layers,
                      norm_last_layer=self.norm_last_layer, use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class MultiProjectionHead(keras.layers.Layer):
    """POA's multiple projection heads (MPH): one DINOHead per prototype count, each with its
    own MLP and last layer, all reading the same (elastic) features.

    Args:
        in_dim: the backbone's full feature width.
        out_dims: prototype count per head (POA: (8192, 16384, 32768, 65536)).
        hidden_dim, bottleneck_dim, num_layers, norm_last_layer, use_bias: as DINOHead, shared by
            every head. norm_last_layer defaults to False here: POA's heads train the gain.

    Call: ``mph(x, active_in=None)`` -> list of logits, one (..., out_dims[i]) per head.
    """

    def __init__(self, in_dim, out_dims=(8192, 16384, 32768, 65536), hidden_dim=2048,
                 bottleneck_dim=256, num_layers=3, norm_last_layer=False, use_bias=True,
                 **kwargs):
        super().__init__(**kwargs)
        out_dims = [int(d) for d in out_dims]
        if not out_dims:
            raise ValueError("out_dims must name at least one prototype count")
        self.in_dim = int(in_dim)
        self.out_dims = out_dims
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.num_layers = int(num_layers)
        self.norm_last_layer = bool(norm_last_layer)
        self.use_bias = bool(use_bias)
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        # The heads are made (and build themselves) inside this layer's name scope, so their
        # variable paths read "<name>/head_<i>/...": unique per head and per owner.
        self.heads = [
            DINOHead(self.in_dim, d, self.hidden_dim, self.bottleneck_dim, self.num_layers,
                     self.norm_last_layer, self.use_bias, dtype=self.dtype_policy,
                     name=f"head_{i}")
            for i, d in enumerate(self.out_dims)
        ]
        self.built = True

    def last_layer_variables(self):
        """Trainable variables of every head's weight-normalised last layer."""
        return [v for head in self.heads for v in head.last_layer_variables()]

    def call(self, x, active_in=None):
        active_in = _resolve_active_in(x, active_in, self.in_dim, self.name)
        return [head(x, active_in=active_in) for head in self.heads]

    def compute_output_shape(self, input_shape):
        return [tuple(input_shape[:-1]) + (d,) for d in self.out_dims]

    def get_config(self):
        config = super().get_config()
        config.update(in_dim=self.in_dim, out_dims=list(self.out_dims),
                      hidden_dim=self.hidden_dim, bottleneck_dim=self.bottleneck_dim,
                      num_layers=self.num_layers, norm_last_layer=self.norm_last_layer,
                      use_bias=self.use_bias)
        return config

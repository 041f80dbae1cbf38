"""Elastic layers: full-size weights that can run as any first-k slice of themselves.

Every elastic layer wraps ordinary Keras layers (Dense, Conv2D, LayerNormalization) and has two
forwards:

* ``layer(x)``: the plain full layer, no slicing at all. An extracted sub-network only ever takes
  this path, so it is an ordinary Keras model (``model.quantize("int8")`` finds plain ``Dense``
  layers to quantize, ``model.export`` traces plain ops).
* ``layer(x, active=...)``: the sub-network; the first channels of every weight are used and
  every elastic linear/conv input is scaled by ``alpha = max_in / active_in`` (``alpha``,
  ``fold_alpha``: the rule's one home, used by every elastic layer). The scale is folded
  into the sliced kernel, exactly as an extracted network stores it, so the elastic forward and
  the extracted network compute the same products.

``sliced_weights(...)`` returns the weights the sub-network uses; extraction copies them.
"""
from __future__ import annotations

import contextlib
import threading

import keras
import numpy as np
from keras import ops

from poa_keras.quantization.observer import (ActivationQuantizer, check_policy, current_quant,
                                             quantize_kernel)

_INIT_STATE = threading.local()



@keras.saving.register_keras_serializable(package="poa_keras")
class HostInitializer(keras.initializers.Initializer):
    """Initial values drawn with numpy on the host.

    Keras' own random initializers run as backend ops, and eager JAX compiles one program per
    new weight shape (about 0.15 s each): building or extracting a ViT took seconds. Numpy draws
    are instant on every backend and reproducible under ``keras.utils.set_random_seed`` (which
    seeds numpy's global generator).

    kind: "zeros", "ones", "constant" (value), "normal" (stddev), "truncated_normal" (stddev,
    cut at 2 stddev) or "glorot_uniform".
    """

    KINDS = ("zeros", "ones", "constant", "normal", "truncated_normal", "glorot_uniform")

    def __init__(self, kind="zeros", stddev=0.02, value=0.0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown initializer kind {kind!r}; valid: {self.KINDS}")
        self.kind, self.stddev, self.value = kind, float(stddev), float(value)

    @staticmethod
    @contextlib.contextmanager
    def skipped():
        """Within this context every HostInitializer gives zeros: for models whose weights are
        all overwritten right away (extraction), so no time goes into random draws."""
        previous = getattr(_INIT_STATE, "skip", False)
        _INIT_STATE.skip = True
        try:
            yield
        finally:
            _INIT_STATE.skip = previous

    def __call__(self, shape, dtype=None):
        shape = tuple(int(s) for s in shape)
        if getattr(_INIT_STATE, "skip", False) or self.kind == "zeros":
            out = np.zeros(shape, np.float32)
        elif self.kind == "ones":
            out = np.ones(shape)
        elif self.kind == "constant":
            out = np.full(shape, self.value)
        elif self.kind == "normal":
            out = self._rng().standard_normal(shape, dtype=np.float32) * self.stddev
        elif self.kind == "truncated_normal":
            rng = self._rng()
            out = rng.standard_normal(shape, dtype=np.float32)
            bad = np.abs(out) > 2
            while bad.any():
                out[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
                bad = np.abs(out) > 2
            out *= self.stddev
        else:
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            out = self._rng().uniform(-limit, limit, shape).astype(np.float32)
        return keras.ops.convert_to_tensor(out.astype("float32", copy=False), dtype=dtype)

    @staticmethod
    def _rng():
        # A fast float32 generator seeded from numpy's global state (set_random_seed seeds it).
        return np.random.default_rng(np.random.randint(2 ** 31))

    def get_config(self):
        return {"kind": self.kind, "stddev": self.stddev, "value": self.value}


def trunc_normal(stddev=0.02):
    """The ViT / Swin / DINO initialisation of every linear layer (truncated normal, std 0.02,
    cut at 2 std), drawn on the host."""
    return HostInitializer("truncated_normal", stddev=stddev)


def alpha(max_in, active_in):
    """POA's input scale of an elastic linear or conv layer that takes ``active_in`` of its
    ``max_in`` inputs: ``max_in / active_in`` (REFERENCE.md §1 "Scale"; biases are not
    scaled)."""
    return max_in / active_in


def fold_alpha(kernel, max_in, active_in):
    """A kernel sliced to ``active_in`` inputs with ``alpha(max_in, active_in)`` folded in, as
    the elastic forward uses it and extraction stores it (unchanged when nothing is sliced)."""
    return kernel if active_in == max_in else kernel * alpha(max_in, active_in)


def read_weight(variable, on_host):
    """The variable itself (for the traced forward) or a numpy copy (for extraction: slicing on
    the host avoids compiling one device program per new shape)."""
    return np.asarray(keras.ops.convert_to_numpy(variable)) if on_host else variable


def weights_by_path(layer):
    """{path below the layer's own name: variable} of every weight of a layer or model
    (``"blocks_3/attn/qkv/dense/kernel"``): the names weights keep whatever the model is
    called (converters, ``copy_weights_from``, saved decoders)."""
    return {v.path.split("/", 1)[1]: v for v in layer.weights}


def assign_by_path(layer, arrays, where, partial=False):
    """Writes ``{relative path: value}`` (``weights_by_path``'s keys) into ``layer``'s weights,
    after checking every key and shape (nothing is written if one is wrong). ``partial``: the
    layer may have weights ``arrays`` lacks (they keep their values); otherwise the keys must
    be exactly the layer's. Returns the paths not written."""
    mine = weights_by_path(layer)
    extra = sorted(set(arrays) - set(mine))
    missing = sorted(set(mine) - set(arrays))
    if extra or (missing and not partial):
        raise ValueError(f"{where}: weights that {layer.name} lacks {extra[:6]}, weights it "
                         f"has and the source lacks {[] if partial else missing[:6]}")
    for path, value in arrays.items():
        if tuple(value.shape) != tuple(mine[path].shape):
            raise ValueError(f"{where}: {path} has shape {tuple(value.shape)}, "
                             f"{layer.name}'s is {tuple(mine[path].shape)}")
    for path, value in arrays.items():
        mine[path].assign(value)
    return missing


def check_not_quantized(layer, owner):
    if getattr(layer, "quantization_mode", None) is not None:
        raise ValueError(
            f"{owner.name}: an elastic (sliced) forward needs float weights, but this layer was "
            f"quantized ({layer.quantization_mode}). Extract the sub-network first, then quantize "
            "the extracted model."
        )


def check_active(active, maximum, what, owner):
    if not 0 < active <= maximum:
        raise ValueError(f"{owner}: active {what} {active} must lie in [1, {maximum}]")


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticDense(keras.layers.Layer):
    """Linear map whose first `active_in` inputs and first `active_out` outputs can be taken.

    With ``groups > 1`` the outputs are `groups` blocks of `units` (a fused q/k/v projection:
    ``groups=3``) and the first `active_out` outputs of EACH block are kept.

    Input (..., in_features) -> output (..., groups * units); sliced:
    (..., active_in) -> (..., groups * active_out).

    Fake quantization (inside a ``quantization_scope``; nothing otherwise): the kernel the
    forward uses (sliced, alpha folded: what an extracted layer stores) is quantized per output
    channel at ``weight_bits`` ("auto": the scope's; an int: fixed; None: never), and with
    ``quantize_input`` the input first goes through an ``ActivationQuantizer`` (per tensor, at
    ``input_bits``).
    """

    def __init__(self, in_features, units, groups=1, use_bias=True,
                 kernel_initializer=None, bias_initializer=None, weight_bits="auto",
                 quantize_input=False, input_bits="auto", **kwargs):
        super().__init__(**kwargs)
        self.weight_bits = check_policy(weight_bits, f"{self.name}: weight bits")
        self.quantize_input = bool(quantize_input)
        self.input_bits = check_policy(input_bits, f"{self.name}: input bits")
        self.input_quantizer = (ActivationQuantizer(self.input_bits, dtype=self.dtype_policy,
                                                    name="input_quantizer")
                                if self.quantize_input else None)
        self.in_features = int(in_features)
        self.units = int(units)
        self.groups = int(groups)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or HostInitializer("glorot_uniform"))
        self.bias_initializer = keras.initializers.get(bias_initializer or HostInitializer())
        self.dense = keras.layers.Dense(
            self.groups * self.units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="dense",
        )

    def build(self, input_shape=None):
        self.dense.build((None, self.in_features))
        if self.input_quantizer is not None:
            self.input_quantizer.build()

    def sliced_weights(self, active_in, active_out, on_host=False):
        """(kernel * alpha, bias) of the sub-layer: kernel (active_in, groups * active_out).

        on_host: numpy arrays (for extraction) instead of backend tensors."""
        check_not_quantized(self.dense, self)
        check_active(active_in, self.in_features, "inputs", self.name)
        check_active(active_out, self.units, "outputs", self.name)
        concatenate = np.concatenate if on_host else ops.concatenate
        kernel = read_weight(self.dense.kernel, on_host)[:active_in]
        bias = read_weight(self.dense.bias, on_host) if self.use_bias else None
        if active_out != self.units:
            parts = [kernel[:, g * self.units: g * self.units + active_out]
                     for g in range(self.groups)]
            kernel = parts[0] if self.groups == 1 else concatenate(parts, axis=1)
            if bias is not None:
                parts = [bias[g * self.units: g * self.units + active_out]
                         for g in range(self.groups)]
                bias = parts[0] if self.groups == 1 else concatenate(parts, axis=0)
        return fold_alpha(kernel, self.in_features, active_in), bias

    def call(self, x, active_in=None, active_out=None):
        quantized = current_quant() is not None
        if quantized and self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if not (quantized and self.weight_bits is not None) and (
                active_in is None and active_out is None):
            return self.dense(x)
        active_in = self.in_features if active_in is None else active_in
        active_out = self.units if active_out is None else active_out
        kernel, bias = self.sliced_weights(active_in, active_out)
        if quantized:
            kernel = quantize_kernel(kernel, self.weight_bits, self)
        y = ops.matmul(x, ops.cast(kernel, x.dtype))
        if bias is not None:
            y = y + ops.cast(bias, x.dtype)
        return y

    def get_config(self):
        config = super().get_config()
        config.update(
            in_features=self.in_features, units=self.units, groups=self.groups,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            weight_bits=self.weight_bits, quantize_input=self.quantize_input,
            input_bits=self.input_bits,
        )
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticLayerNorm(keras.layers.Layer):
    """LayerNorm over the ACTIVE channels only (first-w gamma and beta).

    The statistics are those of the active channels, so an extracted network (a plain LayerNorm
    of width w) computes the same thing.
    """

    def __init__(self, dim, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.epsilon = float(epsilon)
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.epsilon, gamma_initializer=HostInitializer("ones"),
            beta_initializer=HostInitializer("zeros"), dtype=self.dtype_policy, name="norm")

    def build(self, input_shape=None):
        self.norm.build((None, self.dim))

    def sliced_weights(self, active, on_host=False):
        check_active(active, self.dim, "channels", self.name)
        return (read_weight(self.norm.gamma, on_host)[:active],
                read_weight(self.norm.beta, on_host)[:active])

    def call(self, x, active=None):
        if active is None:
            return self.norm(x)
        gamma, beta = self.sliced_weights(active)
        y = ops.layer_normalization(x, gamma, beta, -1, self.epsilon)
        return ops.cast(y, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticPatchEmbed(keras.layers.Layer):
    """Non-overlapping patch embedding (a strided conv) with elastic output channels.

    Input (B, H, W, C) -> tokens (B, H/p * W/p, dim) (or the first `active` channels).
    The input channels are never sliced, so alpha is 1 here.

    Inside a ``quantization_scope`` its kernel (per output channel) and its input (per
    tensor) are fake-quantized at ``bits`` (8 by default: SSQL keeps a network's first layer
    at 8/8; "auto" follows the scope; None: float).
    """

    def __init__(self, patch_size, dim, in_channels=3, bits=8, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self.in_channels = int(in_channels)
        self.bits = check_policy(bits, f"{self.name}: bits")
        self.input_quantizer = ActivationQuantizer(self.bits, dtype=self.dtype_policy,
                                                   name="input_quantizer")
        self.proj = keras.layers.Conv2D(
            self.dim, self.patch_size, strides=self.patch_size, padding="valid",
            kernel_initializer=HostInitializer("glorot_uniform"),
            bias_initializer=HostInitializer("zeros"), dtype=self.dtype_policy, name="proj")

    def build(self, input_shape=None):
        self.proj.build((None, None, None, self.in_channels))
        self.input_quantizer.build()

    def sliced_weights(self, active, on_host=False):
        check_not_quantized(self.proj, self)
        check_active(active, self.dim, "channels", self.name)
        return (read_weight(self.proj.kernel, on_host)[..., :active],
                read_weight(self.proj.bias, on_host)[:active])

    def call(self, x, active=None):
        quantized = current_quant() is not None and self.bits is not None
        if quantized:
            x = self.input_quantizer(x)
        if active is None and not quantized:
            y = self.proj(x)
        else:
            kernel, bias = self.sliced_weights(self.dim if active is None else active)
            if quantized:
                kernel = quantize_kernel(kernel, self.bits, self)
            y = ops.conv(x, ops.cast(kernel, x.dtype), strides=self.patch_size, padding="valid")
            y = y + ops.cast(bias, y.dtype)
        b, h, w, c = ops.shape(y)
        return ops.reshape(y, (b, h * w, c))

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, dim=self.dim, in_channels=self.in_channels,
                      bits=self.bits)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticLayerScale(keras.layers.Layer):
    """Per-channel learnable scale (CaiT/DINOv2 LayerScale); first-w gamma when elastic."""

    def __init__(self, dim, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.init_value = float(init_value)

    def build(self, input_shape=None):
        self.gamma = self.add_weight(
            shape=(self.dim,), initializer=HostInitializer("constant", value=self.init_value),
            name="gamma")

    def sliced_weights(self, active, on_host=False):
        check_active(active, self.dim, "channels", self.name)
        return read_weight(self.gamma, on_host)[:active]

    def call(self, x, active=None):
        gamma = self.gamma if active is None else self.sliced_weights(active)
        return x * ops.cast(gamma, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, init_value=self.init_value)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class StochasticDepth(keras.layers.Layer):
    """Drops the whole residual branch per sample with probability `rate` (training only).

    ``layer(y, training)`` draws and applies in one go. A block whose body may be skipped at
    run time (``skippable``) draws first, outside the conditional, with ``noise(x, training)``
    (per-sample 0/1, or None when nothing is dropped) and applies it inside with
    ``apply(y, noise)``: a random generator must not advance inside a branch that may not run
    (on JAX its new state would be a value local to that branch).
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must lie in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def noise(self, x, training=None):
        """Per-sample keep flags (B, 1, ..., 1) of x's rank and dtype, or None (inference, or
        rate 0)."""
        if not training or self.rate == 0.0:
            return None
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        return ops.floor(1.0 - self.rate + keras.random.uniform(
            shape, seed=self.seed_generator, dtype=x.dtype))

    def apply(self, y, noise):
        """y with the samples whose flag is 0 dropped and the rest scaled by 1 / (1 - rate)."""
        return y if noise is None else y * noise / (1.0 - self.rate)

    def call(self, x, training=None):
        return self.apply(x, self.noise(x, training))

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


_BLOCK_BOUNDARIES = {"value": None}


def set_block_boundaries(value):
    """Whether training passes put every block in a conditional (``skippable``'s
    ``boundary``): True, False, or None (the default: on for JAX and TensorFlow on the CPU)."""
    if value not in (True, False, None):
        raise ValueError(f"block boundaries must be True, False or None (auto), got {value!r}")
    _BLOCK_BOUNDARIES["value"] = value


def block_boundaries():
    """Whether ``skippable(..., boundary=True)`` runs its body in a conditional (see there)."""
    value = _BLOCK_BOUNDARIES["value"]
    if value is not None:
        return value
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


def always_true(x):
    """A run-time True the compiler cannot fold: x's first element equals itself or is NaN."""
    first = x[(0,) * len(x.shape)]
    return ops.logical_or(ops.equal(first, first), ops.not_equal(first, first))


def skippable(keep, x, body, boundary=False):
    """``body(x)`` where the run-time flag ``keep`` (a scalar 0/1 tensor) is 1, else ``x``.

    ``keep=None`` runs the body unconditionally (no conditional at all). Otherwise the body
    sits in a conditional (``ops.cond``: ``lax.cond`` on JAX, ``tf.cond`` on TensorFlow): a
    compiled program holds both branches but computes only the one taken, so one program
    serves every depth without paying the skipped blocks' FLOPs (DESIGN contract 6). The body
    must keep x's shape and must not advance a random generator (draw outside: see
    ``StochasticDepth.noise``).

    ``boundary`` (True in a training pass): where ``block_boundaries()`` holds, a body without a
    ``keep`` flag also runs in a conditional, on ``always_true(x)``. XLA does not fuse across
    a conditional; without one, XLA on the CPU fuses the chain of additions that carries the
    residual stream's gradient back through every block into each of its consumers and
    recomputes it there, a cost quadratic in the depth."""
    if keep is None:
        if not (boundary is True and block_boundaries()):
            return body(x)
        return ops.cond(always_true(x), lambda: body(x), lambda: x)
    return ops.cond(ops.convert_to_tensor(keep) > 0, lambda: body(x), lambda: x)


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticAttention(keras.layers.Layer):
    """Multi-head self-attention with a fused qkv projection and a fixed head dim.

    Heads = active width / head_dim: narrowing the width removes whole heads. The q, k and v
    groups of the fused projection are sliced separately (first w rows of each).
    Input/output (B, N, dim) or (B, N, w) when elastic.
    """

    def __init__(self, dim, head_dim, qkv_bias=True, proj_bias=True, **kwargs):
        super().__init__(**kwargs)
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of the head dim {head_dim}")
        self.dim = int(dim)
        self.head_dim = int(head_dim)
        self.qkv_bias = bool(qkv_bias)
        self.proj_bias = bool(proj_bias)
        self.qkv = ElasticDense(dim, dim, groups=3, use_bias=qkv_bias, dtype=self.dtype_policy,
                                kernel_initializer=trunc_normal(), quantize_input=True,
                                name="qkv")
        self.proj = ElasticDense(dim, dim, use_bias=proj_bias, dtype=self.dtype_policy,
                                 kernel_initializer=trunc_normal(), quantize_input=True,
                                 name="proj")

    def build(self, input_shape=None):
        self.qkv.build()
        self.proj.build()

    def call(self, x, active=None, return_logits=False):
        """``return_logits``: also return the pre-softmax attention logits
        ``q kᵀ / sqrt(head_dim)``, (B, heads, N, N): the attention is then computed by explicit
        matmuls (the same function; the fused ``dot_product_attention`` otherwise)."""
        width = self.dim if active is None else active
        if width % self.head_dim:
            raise ValueError(f"{self.name}: active width {width} is not a multiple of the head "
                             f"dim {self.head_dim}")
        heads = width // self.head_dim
        if active is None:
            qkv = self.qkv(x)
        else:
            qkv = self.qkv(x, active_in=width, active_out=width)
        b, n = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(qkv, (b, n, 3, heads, self.head_dim))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = None
        if return_logits:
            q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))  # (B, heads, N, hd)
            logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (self.head_dim ** -0.5)
            weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), v.dtype)
            y = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        else:
            y = ops.dot_product_attention(q, k, v)  # (B, N, heads, head_dim)
        y = ops.reshape(y, (b, n, width))
        if active is None:
            y = self.proj(y)
        else:
            y = self.proj(y, active_in=width, active_out=width)
        return (y, logits) if return_logits else y

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, head_dim=self.head_dim, qkv_bias=self.qkv_bias,
                      proj_bias=self.proj_bias)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticMLP(keras.layers.Layer):
    """fc1 -> GELU (exact) -> fc2, hidden width = mlp_ratio * active width."""

    def __init__(self, dim, mlp_ratio=4.0, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.mlp_ratio = float(mlp_ratio)
        self.use_bias = bool(use_bias)
        self.hidden = int(self.dim * self.mlp_ratio)
        self.fc1 = ElasticDense(self.dim, self.hidden, use_bias=use_bias,
                                kernel_initializer=trunc_normal(), dtype=self.dtype_policy,
                                quantize_input=True, name="fc1")
        self.fc2 = ElasticDense(self.hidden, self.dim, use_bias=use_bias,
                                kernel_initializer=trunc_normal(), dtype=self.dtype_policy,
                                quantize_input=True, name="fc2")

    def build(self, input_shape=None):
        self.fc1.build()
        self.fc2.build()

    def active_hidden(self, active):
        return int(active * self.mlp_ratio)

    def call(self, x, active=None):
        if active is None:
            return self.fc2(keras.activations.gelu(self.fc1(x), approximate=False))
        hidden = self.active_hidden(active)
        h = self.fc1(x, active_in=active, active_out=hidden)
        h = keras.activations.gelu(h, approximate=False)
        return self.fc2(h, active_in=hidden, active_out=active)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, mlp_ratio=self.mlp_ratio, use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticBlock(keras.layers.Layer):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, head_dim, mlp_ratio=4.0, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, layer_scale_init=None, drop_path=0.0, norm_epsilon=1e-6,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.head_dim = int(head_dim)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias, self.proj_bias, self.ffn_bias = bool(qkv_bias), bool(proj_bias), \
            bool(ffn_bias)
        self.layer_scale_init = layer_scale_init
        self.drop_path_rate = float(drop_path)
        self.norm_epsilon = float(norm_epsilon)
        policy = self.dtype_policy
        self.norm1 = ElasticLayerNorm(dim, norm_epsilon, dtype=policy, name="norm1")
        self.attn = ElasticAttention(dim, head_dim, qkv_bias, proj_bias, dtype=policy,
                                     name="attn")
        self.norm2 = ElasticLayerNorm(dim, norm_epsilon, dtype=policy, name="norm2")
        self.mlp = ElasticMLP(dim, mlp_ratio, ffn_bias, dtype=policy, name="mlp")
        if layer_scale_init:
            self.ls1 = ElasticLayerScale(dim, layer_scale_init, dtype=policy, name="ls1")
            self.ls2 = ElasticLayerScale(dim, layer_scale_init, dtype=policy, name="ls2")
        else:
            self.ls1 = self.ls2 = None
        self.drop_path = StochasticDepth(drop_path, dtype=policy, name="drop_path")

    def build(self, input_shape=None):
        for layer in (self.norm1, self.attn, self.norm2, self.mlp, self.ls1, self.ls2):
            if layer is not None:
                layer.build()
        self.drop_path.build(None)  # weightless, but Model.quantize wants every layer built

    def call(self, x, active=None, training=None, keep=None, probe=False):
        """``keep``: None, or a run-time 0/1 scalar; 0 skips the block (``skippable``).

        ``probe=True`` (with ``keep=None``) returns ``(y, {"norm1": norm1(x), "attention_logits":
        (B, heads, N, N) pre-softmax logits})`` instead of ``y``: what the layer-wise analysis
        and attention distillation read. ``y`` is the same function of ``x``."""
        noise = [self.drop_path.noise(x, training) for _ in range(2)]
        probes = {}

        def body(x):
            h = self.norm1(x, active=active)
            if probe:
                y, probes["attention_logits"] = self.attn(h, active=active, return_logits=True)
                probes["norm1"] = h
            else:
                y = self.attn(h, active=active)
            if self.ls1 is not None:
                y = self.ls1(y, active=active)
            x = x + self.drop_path.apply(y, noise[0])
            y = self.mlp(self.norm2(x, active=active), active=active)
            if self.ls2 is not None:
                y = self.ls2(y, active=active)
            return x + self.drop_path.apply(y, noise[1])

        if probe:
            if keep is not None:
                raise ValueError("probe=True needs a static depth (keep=None)")
            return body(x), probes
        return skippable(keep, x, body, boundary=training)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                      qkv_bias=self.qkv_bias, proj_bias=self.proj_bias, ffn_bias=self.ffn_bias,
                      layer_scale_init=self.layer_scale_init, drop_path=self.drop_path_rate,
                      norm_epsilon=self.norm_epsilon)
        return config

"""Elastic Swin pieces: (shifted-)window attention with a relative position bias, the Swin
block and patch merging. Same two forwards as ``elastic/layers.py``: ``layer(x)`` is the plain
full layer (ordinary Keras layers, quantizable), ``layer(x, active=...)`` runs the first
channels of every weight with alpha = max_in / active_in folded into the sliced kernels.

Feature maps are channels-last, (B, H, W, C), everywhere in this module.

Window attention (Swin, Liu et al. 2021): windows of M x M tokens, heads = C / head_dim (head
dim fixed, so narrowing the width removes whole heads), scores q k^T / sqrt(head_dim) plus a
learned relative position bias ``table[index]``, where ``table`` is ((2M-1)^2, heads) and
``index[i, j] = (dy + M - 1) * (2M - 1) + (dx + M - 1)`` for the offset (dy, dx) = position of
query i - position of key j inside the window (``relative_position_index``). A sub-network
uses the table of its FIRST heads (``table[:, :heads]``), the heads its sliced q/k/v compute.

Shifted windows: blocks with ``shift=True`` roll the map by -M//2 on both axes before the
window partition and back after it; the attention mask (``shift_attention_mask``) keeps tokens
that came from different regions of the un-rolled map apart (-100 on the scores, as Swin).

Maps whose sides are not multiples of M are padded with zeros at the bottom/right after norm1
(the padded tokens take part in attention as keys, unmasked) and cropped back afterwards; the
shift is applied on the padded map. This is the padding of mmdet's Swin, which POA's
reference code (alipay/POA, poa/layers/attention.py) uses, so any map size runs.

Patch merging (``ElasticPatchMerging``): each 2 x 2 neighbourhood of a (B, H, W, C) map becomes
one 4C vector -> LayerNorm(4C) -> Linear(4C -> 2C, no bias). Odd sides are padded with zeros at
the bottom/right first (mmdet's "corner" adaptive padding, as the reference), so the output is
(B, ceil(H/2), ceil(W/2), 2C).

Merge channel order: POSITION-MAJOR, in the order of the original Swin (and timm /
torchvision): channel ``p * C + c`` is channel c of neighbour p, with p = 0: (row 0, col 0),
1: (row 1, col 0), 2: (row 0, col 1), 3: (row 1, col 1) (``MERGE_POSITIONS``). Official Swin
checkpoints therefore load without any permutation. POA's reference concatenates the positions
row-major -- (0,0), (0,1), (1,0), (1,1) (``REFERENCE_MERGE_POSITIONS``): positions 1 and 2
swapped; ``merge_rows_from_reference`` converts its LayerNorm and reduction weights.

Position-major is what makes first-k slicing work: a sub-network with c of C active channels
merges 4 blocks of c channels, which are rows ``[p*C, p*C + c)`` of the full (4C, 2C) kernel
for p = 0..3 -- the kernel (and the 4C LayerNorm's gamma/beta) is sliced per position block,
as ``ElasticDense(groups=...)`` slices its outputs; the first 2c outputs are kept and
alpha = 4C / 4c = C / c. The merged LayerNorm normalises over the 4c active channels, exactly
as the extracted LayerNorm(4c) does.
"""
from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from poa_keras.quantization.observer import (ActivationQuantizer, current_quant,
                                             quantize_kernel)
from poa_keras.elastic.layers import (ElasticDense, ElasticLayerNorm, ElasticMLP,
                                      HostInitializer, StochasticDepth, check_active,
                                      check_not_quantized, fold_alpha, read_weight,
                                      skippable, trunc_normal)

# (row, col) offset of each 2 x 2 neighbour, in the order of the merged channel blocks.
MERGE_POSITIONS = ((0, 0), (1, 0), (0, 1), (1, 1))            # ours = original Swin / timm
REFERENCE_MERGE_POSITIONS = ((0, 0), (0, 1), (1, 0), (1, 1))  # alipay/POA (nn.Unfold order)


@functools.lru_cache(maxsize=16)
def relative_position_index(window_size: int) -> np.ndarray:
    """(M*M, M*M) int32: index into the ((2M-1)^2, heads) bias table for every (query, key)
    pair of a window, tokens in row-major order (Swin's ``relative_position_index``). Cached:
    do not modify the result."""
    m = int(window_size)
    coords = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (m - 1)   # (2, N, N), in [0, 2M-2]
    return (rel[0] * (2 * m - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=64)
def shift_attention_mask(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
    """(num_windows, M*M, M*M) float32 additive mask of shifted-window attention on a
    (height, width) map (multiples of M): 0 where query and key come from the same region of
    the un-rolled map, -100 elsewhere (Swin). Windows in row-major order. Cached: do not
    modify the result."""
    m, s = int(window_size), int(shift)
    if height % m or width % m:
        raise ValueError(f"map {height}x{width} is not a multiple of the window {m}")
    regions = np.zeros((height, width), np.int64)
    label = 0
    for rows in (slice(0, -m), slice(-m, -s), slice(-s, None)):
        for cols in (slice(0, -m), slice(-m, -s), slice(-s, None)):
            regions[rows, cols] = label
            label += 1
    windows = regions.reshape(height // m, m, width // m, m).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, m * m)
    return np.where(windows[:, :, None] == windows[:, None, :], 0.0, -100.0).astype(np.float32)


def merge_rows_from_reference(array, dim):
    """Reorders the 4*dim leading axis (LayerNorm gamma/beta, or the rows of the reduction
    kernel in (in, out) layout) of a patch merging from POA's reference position order
    (``REFERENCE_MERGE_POSITIONS``) to ours (``MERGE_POSITIONS``)."""
    array = np.asarray(array)
    blocks = array.reshape((4, int(dim)) + array.shape[1:])
    order = [REFERENCE_MERGE_POSITIONS.index(p) for p in MERGE_POSITIONS]
    return blocks[order].reshape(array.shape)


def window_partition(x, window_size):
    """(B, H, W, C) with H, W multiples of M -> (B * H/M * W/M, M*M, C), windows row-major."""
    _, h, w, c = x.shape
    m = int(window_size)
    x = ops.reshape(x, (-1, h // m, m, w // m, m, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, m * m, c))


def window_reverse(windows, window_size, height, width):
    """Inverse of ``window_partition``: (B * nW, M*M, C) -> (B, height, width, C)."""
    m = int(window_size)
    c = windows.shape[-1]
    x = ops.reshape(windows, (-1, height // m, width // m, m, m, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, height, width, c))


def _roll2d(x, shift):
    return ops.roll(ops.roll(x, shift, axis=1), shift, axis=2)


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticWindowAttention(keras.layers.Layer):
    """Multi-head self-attention inside M x M windows with a relative position bias.

    Input/output (B * nW, M*M, dim), or (B * nW, M*M, w) when elastic (heads = w / head_dim,
    the first heads of the bias table). ``attention_mask``: None or (nW, M*M, M*M) added to the
    scores of every image's nW windows.
    """

    def __init__(self, dim, head_dim, window_size, qkv_bias=True, proj_bias=True, **kwargs):
        super().__init__(**kwargs)
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of the head dim {head_dim}")
        self.dim = int(dim)
        self.head_dim = int(head_dim)
        self.window_size = int(window_size)
        self.qkv_bias = bool(qkv_bias)
        self.proj_bias = bool(proj_bias)
        self.num_heads = self.dim // self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = ElasticDense(dim, dim, groups=3, use_bias=qkv_bias, dtype=self.dtype_policy,
                                kernel_initializer=trunc_normal(), quantize_input=True,
                                name="qkv")
        self.proj = ElasticDense(dim, dim, use_bias=proj_bias, dtype=self.dtype_policy,
                                 kernel_initializer=trunc_normal(), quantize_input=True,
                                 name="proj")

    def build(self, input_shape=None):
        self.qkv.build()
        self.proj.build()
        self.relative_position_bias_table = self.add_weight(
            shape=((2 * self.window_size - 1) ** 2, self.num_heads),
            initializer=trunc_normal(), name="relative_position_bias_table")

    def sliced_bias_table(self, heads, on_host=False):
        """The ((2M-1)^2, heads) table of the first `heads` heads."""
        check_active(heads, self.num_heads, "heads", self.name)
        return read_weight(self.relative_position_bias_table, on_host)[:, :heads]

    def relative_bias(self, heads=None):
        """(heads, M*M, M*M): the bias added to the scores of every window."""
        heads = self.num_heads if heads is None else heads
        table = (self.relative_position_bias_table if heads == self.num_heads
                 else self.sliced_bias_table(heads))
        n = self.window_size ** 2
        index = ops.convert_to_tensor(relative_position_index(self.window_size).reshape(-1))
        bias = ops.reshape(ops.take(table, index, axis=0), (n, n, heads))
        return ops.transpose(bias, (2, 0, 1))

    def call(self, x, attention_mask=None, active=None):
        width = self.dim if active is None else active
        if width % self.head_dim:
            raise ValueError(f"{self.name}: active width {width} is not a multiple of the head "
                             f"dim {self.head_dim}")
        heads = width // self.head_dim
        n = x.shape[1]
        if active is None:
            qkv = self.qkv(x)
        else:
            qkv = self.qkv(x, active_in=width, active_out=width)
        qkv = ops.reshape(qkv, (-1, n, 3, heads, self.head_dim))
        q = qkv[:, :, 0] * ops.cast(self.scale, qkv.dtype)
        k, v = qkv[:, :, 1], qkv[:, :, 2]
        scores = ops.einsum("bqhd,bkhd->bhqk", q, k)
        scores = scores + ops.cast(self.relative_bias(heads), scores.dtype)[None]
        if attention_mask is not None:
            num_windows = attention_mask.shape[0]
            scores = ops.reshape(scores, (-1, num_windows, heads, n, n))
            scores = scores + ops.cast(attention_mask, scores.dtype)[None, :, None]
            scores = ops.reshape(scores, (-1, heads, n, n))
        attn = ops.softmax(scores, axis=-1)
        y = ops.reshape(ops.einsum("bhqk,bkhd->bqhd", attn, v), (-1, n, width))
        if active is None:
            return self.proj(y)
        return self.proj(y, active_in=width, active_out=width)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, head_dim=self.head_dim, window_size=self.window_size,
                      qkv_bias=self.qkv_bias, proj_bias=self.proj_bias)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticSwinBlock(keras.layers.Layer):
    """Swin block on a (B, H, W, C) map: x + drop_path(W-MSA(norm1(x))), then
    x + drop_path(mlp(norm2(x))). ``shift``: shifted windows (shift M // 2, with the mask).
    Any H, W (padding, see the module docstring). Elastic: (B, H, W, w) with ``active=w``.
    """

    def __init__(self, dim, head_dim, window_size=7, shift=False, mlp_ratio=4.0, qkv_bias=True,
                 proj_bias=True, ffn_bias=True, drop_path=0.0, norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.head_dim = int(head_dim)
        self.window_size = int(window_size)
        self.shift = bool(shift)
        self.shift_size = self.window_size // 2 if self.shift else 0
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias, self.proj_bias, self.ffn_bias = bool(qkv_bias), bool(proj_bias), \
            bool(ffn_bias)
        self.drop_path_rate = float(drop_path)
        self.norm_epsilon = float(norm_epsilon)
        policy = self.dtype_policy
        self.norm1 = ElasticLayerNorm(dim, norm_epsilon, dtype=policy, name="norm1")
        self.attn = ElasticWindowAttention(dim, head_dim, window_size, qkv_bias, proj_bias,
                                           dtype=policy, name="attn")
        self.norm2 = ElasticLayerNorm(dim, norm_epsilon, dtype=policy, name="norm2")
        self.mlp = ElasticMLP(dim, mlp_ratio, ffn_bias, dtype=policy, name="mlp")
        self.drop_path = StochasticDepth(drop_path, dtype=policy, name="drop_path")

    def build(self, input_shape=None):
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build()
        self.drop_path.build(None)

    def _windowed_attention(self, x, active):
        _, h, w, _ = x.shape
        m, s = self.window_size, self.shift_size
        pad_b, pad_r = (-h) % m, (-w) % m
        if pad_b or pad_r:
            x = ops.pad(x, [[0, 0], [0, pad_b], [0, pad_r], [0, 0]])
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if s:
            x = _roll2d(x, -s)
            mask = ops.convert_to_tensor(shift_attention_mask(hp, wp, m, s))
        y = self.attn(window_partition(x, m), attention_mask=mask, active=active)
        y = window_reverse(y, m, hp, wp)
        if s:
            y = _roll2d(y, s)
        if pad_b or pad_r:
            y = y[:, :h, :w]
        return y

    def call(self, x, active=None, training=None, keep=None):
        """``keep``: None, or a run-time 0/1 scalar; 0 skips the block (``skippable``)."""
        noise = [self.drop_path.noise(x, training) for _ in range(2)]

        def body(x):
            y = self._windowed_attention(self.norm1(x, active=active), active)
            x = x + self.drop_path.apply(y, noise[0])
            y = self.mlp(self.norm2(x, active=active), active=active)
            return x + self.drop_path.apply(y, noise[1])

        return skippable(keep, x, body, boundary=training)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, head_dim=self.head_dim, window_size=self.window_size,
                      shift=self.shift, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                      proj_bias=self.proj_bias, ffn_bias=self.ffn_bias,
                      drop_path=self.drop_path_rate, norm_epsilon=self.norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticPatchMerging(keras.layers.Layer):
    """2 x 2 patch merging: (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), 2 dim), or with
    ``active=c``: (B, H, W, c) -> (..., 2c). See the module docstring for the channel order
    and the per-position slicing."""

    def __init__(self, dim, norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.norm_epsilon = float(norm_epsilon)
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.norm_epsilon, gamma_initializer=HostInitializer("ones"),
            beta_initializer=HostInitializer("zeros"), dtype=self.dtype_policy, name="norm")
        self.reduction = keras.layers.Dense(
            2 * self.dim, use_bias=False, kernel_initializer=trunc_normal(),
            dtype=self.dtype_policy, name="reduction")
        # the reduction is a linear layer like the others: input and kernel fake-quantized
        # inside a quantization scope
        self.input_quantizer = ActivationQuantizer(dtype=self.dtype_policy,
                                                   name="input_quantizer")

    def build(self, input_shape=None):
        self.norm.build((None, 4 * self.dim))
        self.reduction.build((None, 4 * self.dim))
        self.input_quantizer.build()

    def sliced_weights(self, active, on_host=False):
        """(gamma (4c,), beta (4c,), kernel * alpha (4c, 2c)) for c active input channels."""
        check_not_quantized(self.reduction, self)
        check_active(active, self.dim, "channels", self.name)
        full = self.dim
        reshape = np.reshape if on_host else ops.reshape
        gamma = read_weight(self.norm.gamma, on_host)
        beta = read_weight(self.norm.beta, on_host)
        kernel = read_weight(self.reduction.kernel, on_host)
        if active == full:
            return gamma, beta, kernel
        gamma = reshape(reshape(gamma, (4, full))[:, :active], (4 * active,))
        beta = reshape(reshape(beta, (4, full))[:, :active], (4 * active,))
        kernel = reshape(kernel, (4, full, 2 * full))[:, :active, :2 * active]
        kernel = fold_alpha(reshape(kernel, (4 * active, 2 * active)), full, active)
        return gamma, beta, kernel

    @staticmethod
    def merge(x):
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), position-major (MERGE_POSITIONS)."""
        _, h, w, c = x.shape
        pad_b, pad_r = h % 2, w % 2
        if pad_b or pad_r:
            x = ops.pad(x, [[0, 0], [0, pad_b], [0, pad_r], [0, 0]])
            h, w = h + pad_b, w + pad_r
        x = ops.reshape(x, (-1, h // 2, 2, w // 2, 2, c))      # (B, h, row, w, col, C)
        x = ops.transpose(x, (0, 1, 3, 4, 2, 5))               # (B, h, w, col, row, C)
        return ops.reshape(x, (-1, h // 2, w // 2, 4 * c))     # block p = 2 col + row

    def call(self, x, active=None):
        x = self.merge(x)
        quantized = current_quant() is not None
        if active is None and not quantized:
            return self.reduction(self.norm(x))
        gamma, beta, kernel = self.sliced_weights(self.dim if active is None else active)
        x = ops.layer_normalization(x, gamma, beta, -1, self.norm_epsilon)
        x = ops.cast(x, self.compute_dtype)
        if quantized:
            x = self.input_quantizer(x)
            kernel = quantize_kernel(kernel, "auto", self)
        return ops.matmul(x, ops.cast(kernel, x.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, norm_epsilon=self.norm_epsilon)
        return config

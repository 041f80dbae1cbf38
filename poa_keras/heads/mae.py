"""MAE's lightweight decoder and MAE-Lite's attention head mapping (REFERENCE.md §3).

``MAEDecoder`` (MAE-Lite's: width 96, 1 block, 3 heads, MLP 384)::

    latent (B, 1 + K, in_dim)  -- the encoder's final-norm CLS + visible tokens
      -> Linear(in_dim -> dim)                                      decoder_embed
      -> append N - K mask tokens, unshuffle with ids_restore       (B, 1 + N, dim)
      -> + fixed 2-D sin-cos position embedding (CLS row zeros)     of the patch grid
      -> depth x transformer block (pre-norm, dim / num_heads per head)
      -> LayerNorm -> Linear(dim -> p * p * C)                     decoder_pred
      -> drop the CLS token                                         (B, N, p * p * C)

The blocks are ``ElasticBlock`` (the library's one transformer block) used at full width.
``decoder_embed`` is an ``ElasticDense``: an elastic encoder's narrower subnet feeds it its
first ``active_in`` channels (POA's input scaling rule), so one decoder serves every width.

``AttentionHeadMapping``: a 1 x 1 convolution over the head axis without bias (MAE-Lite's
``attn_adapter``: ``nn.Conv2d(student_heads, teacher_heads, 1, bias=False)``), always present,
even when the head counts match: ``mapped[b, t] = sum_s W[t, s] * logits[b, s]``.

Initialisation: the decoder's mask token normal(0.02) as MAE; its linears Glorot-uniform (MAE's
xavier_uniform), its blocks the library's truncated normal(0.02) (MAE: xavier_uniform);
the head mapping PyTorch's Conv2d default, uniform(+-1 / sqrt(student_heads)).
"""
from __future__ import annotations

import math

import keras
from keras import ops

from poa_keras.elastic.layers import ElasticBlock, ElasticDense, ElasticLayerNorm, HostInitializer
from poa_keras.elastic.position import sincos_position_embedding


@keras.saving.register_keras_serializable(package="poa_keras")
class MAEDecoder(keras.layers.Layer):
    """MAE's decoder (module docstring).

    Args:
        in_dim: the encoder's (full) width.
        patch_size, in_channels: of the encoder; the prediction has p * p * C values per patch.
        dim, depth, num_heads, mlp_ratio: the decoder's width, blocks, heads, MLP ratio
            (MAE-Lite: 96, 1, 3, 4; MAE ViT-B: 512, 8, 16, 4).
        norm_epsilon: LayerNorm epsilon (1e-6).

    Call: ``decoder(latent, ids_restore, grid, active_in=None)`` with the encoder's output
    tokens ``latent`` (B, 1 + K, w), ``ids_restore`` (B, N) from ``losses.mae_masking`` and the
    patch grid ``(grid_h, grid_w)`` (N = grid_h * grid_w); ``active_in``: the encoder subnet's
    width when narrower than ``in_dim``. Returns (B, N, p * p * C).
    """

    def __init__(self, in_dim, patch_size, in_channels=3, dim=96, depth=1, num_heads=3,
                 mlp_ratio=4.0, norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        for what, value in (("in_dim", in_dim), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MAEDecoder {what} must be a positive integer, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"MAEDecoder dim={dim} is not a multiple of num_heads={num_heads}")
        if dim % 4:
            raise ValueError(f"MAEDecoder dim={dim} must be a multiple of 4 (its 2-D sin-cos "
                             "position embedding)")
        self.in_dim, self.patch_size, self.in_channels = int(in_dim), int(patch_size), \
            int(in_channels)
        self.dim, self.depth, self.num_heads = int(dim), int(depth), int(num_heads)
        self.mlp_ratio, self.norm_epsilon = float(mlp_ratio), float(norm_epsilon)
        self.out_dim = self.patch_size ** 2 * self.in_channels
        policy = self.dtype_policy
        self.decoder_embed = ElasticDense(self.in_dim, self.dim, dtype=policy,
                                          name="decoder_embed")
        self.blocks = [ElasticBlock(self.dim, self.dim // self.num_heads, self.mlp_ratio,
                                    norm_epsilon=self.norm_epsilon, dtype=policy,
                                    name=f"decoder_blocks_{i}") for i in range(self.depth)]
        self.decoder_norm = ElasticLayerNorm(self.dim, self.norm_epsilon, dtype=policy,
                                             name="decoder_norm")
        self.decoder_pred = ElasticDense(self.dim, self.out_dim, dtype=policy,
                                         name="decoder_pred")
        self._tables = {}

    def build(self, input_shape=None):
        self.mask_token = self.add_weight(shape=(1, 1, self.dim), name="mask_token",
                                          initializer=HostInitializer("normal", stddev=0.02))
        for layer in (self.decoder_embed, *self.blocks, self.decoder_norm, self.decoder_pred):
            layer.build()
        self.built = True

    def position_embedding(self, grid_h, grid_w):
        key = (int(grid_h), int(grid_w))
        if key not in self._tables:
            self._tables[key] = sincos_position_embedding(grid_h, grid_w, self.dim)[None]
        return self._tables[key]

    def call(self, latent, ids_restore, grid, active_in=None, training=None):
        grid_h, grid_w = (int(g) for g in grid)
        num_patches = grid_h * grid_w
        if ids_restore.shape[1] != num_patches:
            raise ValueError(f"ids_restore covers {ids_restore.shape[1]} patches, the grid "
                             f"{grid_h} x {grid_w} has {num_patches}")
        if active_in is not None and int(active_in) != self.in_dim:
            x = self.decoder_embed(latent, active_in=int(active_in), active_out=self.dim)
        else:
            x = self.decoder_embed(latent)
        visible = x.shape[1] - 1
        tokens = ops.zeros_like(x[:, :1, :1]) + ops.zeros((1, num_patches - visible, 1),
                                                           x.dtype)
        masked = tokens + ops.cast(self.mask_token, x.dtype)
        patches = ops.concatenate([x[:, 1:], masked], axis=1)        # shuffled order
        index = ops.expand_dims(ops.cast(ids_restore, "int32"), -1)
        patches = ops.take_along_axis(patches, index, axis=1)        # the grid's order
        x = ops.concatenate([x[:, :1], patches], axis=1)
        x = x + ops.convert_to_tensor(self.position_embedding(grid_h, grid_w), dtype=x.dtype)
        for block in self.blocks:
            x = block(x, training=training)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def get_config(self):
        config = super().get_config()
        config.update(in_dim=self.in_dim, patch_size=self.patch_size,
                      in_channels=self.in_channels, dim=self.dim, depth=self.depth,
                      num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      norm_epsilon=self.norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="poa_keras")
class AttentionHeadMapping(keras.layers.Layer):
    """MAE-Lite's head mapping (module docstring): (B, student_heads, T, T) ->
    (B, teacher_heads, T, T), ``kernel`` (teacher_heads, student_heads), no bias."""

    def __init__(self, student_heads, teacher_heads, **kwargs):
        super().__init__(**kwargs)
        for what, value in (("student_heads", student_heads), ("teacher_heads", teacher_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionHeadMapping {what} must be a positive integer, "
                                 f"got {value!r}")
        self.student_heads, self.teacher_heads = int(student_heads), int(teacher_heads)

    def build(self, input_shape=None):
        bound = 1.0 / math.sqrt(self.student_heads)
        self.kernel = self.add_weight(
            shape=(self.teacher_heads, self.student_heads), name="kernel",
            initializer=keras.initializers.RandomUniform(-bound, bound))
        self.built = True

    def call(self, logits):
        if logits.shape[1] != self.student_heads:
            raise ValueError(f"{self.name} maps {self.student_heads} student heads, got "
                             f"attention logits with {logits.shape[1]} (shape "
                             f"{tuple(logits.shape)})")
        return ops.einsum("ts,bsij->btij", ops.cast(self.kernel, logits.dtype), logits)

    def get_config(self):
        config = super().get_config()
        config.update(student_heads=self.student_heads, teacher_heads=self.teacher_heads)
        return config

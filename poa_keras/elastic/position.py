"""Fixed position embeddings: MAE's 2-D sin-cos table (used by ``ElasticViT(pos_embed="sincos")``
and by MAE's decoder, heads/mae.py)."""
from __future__ import annotations

import numpy as np


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, cls_token: bool = True):
    """MAE's fixed 2-D sin-cos position embedding, (1 + grid_h * grid_w, dim) float32 (a zero
    row first for the CLS token with ``cls_token``), tokens in row-major order.

    As MAE's ``get_2d_sincos_pos_embed``: the first dim / 2 channels encode the token's COLUMN,
    the last dim / 2 its ROW; each half is [sin(p * omega), cos(p * omega)] with
    ``omega_i = 10000 ** (-i / (dim / 4))``, i < dim / 4. Non-square grids follow the same
    rule. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width that is a multiple "
                         f"of 4, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(positions):
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype("float32")

"""Elastic slicing and alpha against an independent numpy implementation of the reference rule
(REFERENCE.md §1 "Elastic ViT"): first-k inputs and first-m outputs, q/k/v groups sliced
separately, every elastic linear input scaled by alpha = max_in / active_in."""
import numpy as np
import pytest
from conftest import forward, to_np
from scipy.special import erf

from poa_keras.elastic import ElasticDense, ViTSubnet


def test_dense_slicing_and_alpha_against_numpy():
    layer = ElasticDense(12, 10, groups=3)
    layer.build()
    rng = np.random.default_rng(0)
    layer.dense.kernel.assign(rng.normal(size=(12, 30)).astype("float32"))
    layer.dense.bias.assign(rng.normal(size=(30,)).astype("float32"))
    x = rng.normal(size=(4, 5)).astype("float32")
    kernel, bias = to_np(layer.dense.kernel), to_np(layer.dense.bias)
    cols = np.concatenate([np.arange(g * 10, g * 10 + 7) for g in range(3)])
    expected = (x * (12 / 5)) @ kernel[:5][:, cols] + bias[cols]
    np.testing.assert_allclose(to_np(layer(x, active_in=5, active_out=7)), expected, rtol=1e-5,
                               atol=1e-5)


def test_dense_rejects_active_sizes_out_of_range():
    layer = ElasticDense(8, 8)
    layer.build()
    with pytest.raises(ValueError, match=r"active inputs 9 must lie in \[1, 8\]"):
        layer(np.zeros((1, 9), "float32"), active_in=9, active_out=8)


# -- an independent numpy ViT following the reference rule -----------------------------------
def _ln(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def numpy_elastic_vit(model, images, width, depth):
    """The reference elastic forward, written from REFERENCE.md with numpy only (float64)."""
    D, L, dh, p = model.embed_dim, model.depth, model.head_dim, model.patch_size
    hidden_max = int(D * model.mlp_ratio)
    hidden = int(width * model.mlp_ratio)
    alpha = D / width
    B, H, W, C = images.shape
    # patch embedding: a strided conv = matmul over flattened p x p x C patches
    patches = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
    k = to_np(model.patch_embed.proj.kernel).reshape(p * p * C, D)[:, :width]
    x = patches @ k + to_np(model.patch_embed.proj.bias)[:width]
    cls = np.broadcast_to(to_np(model.cls_token)[:, :, :width], (B, 1, width))
    x = np.concatenate([cls, x], axis=1) + to_np(model.pos_embed)[:, :, :width]
    blocks = [int(np.floor((L - 1) * j / (depth - 1))) for j in range(depth)] if depth > 1 \
        else [0]
    for i in blocks:
        blk = model.blocks[i]
        h = _ln(x, to_np(blk.norm1.norm.gamma)[:width], to_np(blk.norm1.norm.beta)[:width])
        wqkv, bqkv = to_np(blk.attn.qkv.dense.kernel), to_np(blk.attn.qkv.dense.bias)
        q, kk, v = [(h * alpha) @ wqkv[:width, g * D: g * D + width] + bqkv[g * D: g * D + width]
                    for g in range(3)]
        heads = width // dh
        split = lambda t: t.reshape(B, -1, heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q, kk, v = split(q), split(kk), split(v)
        logits = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(dh)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        o = (attn @ v).transpose(0, 2, 1, 3).reshape(B, -1, width)
        o = (o * alpha) @ to_np(blk.attn.proj.dense.kernel)[:width, :width] \
            + to_np(blk.attn.proj.dense.bias)[:width]
        x = x + o * to_np(blk.ls1.gamma)[:width]
        h = _ln(x, to_np(blk.norm2.norm.gamma)[:width], to_np(blk.norm2.norm.beta)[:width])
        h = (h * alpha) @ to_np(blk.mlp.fc1.dense.kernel)[:width, :hidden] \
            + to_np(blk.mlp.fc1.dense.bias)[:hidden]
        h = _gelu(h)
        h = (h * (hidden_max / hidden)) @ to_np(blk.mlp.fc2.dense.kernel)[:hidden, :width] \
            + to_np(blk.mlp.fc2.dense.bias)[:width]
        x = x + h * to_np(blk.ls2.gamma)[:width]
    return _ln(x, to_np(model.norm.norm.gamma)[:width], to_np(model.norm.norm.beta)[:width])


@pytest.mark.parametrize("width,depth", [(32, 2), (48, 4), (64, 3), (96, 5), (96, 6), (80, 6)])
def test_elastic_vit_forward_against_numpy_reference(small_vit, images, width, depth):
    out = forward(small_vit, images, ViTSubnet(width, depth))
    ref = numpy_elastic_vit(small_vit, images.astype(np.float64), width, depth)
    np.testing.assert_allclose(to_np(out["cls"]), ref[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(out["patch_tokens"]), ref[:, 1:], rtol=1e-4, atol=1e-4)

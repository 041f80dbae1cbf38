"""The timm-style ViT state dicts of DINO, DINOv2, MAE and MAE-Lite -> an ``ElasticViT`` (and
MAE's decoder -> an ``MAEDecoder``), one weight per key.

All four publish the same block layout (docs/zoo.md lists the files and where each fact was
read)::

    cls_token (1, 1, D)   pos_embed (1, 1 + g*g, D)   patch_embed.proj.{weight (D, C, p, p), bias}
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 .{weight, bias}
    blocks.{i}.ls1.gamma, blocks.{i}.ls2.gamma          (DINOv2's LayerScale)
    mask_token (1, D)                                   (DINOv2)
    norm.{weight, bias}
    decoder_embed / decoder_blocks.{i}.* / decoder_norm / decoder_pred, mask_token (1, 1, d),
    decoder_pos_embed                                   (MAE's and MAE-Lite's full files)

Our variable paths follow the same names (``blocks_3/attn/qkv/dense/kernel`` ->
``blocks.3.attn.qkv.weight``), so the mapping is one rule (``official_key``). qkv rows are
[q; k; v], head-major, in both. MAE's position embeddings are its fixed 2-D sin-cos tables: the
ElasticViT (``pos_embed="sincos"``) and the decoder regenerate them for every grid, so the
checkpoint's tables are checked against ours (refused if they differ) instead of loaded.
"""
from __future__ import annotations

import numpy as np

from poa_keras.convert.state import NORM_KEYS, assign_state
from poa_keras.elastic import weights_by_path
from poa_keras.elastic.position import sincos_position_embedding

_SKIPPED = ("range",)   # fake-quantizer ranges: our state, not the checkpoint's


def official_key(path, ndim):
    """(official key, layout) of a ViT / MAE-decoder variable from its path below the layer's
    own name: ``blocks_3/norm1/norm/gamma`` -> ("blocks.3.norm1.weight", "same"),
    ``patch_embed/proj/kernel`` -> ("patch_embed.proj.weight", "conv")."""
    parts = path.split("/")
    leaf, layers = parts[-1], []
    for i, part in enumerate(parts[:-1]):
        if part == "dense" or (part == "norm" and i > 0):   # the inner layer of a wrapper
            continue
        head, _, index = part.rpartition("_")
        layers.append(f"{head}.{index}" if head.endswith("blocks") and index.isdigit()
                      else part)
    if leaf == "kernel":
        return ".".join(layers + ["weight"]), "conv" if ndim == 4 else "linear"
    if leaf == "gamma" and layers and layers[-1] in ("ls1", "ls2"):
        return ".".join(layers + ["gamma"]), "same"
    if leaf == "mask_token" and not layers and ndim == 1:
        return "mask_token", "flat"    # DINOv2's (1, D) token; ours is (D,)
    return ".".join(layers + [NORM_KEYS.get(leaf, leaf)]), "same"


def layer_plan(layer):
    """[(variable, official key, layout)] of every weight of an ElasticViT or MAEDecoder."""
    plan = []
    for path, variable in weights_by_path(layer).items():
        if path.rsplit("/", 1)[-1] in _SKIPPED:
            continue
        plan.append((variable, *official_key(path, len(variable.shape))))
    return plan


def check_sincos(state, key, grid_h, grid_w, dim):
    """Checks that ``state[key]`` is MAE's fixed sin-cos table of that grid and width (what our
    models regenerate); a ValueError naming the key and the difference otherwise."""
    if key not in state:
        return
    table = np.asarray(state[key], np.float64)
    expected = sincos_position_embedding(grid_h, grid_w, dim)[None]
    if table.shape != expected.shape:
        raise ValueError(f"{key}: shape {table.shape} is not the {grid_h} x {grid_w} grid's "
                         f"{expected.shape} at width {dim} (is it a checkpoint of another "
                         "size?)")
    error = float(np.max(np.abs(table - expected)))
    if error > 1e-5:
        raise ValueError(f"{key} is not MAE's fixed 2-D sin-cos table (max difference "
                         f"{error:.3g}): a trained position embedding cannot be converted into "
                         "a pos_embed='sincos' model")


def load_vit_state(backbone, state, what, decoder=None):
    """Writes an official ViT state dict (the keys of the module docstring) into ``backbone``
    (an ElasticViT built with the source's architecture) and, for full MAE files, its decoder
    keys into ``decoder`` (an MAEDecoder). Every key is used exactly once."""
    plan = layer_plan(backbone)
    ignored = []
    if backbone.pos_embed is None:   # fixed sin-cos: checked, not loaded
        check_sincos(state, "pos_embed", backbone.grid_size, backbone.grid_size,
                     backbone.embed_dim)
        ignored.append("pos_embed")
    decoder_keys = [k for k in state if k.startswith("decoder_") or
                    (k == "mask_token" and np.ndim(state[k]) == 3)]
    if decoder is None and decoder_keys:
        raise ValueError(f"the checkpoint of {what} holds MAE decoder keys "
                         f"({sorted(decoder_keys)[:3]} ...): convert it with the full MAE "
                         "source, which keeps the decoder")
    if decoder is not None:
        if not decoder_keys:
            raise ValueError(f"the checkpoint of {what} has no decoder keys (decoder_embed.*, "
                             "decoder_blocks.*, ...): it is an encoder-only file")
        plan += [(v, key, layout) for v, key, layout in layer_plan(decoder)]
        check_sincos(state, "decoder_pos_embed", backbone.grid_size, backbone.grid_size,
                     decoder.dim)
        ignored.append("decoder_pos_embed")
    return assign_state(plan, state, what, ignored=ignored)


__all__ = ["check_sincos", "layer_plan", "load_vit_state", "official_key"]

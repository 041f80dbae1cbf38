"""TinyViT's official state dict (microsoft/Cream ``TinyViT/models/tiny_vit.py``; the released
``tiny_vit_{5m,11m,21m}_*.pth``, REFERENCE.md §4) -> a ``TinyViT`` (and its ImageClassifier
head), one weight per key, the configuration read from the shapes.

    from poa_keras.convert import read_torch_checkpoint, tinyvit_from_state_dict
    model = tinyvit_from_state_dict(read_torch_checkpoint("tiny_vit_5m_22kto1k_distill.pth"))
    # an ImageClassifier (1000 classes) on TinyViT(embed_dims=(64, 128, 160, 320), ...)

The mapping is the one of ``backbones/tinyvit.py``'s docstring. Every key of the checkpoint is
used exactly once (the ``attention_bias_idxs`` buffers, which the model recomputes, are
dropped): a missing or an unknown key, or a shape that disagrees with the configuration the
shapes give, is refused by name.
"""
from __future__ import annotations

import re

import numpy as np

from poa_keras.convert.state import NORM_KEYS, RECOMPUTED_BUFFERS, assign_state, model_state
from poa_keras.elastic import weights_by_path


def _state(checkpoint):
    """The state dict of a checkpoint, TinyViT's recomputed buffers left out."""
    state = model_state(checkpoint, "a TinyViT checkpoint (a state dict of arrays, or a dict "
                                    "with one under 'model')")
    return {k: v for k, v in state.items() if not RECOMPUTED_BUFFERS.search(k)}


def _count(state, pattern):
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"the checkpoint's {pattern} indices are {sorted(found)}, not 0..n-1")
    return len(found)


def tinyvit_config(state):
    """The ``TinyViT`` arguments the shapes of an official state dict give (``embed_dims``,
    ``depths``, ``num_heads``, ``window_sizes``, ``mlp_ratio``, ``mbconv_expand_ratio``) and the
    head's classes (None without ``head.weight``)."""
    state = _state(state)
    stages = _count(state, r"layers\.(\d+)\.")
    if stages < 2 or "patch_embed.seq.2.c.weight" not in state:
        raise ValueError("not a TinyViT state dict: it needs patch_embed.seq.* and at least two "
                         f"layers.<i> stages (found {stages})")
    dims, depths, heads, windows = [], [], [], []
    for i in range(stages):
        depths.append(_count(state, rf"layers\.{i}\.blocks\.(\d+)\."))
        if i == 0:
            dims.append(int(state["patch_embed.seq.2.c.weight"].shape[0]))
            continue
        bias = state[f"layers.{i}.blocks.0.attn.attention_biases"]
        dims.append(int(state[f"layers.{i}.blocks.0.attn.proj.weight"].shape[0]))
        heads.append(int(bias.shape[0]))
        window = int(round(np.sqrt(bias.shape[1])))
        if window * window != bias.shape[1]:
            raise ValueError(f"layers.{i}.blocks.0.attn.attention_biases has {bias.shape[1]} "
                             "offsets, not a square window's")
        windows.append(window)
    head_dim = dims[1] // heads[0]
    expand = state["layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0]
    mlp = state["layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1]
    # stage 0 is MBConv: its heads and window are unused (the reference's lists still hold one)
    config = dict(embed_dims=tuple(dims), depths=tuple(depths),
                  num_heads=(max(1, dims[0] // head_dim),) + tuple(heads),
                  window_sizes=(windows[0],) + tuple(windows), mlp_ratio=float(mlp),
                  mbconv_expand_ratio=float(expand))
    classes = int(state["head.weight"].shape[0]) if "head.weight" in state else None
    return config, classes


def _official_key(path, value_ndim):
    """(official key, how to lay the torch array out for Keras) of a Keras variable path below
    the model's name."""
    parts = path.split("/")
    top, rest = parts[0], parts[1:]
    if top.startswith("patch_embed_seq_"):
        prefix = "patch_embed.seq." + top.rsplit("_", 1)[1]
    elif top.startswith("layers_"):
        _, i, kind, *j = top.split("_")
        prefix = f"layers.{i}.{kind}" + (f".{j[0]}" if j else "")
    else:
        prefix = top
    leaf = rest[-1]
    inner = [p for p in rest[:-1] if p not in ("dense", "conv")]
    if leaf == "kernel":
        if value_ndim == 2:
            layout = "conv1x1" if rest[-3] == "c" else "linear"
        else:
            layout = "conv" if rest[-2] == "conv" else "depthwise"
        return ".".join([prefix] + inner + ["weight"]), layout
    if leaf == "attention_biases":
        return ".".join([prefix] + rest), "same"
    return ".".join([prefix] + inner + [NORM_KEYS.get(leaf, leaf)]), "same"


def load_tinyvit_state(backbone, state, what):
    """Writes an official TinyViT state dict into ``backbone`` (a ``TinyViT`` of that
    configuration); returns the backbone, or an ``ImageClassifier`` on it (pooling "cls": the
    reference's head) when the state has ``head.*``. Every key is used exactly once (the
    ``attention_bias_idxs`` buffers, which the model recomputes, are dropped)."""
    from poa_keras.classifier import ImageClassifier

    state = _state(state)
    model = backbone
    plan = []
    for path, variable in weights_by_path(backbone).items():
        plan.append((variable, *_official_key(path, len(variable.shape))))
    if "head.weight" in state:
        model = ImageClassifier(backbone, int(state["head.weight"].shape[0]), pooling="cls")
        plan += [(model.head.kernel, "head.weight", "linear"),
                 (model.head.bias, "head.bias", "same")]
    assign_state(plan, state, what)
    return model


def tinyvit_from_state_dict(checkpoint, image_size=224, name=None, **overrides):
    """A ``TinyViT`` with the weights of an official state dict (or a checkpoint holding one
    under ``"model"``), inside an ``ImageClassifier`` (pooling "cls": the reference's head) when
    it has ``head.*``; the configuration is read from the shapes. ``image_size`` and
    ``overrides`` (e.g. ``window_sizes`` for the 384 / 512 models, which the shapes cannot tell
    from 224's when the table sizes agree) go to ``TinyViT``."""
    from poa_keras.backbones import TinyViT

    state = _state(checkpoint)
    config, _ = tinyvit_config(state)
    config.update(overrides)
    kwargs = {} if name is None else {"name": name}
    backbone = TinyViT(image_size=image_size, **config, **kwargs)
    return load_tinyvit_state(backbone, state, f"a TinyViT with {config}")


__all__ = ["load_tinyvit_state", "tinyvit_config", "tinyvit_from_state_dict"]

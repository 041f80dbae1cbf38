"""Loading an official PyTorch state dict into a Keras model, one rule for every converter:
each Keras variable names the official key it takes and how the torch array is laid out;
every key of the state dict is used exactly once.

    plan = [(variable, "blocks.0.attn.qkv.weight", "linear"), ...]
    assign_state(plan, state, what="a DINO ViT-S/16")

A key the model needs and the state lacks, a key of the state the model does not use, or a
shape that disagrees (after the layout change) is refused by name, before any variable is
written: a half-converted model never exists.
"""
from __future__ import annotations

import re

import numpy as np

#: How a torch array becomes a Keras variable's value.
LAYOUTS = ("same", "linear", "conv", "conv1x1", "depthwise", "flat")

# a BatchNorm's / LayerNorm's Keras variable names -> torch names
NORM_KEYS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
             "moving_variance": "running_var"}


#: Buffers official state dicts carry that our models recompute or do not keep: BatchNorm's
#: ``num_batches_tracked``, TinyViT's ``attention_bias_idxs``.
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(num_batches_tracked|attention_bias_idxs)$")


def model_state(checkpoint, what):
    """The state dict of a checkpoint: ``checkpoint["model"]`` when it holds one (training
    checkpoints of MAE, MAE-Lite, TinyViT), else the checkpoint itself; checked to be a dict of
    arrays (``check_arrays``)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    return check_arrays(checkpoint, what)


def torch_to_keras(value, layout):
    """A torch parameter as Keras lays it out: ``linear`` (out, in) -> (in, out); ``conv``
    (out, in, kh, kw) -> (kh, kw, in, out); ``conv1x1`` (out, in, 1, 1) -> (in, out) (a 1 x 1
    conv held as a dense kernel); ``depthwise`` (C, 1, kh, kw) -> (kh, kw, C, 1); ``flat``:
    the values in their order (DINOv2's (1, D) mask token -> (D,)); ``same``: unchanged."""
    value = np.asarray(value)
    if layout == "linear":
        return value.T
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "conv1x1":
        return value.reshape(value.shape[0], value.shape[1]).T
    if layout == "depthwise":
        return value.transpose(2, 3, 0, 1)
    if layout == "flat":
        return value.reshape(-1)
    if layout == "same":
        return value
    raise ValueError(f"unknown layout {layout!r}; valid: {LAYOUTS}")


def _listing(keys, limit=8):
    keys = sorted(keys)
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''}"


def check_arrays(state, what):
    """``state`` if it is a dict of numpy arrays (a state dict as ``read_torch_checkpoint``
    gives it), else a ValueError naming ``what`` was expected."""
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, np.ndarray) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else \
            f"a dict of {sorted({type(v).__name__ for v in state.values()}) or 'nothing'}"
        raise ValueError(f"{what} is a state dict of arrays; got {kind}")
    return state


def assign_state(plan, state, what, ignored=()):
    """Writes ``state[key]`` (laid out by ``layout``) into each ``(variable, key, layout)`` of
    ``plan``, after checking that every key of ``state`` is used exactly once (``ignored``:
    keys dropped on purpose, e.g. buffers the model recomputes) and every shape fits.
    Returns the keys used. ``what`` names the model in errors ("a DINO ViT-S/16")."""
    state = check_arrays(state, f"the checkpoint of {what}")
    wanted = [key for _, key, _ in plan]
    twice = {k for k in wanted if wanted.count(k) > 1}
    if twice:
        raise ValueError(f"converter bug: {_listing(twice)} would be used twice")
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} key(s) of {what}: "
                         f"{_listing(missing)} (is it a checkpoint of another architecture?)")
    unknown = set(state) - set(wanted) - set(ignored)
    if unknown:
        raise ValueError(f"the checkpoint has {len(unknown)} key(s) that {what} does not use: "
                         f"{_listing(unknown)} (is it a checkpoint of another architecture?)")
    values = []
    for variable, key, layout in plan:
        value = torch_to_keras(state[key], layout)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not fit {what}, "
                             f"whose {variable.path} is {tuple(variable.shape)} as Keras lays "
                             "it out (is it a checkpoint of another size?)")
        if not np.all(np.isfinite(value)) and value.dtype.kind == "f":
            raise ValueError(f"{key} holds non-finite values: the checkpoint is damaged")
        values.append(value)
    for (variable, _, _), value in zip(plan, values):
        variable.assign(value.astype(variable.dtype))
    return wanted


def strip_prefix(state, prefixes):
    """The state dict with the first of ``prefixes`` that every key carries removed (DDP's
    "module.", a wrapper's "backbone."); unchanged when none is common to all keys."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def select_prefix(state, prefix):
    """{key without ``prefix``: value} of the keys that start with ``prefix``."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["LAYOUTS", "NORM_KEYS", "RECOMPUTED_BUFFERS", "assign_state", "check_arrays",
           "model_state", "select_prefix", "strip_prefix", "torch_to_keras"]

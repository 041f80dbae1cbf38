"""Small helpers shared by the loss functions: float32 promotion of half-precision inputs,
targets cut from the graph, per-view lists."""
from __future__ import annotations

import keras
from keras import ops

_HALF = ("float16", "bfloat16")


def as_float(x):
    """`x` as a floating tensor; half precision is computed in float32.

    Softmaxes over tens of thousands of prototypes, exponentials at temperature 0.04 and
    Sinkhorn normalisations lose too much in 16 bits, so mixed-precision callers get float32
    losses. Integer or bool inputs become float32.
    """
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype in _HALF or not ("float" in dtype):
        x = ops.cast(x, "float32")
    return x


def as_target(x):
    """A target distribution: float and cut from the graph (targets never receive gradient)."""
    return ops.stop_gradient(as_float(x))


def views(x, what):
    """A list of per-view tensors from a list/tuple of tensors or one stacked (V, ...) tensor."""
    if isinstance(x, (list, tuple)):
        out = list(x)
    else:
        out = ops.unstack(ops.convert_to_tensor(x), axis=0)
    if not out:
        raise ValueError(f"{what} is empty; give at least one view")
    return out

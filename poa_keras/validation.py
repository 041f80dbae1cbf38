"""Argument checks shared by every room (evaluation, export, fine-tuning, optimizers): each
returns the cleaned value or raises a TypeError / ValueError that names the argument, the bad
value and what is valid (DESIGN contract 9). Nothing here knows about models."""
from __future__ import annotations

import math
import numbers

import numpy as np


def check_int(value, name, minimum):
    """An int >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_integral(value, name):
    """An int from an integral value: an int (numpy's too) or a float with no fractional part
    (64.0); 64.5, a bool or a string is refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_positive_number(value, name):
    """A finite real number > 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_multiplier(value, name):
    """A finite real number >= 0 (a learning-rate multiplier), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_ks(ks):
    """One k or a sequence of them (ints >= 1) -> a list without duplicates, order kept."""
    seq = [ks] if isinstance(ks, numbers.Number) else list(ks)
    if not seq:
        raise ValueError("ks must hold at least one k, got an empty sequence")
    for k in seq:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"every k must be an int, got {k!r} in ks={ks!r}")
        if k < 1:
            raise ValueError(f"every k must be >= 1, got {k} in ks={ks!r}")
    return list(dict.fromkeys(int(k) for k in seq))


def check_features(x, name):
    """Any array or backend tensor -> (n, d) finite float32 numpy."""
    if not isinstance(x, np.ndarray):
        import keras

        x = keras.ops.convert_to_numpy(x)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (num_samples, feature_dim), got shape "
                         f"{x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{name} holds NaN or inf values (in {bad} of {x.shape[0]} rows)")
    return x


def check_labels(y, name, expected, features_name, num_classes):
    """(expected,) integer labels in [0, num_classes) -> int64 numpy; (n, 1) is flattened."""
    if not isinstance(y, np.ndarray):
        import keras

        y = keras.ops.convert_to_numpy(y)
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must have shape ({expected},) (one integer per row of "
                         f"{features_name}), got shape {y.shape}")
    if y.shape[0] != expected:
        raise ValueError(f"{name} has {y.shape[0]} labels but {features_name} has {expected} "
                         "rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {y.dtype}")
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got label "
                             f"{bad}")
    return y.astype(np.int64, copy=False)


def check_labelled_images(data, name):
    """An ``(images, labels)`` pair -> checked numpy arrays: images (N, H, W, C) uint8 or float,
    N >= 1; labels (N,) integers ((N, 1) is flattened)."""
    if isinstance(data, dict) or not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be an (images, labels) pair of arrays, got "
                        f"{type(data).__name__}" + (f" of length {len(data)}"
                                                    if isinstance(data, (tuple, list)) else ""))
    images, labels = (x if isinstance(x, np.ndarray) else np.asarray(x) for x in data)
    if images.ndim != 4:
        raise ValueError(f"{name} images must have shape (num_images, height, width, "
                         f"channels), got shape {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"{name} images must be uint8 (0..255) or float (already normalised), "
                        f"got dtype {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} has {images.shape[0]} images but labels of shape "
                         f"{labels.shape}; expected ({images.shape[0]},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images, labels


def check_choice(value, name, choices):
    """``value`` if it is one of ``choices`` (compared with ==), else a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def positive_ints(values, what):
    """``values`` as a non-empty tuple of ints >= 1 (a ValueError naming ``what`` otherwise)."""
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of positive ints, got {values!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {values}")
    return values


def image_hw(image_size):
    """(height, width) of an image size given as an int (a square) or a (height, width)
    pair, as ints (not checked further)."""
    return ((int(image_size), int(image_size)) if np.ndim(image_size) == 0
            else tuple(int(s) for s in image_size))


__all__ = ["check_choice", "check_features", "check_int", "check_integral",
           "check_labelled_images",
           "check_labels", "check_ks", "check_multiplier", "check_positive_number", "image_hw",
           "positive_ints"]

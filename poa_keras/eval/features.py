"""Frozen CLS features of a backbone (or one of its sub-networks) for evaluation.

    feats = extract_features(backbone, images, subnet=(192, 4))   # (N, 192) float32, unit rows

Images go through ``backbone.compiled_forward(subnet)`` in batches of one fixed size (the last
batch is padded), so a compiled backend builds one program per (subnet, image size).

uint8 images go through the backbone's ``preprocessing`` (the record of its preset: resize to
its input size if needed, normalise as in training; ``pixel_normalization="preset"``, the
default of every evaluation); float images are taken as already preprocessed.
"""
from __future__ import annotations

import numpy as np
from keras import ops

from poa_keras.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from poa_keras.validation import check_choice, check_int

# The training pipeline's normalisations (poa_keras/data/multicrop.py: IMAGENET_MEAN / _STD and
# its `normalize` choices; poa_keras.preprocessing holds the constants, so that extraction does
# not import TensorFlow under the JAX or PyTorch backends, as importing data.multicrop would;
# tests check they agree).
PIXEL_NORMALIZATIONS = ("imagenet", "minus_one_one", None)
#: ``pixel_normalization`` of every evaluation: the backbone's recorded preprocessing.
FROM_PRESET = "preset"
INPUT_NORMALIZATIONS = (FROM_PRESET,) + PIXEL_NORMALIZATIONS


def preprocess_uint8(images, pixel_normalization="imagenet"):
    """uint8 (B, H, W, C) in 0..255 -> float32 normalised as the training pipeline does, at
    the images' own size.

    ``"imagenet"``: (x / 255 - mean) / std; ``"minus_one_one"``: 2 x / 255 - 1; None: x / 255.
    There is rarely a reason to call this by hand: ``ImageClassifier``, ``extract_features``,
    the sweep and the export take uint8 images and apply the backbone's ``preprocessing``
    (``backbone.preprocessing(images)`` gives it explicitly, resize included).
    """
    check_choice(pixel_normalization, "pixel_normalization", PIXEL_NORMALIZATIONS)
    x = np.asarray(images, np.float32) * np.float32(1.0 / 255.0)
    if pixel_normalization == "imagenet":
        x = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    elif pixel_normalization == "minus_one_one":
        x = 2.0 * x - 1.0
    return x.astype(np.float32, copy=False)


def input_preprocessing(backbone, pixel_normalization=FROM_PRESET):
    """The ``ImagePreprocessing`` that uint8 images get on their way into ``backbone``:
    ``"preset"``: the backbone's own (``backbone.preprocessing``, its preset's record); a name
    of ``PIXEL_NORMALIZATIONS``: that normalisation with the backbone's size rule. A model
    without a record gets the normalisation only (no resize)."""
    check_choice(pixel_normalization, "pixel_normalization", INPUT_NORMALIZATIONS)
    recorded = getattr(backbone, "preprocessing", None)
    if not isinstance(recorded, ImagePreprocessing):
        recorded = ImagePreprocessing(image_size=None)
    if pixel_normalization != FROM_PRESET:
        recorded = recorded.with_normalization(pixel_normalization)
    return recorded


def to_backbone_input(images, in_channels=3, pixel_normalization="imagenet"):
    """A batch as the backbone takes it: uint8 images through ``pixel_normalization``, an
    ``ImagePreprocessing`` (see ``input_preprocessing``: resize and normalisation) or a name of
    ``PIXEL_NORMALIZATIONS`` (``preprocess_uint8``: the normalisation only; single-channel
    images repeated to RGB for a 3-channel backbone); float images cast to float32 and
    otherwise unchanged (taken as already preprocessed)."""
    if images.dtype == np.uint8 and isinstance(pixel_normalization, ImagePreprocessing):
        return pixel_normalization.numpy(images)
    if images.dtype == np.uint8:
        if images.shape[-1] == 1 and in_channels == 3:
            images = np.repeat(images, 3, axis=-1)
        return preprocess_uint8(images, pixel_normalization)
    return np.asarray(images, np.float32)


def extract_features(backbone, images, subnet=None, batch_size=64, normalize=True,
                     pixel_normalization=FROM_PRESET):
    """CLS features of ``backbone(images, subnet=subnet)``, batch by batch, as numpy.

    Args:
      backbone: an elastic backbone (its ``compiled_forward(subnet)`` returns a dict with
        "cls").
      images: (N, H, W, C) numpy array (or anything ``np.asarray`` takes). uint8 images
        (0..255) go through the backbone's preprocessing (see `pixel_normalization`: resized
        to its input size if needed, normalised as in training; single-channel images are
        repeated to RGB); float images are taken as already preprocessed and fed unchanged
        (cast to float32).
      subnet: None (the full network), a spec, a tuple (width, depth) or a size name.
      batch_size: images per forward pass. Every pass sees exactly min(batch_size, N) images:
        the last partial batch is padded with zeros and the padding's outputs dropped, so a
        compiled backend traces one program only.
      normalize: L2-normalise every feature vector (what k-NN uses); False gives the raw CLS.
      pixel_normalization: "preset" (default): ``backbone.preprocessing``, the record of its
        preset; or "imagenet" (mean/std), "minus_one_one" or None ([0, 1]) to override its
        normalisation (the multicrop pipeline's `normalize`); only for uint8 images.

    Returns:
      float32 numpy array (N, D), D the width of the sub-network.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    preprocessing = input_preprocessing(backbone, pixel_normalization)
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (num_images, height, width, channels), got "
                         f"shape {images.shape}")
    is_uint8 = images.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"images must be uint8 (0..255) or float (already normalised), got "
                        f"dtype {images.dtype}")
    forward = backbone.compiled_forward(subnet)   # validates the subnet before any work
    spec = backbone.resolve_subnet(subnet)
    width = backbone.feature_dim(spec) if hasattr(backbone, "feature_dim") else None
    n = images.shape[0]
    if n == 0:
        if width is None:
            raise ValueError("images is empty and the feature width of this backbone is unknown")
        return np.zeros((0, width), np.float32)

    step = min(int(batch_size), n)
    chunks = []
    for start in range(0, n, step):
        batch = images[start:start + step]
        rows = batch.shape[0]
        batch = to_backbone_input(batch, getattr(backbone, "in_channels", 3), preprocessing)
        if rows < step:   # pad: same shape as every other batch, no new trace
            pad = np.zeros((step - rows,) + batch.shape[1:], np.float32)
            batch = np.concatenate([batch, pad], axis=0)
        out = forward(ops.convert_to_tensor(batch))
        cls = np.asarray(ops.convert_to_numpy(out["cls"]), np.float32)
        chunks.append(cls[:rows])
    feats = np.concatenate(chunks, axis=0)
    if normalize:
        norms = np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True)
        feats = (feats / np.maximum(norms, 1e-12)).astype(np.float32)
    return feats

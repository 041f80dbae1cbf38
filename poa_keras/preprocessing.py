"""How images enter a model: the preprocessing record every preset carries (keras-hub's image
converter).

    prep = backbone.preprocessing            # recorded in the backbone's config (and preset)
    prep                                     # ImagePreprocessing(image_size=(32, 32), ...)
    x = prep(uint8_images)                   # float32 tensor (B, 32, 32, 3), as trained
    x = prep.numpy(uint8_images)             # the same as a numpy array

An ``ImagePreprocessing`` maps raw pixels (uint8 0..255, or any values in ``value_range``) to
what the network takes:

1. single-channel images are repeated to the channels of ``mean`` (grayscale -> RGB);
2. the size rule, when the images are not already at ``image_size``:
   ``"resize_shorter_then_center_crop"`` (timm / DINO evaluation: resize, keeping the aspect
   ratio, so that the image covers ``floor(image_size / crop_pct)``; then a centred
   ``image_size`` crop; torchvision's rounding) or ``"resize"`` (straight to ``image_size``,
   the aspect ratio not kept), with ``interpolation`` ("bilinear", "bicubic", "nearest"),
   antialiased when shrinking; values clipped back to ``value_range`` (bicubic overshoots,
   as PIL clips); ``image_size=None`` keeps every image's size;
3. ``value_range`` -> [0, 1], then ``(x - mean) / std`` per channel.

Images already at ``image_size`` are not resampled when ``crop_pct`` is 1 (the default), so a
preset's record gives exactly the training pipeline's normalisation on them
(``data.multicrop``: ``normalize="imagenet"``, ``"minus_one_one"`` or None, recorded as
``pixel_normalization``). The resize runs through ``keras.ops.image.resize`` (antialiased; on
every backend it equals ``tf.image.resize(..., antialias=True)`` to float precision, which
tests/test_preprocessing.py checks).

It is a plain serialisable value (``get_config`` / ``from_config``, JSON-friendly), not a Keras
layer: a backbone holds it outside its weights (``Backbone.preprocessing``), its config and so
its preset record it, and ``ImageClassifier``, ``eval.extract_features``, the sweep and the
export apply it to uint8 images. Nothing here knows about models.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import keras
import numpy as np

from poa_keras.validation import check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The training pipeline's normalisations (``data.multicrop``'s ``normalize``) and their
#: (mean, std) on [0, 1] pixels; "custom" is any other mean / std.
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),   # 2 x - 1
    None: ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),               # [0, 1]
}
PIXEL_NORMALIZATIONS = ("imagenet", "minus_one_one", None, "custom")
RESIZE_RULES = ("resize_shorter_then_center_crop", "resize")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@keras.saving.register_keras_serializable(package="poa_keras")
@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """Raw pixels -> network input (see the module docstring for the steps).

    Args:
        image_size: the network's input size, an int or (height, width); None keeps the
            images' own size (no resizing).
        pixel_normalization: the training pipeline's normalisation: "imagenet" (mean/std of
            ImageNet), "minus_one_one" (2 x - 1), None ([0, 1]) or "custom" (give
            ``mean`` and ``std``). Sets ``mean`` / ``std`` when they are not given.
        mean, std: per-channel values on [0, 1] pixels (one value, or one per channel);
            std > 0.
        resize: "resize_shorter_then_center_crop" (default) or "resize".
        crop_pct: in (0, 1]: the crop's share of the resized image (timm's crop_pct; 0.875
            is the classic 256 -> 224 evaluation); 1 (default) resizes to ``image_size``
            and crops only the longer side.
        interpolation: "bilinear" (default; the training crops' resampling), "bicubic" or
            "nearest".
        antialias: antialias when shrinking (as PIL always does).
        value_range: (low, high) of raw pixels, mapped to [0, 1]; default (0, 255).
    """

    image_size: object = 224
    pixel_normalization: object = "imagenet"
    mean: object = None
    std: object = None
    resize: str = "resize_shorter_then_center_crop"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    antialias: bool = True
    value_range: object = (0, 255)

    def __post_init__(self):
        def put(name, value):   # frozen: the cleaned values are set here, once
            object.__setattr__(self, name, value)

        put("image_size", _size(self.image_size))
        check_choice(self.pixel_normalization, "pixel_normalization", PIXEL_NORMALIZATIONS)
        named = NORMALIZATIONS.get(self.pixel_normalization)
        if self.pixel_normalization == "custom" and (self.mean is None or self.std is None):
            raise ValueError('pixel_normalization="custom" needs both mean and std')
        mean = _values(named[0] if self.mean is None else self.mean, "mean")
        std = _values(named[1] if self.std is None else self.std, "std")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {std}")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(f"mean and std must have one value or one per channel each, got "
                             f"{len(mean)} and {len(std)} values")
        if named is not None and not _same_values((mean, std), named):
            raise ValueError(
                f"mean={mean}, std={std} are not the {self.pixel_normalization!r} "
                f"normalisation's mean={named[0]}, std={named[1]}; give "
                'pixel_normalization="custom" for other values')
        put("mean", mean)
        put("std", std)
        check_choice(self.resize, "resize", RESIZE_RULES)
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, numbers.Real) or \
                not 0 < crop <= 1:
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop!r}")
        put("crop_pct", float(crop))
        check_choice(self.interpolation, "interpolation", INTERPOLATIONS)
        if not isinstance(self.antialias, (bool, np.bool_)):
            raise TypeError(f"antialias must be True or False, got {self.antialias!r}")
        put("antialias", bool(self.antialias))
        low_high = _values(self.value_range, "value_range")
        if len(low_high) != 2 or not low_high[0] < low_high[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got "
                             f"{self.value_range!r}")
        put("value_range", tuple(int(v) if float(v).is_integer() else v for v in low_high))

    # -- configuration ---------------------------------------------------------------------------
    def get_config(self):
        """JSON-friendly fields (lists for tuples); ``from_config`` inverts it."""
        config = dataclasses.asdict(self)
        for key in ("image_size", "mean", "std", "value_range"):
            if config[key] is not None:
                config[key] = list(config[key])
        return config

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict):
            raise TypeError(f"a preprocessing config is a dict, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; the fields are "
                             f"{sorted(fields)}")
        return cls(**config)

    @classmethod
    def coerce(cls, value):
        """An ``ImagePreprocessing`` from itself, its config (a dict) or None (None)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_config(value)
        raise TypeError(f"preprocessing must be an ImagePreprocessing, its config (a dict) or "
                        f"None, got {type(value).__name__}")

    def with_normalization(self, pixel_normalization):
        """The same rule with another named normalisation ("imagenet", "minus_one_one",
        None)."""
        return dataclasses.replace(self, pixel_normalization=pixel_normalization, mean=None,
                                   std=None)

    def describe(self):
        """One line for messages: the size rule, the value range and the normalisation."""
        if self.image_size is None:
            size = "images kept at their size"
        else:
            h, w = self.image_size
            size = (f"{self.resize} to {h}x{w} (crop_pct {self.crop_pct:g}, "
                    f"{self.interpolation})")
        low, high = self.value_range
        return (f"{size}; pixels [{low}, {high}] -> [0, 1], then (x - mean) / std with "
                f"mean {self.mean}, std {self.std} "
                f"(pixel_normalization={self.pixel_normalization!r})")

    # -- the rule --------------------------------------------------------------------------------
    @property
    def channels(self):
        """Channels the normalisation has values for (1: the same for any channel count)."""
        return max(len(self.mean), len(self.std))

    def resized_size(self, height, width):
        """(height, width) the images are resampled to before the centre crop, or None when
        the images are used as they are (at ``image_size`` and ``crop_pct`` 1, or no size)."""
        if self.image_size is None:
            return None
        th, tw = self.image_size
        if self.resize == "resize":
            size = (th, tw)
        else:
            # Cover floor(target / crop_pct), keeping the aspect ratio (torchvision's Resize of
            # the shorter side for square targets: the other side is truncated).
            ch, cw = math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct)
            if ch * width >= cw * height:   # the height sets the scale
                size = (ch, max(cw, int(ch * width / height)))
            else:
                size = (max(ch, int(cw * height / width)), cw)
        return None if size == (height, width) else size

    def output_size(self, height, width):
        """(height, width) of the preprocessed images."""
        return (int(height), int(width)) if self.image_size is None else self.image_size

    def __call__(self, images):
        """(B, H, W, C) raw pixels (uint8 or values in ``value_range``; numpy or a backend
        tensor; inside a compiled function too) -> float32 backend tensor
        (B, *image_size, C)."""
        from keras import ops

        x = ops.convert_to_tensor(images)
        shape = self._check_shape(tuple(x.shape))
        x = ops.cast(x, "float32")
        if shape[-1] == 1 and self.channels > 1:
            x = ops.repeat(x, self.channels, axis=-1)
        x = self._resample(x, shape[1], shape[2], ops)
        low, high = self.value_range
        x = ops.multiply(ops.subtract(x, np.float32(low)), np.float32(1.0 / (high - low)))
        return ops.divide(ops.subtract(x, np.asarray(self.mean, np.float32)),
                          np.asarray(self.std, np.float32))

    def from_unit_range(self, images):
        """``__call__`` for float images in [0, 1] (an augmentation's output, e.g. the
        soft-label store's replay): mapped onto ``value_range`` first, then resized and
        normalised as raw pixels would be."""
        from keras import ops

        low, high = self.value_range
        x = ops.cast(ops.convert_to_tensor(images), "float32")
        return self(ops.add(ops.multiply(x, np.float32(high - low)), np.float32(low)))

    def numpy(self, images):
        """``__call__`` as numpy (float32): the normalisation runs in numpy, the resize (when
        one is needed) through ``keras.ops.image.resize``."""
        x = np.asarray(images)
        shape = self._check_shape(x.shape)
        if shape[-1] == 1 and self.channels > 1:
            x = np.repeat(x, self.channels, axis=-1)
        x = np.asarray(x, np.float32)
        if self.resized_size(shape[1], shape[2]) is not None or \
                self.output_size(shape[1], shape[2]) != tuple(shape[1:3]):
            from keras import ops

            x = np.asarray(ops.convert_to_numpy(self._resample(ops.convert_to_tensor(x),
                                                               shape[1], shape[2], ops)),
                           np.float32)
        low, high = self.value_range
        x = (x - np.float32(low)) * np.float32(1.0 / (high - low))
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x.astype(np.float32, copy=False)

    def _check_shape(self, shape):
        if len(shape) != 4:
            raise ValueError(f"preprocessing takes a batch of images (batch, height, width, "
                             f"channels), got shape {shape}")
        if shape[1] is None or shape[2] is None:
            raise ValueError(f"preprocessing needs a static image height and width, got shape "
                             f"{shape}")
        if shape[-1] is not None and self.channels > 1 and shape[-1] not in (1, self.channels):
            raise ValueError(f"images have {shape[-1]} channels; this preprocessing's mean and "
                             f"std have {self.channels} (single-channel images are repeated)")
        return shape

    def _resample(self, x, height, width, ops):
        """The size rule on a float tensor (B, H, W, C): resize, centre crop, clip."""
        resized = self.resized_size(height, width)
        if resized is not None:
            x = ops.image.resize(x, resized, interpolation=self.interpolation,
                                 antialias=self.antialias, data_format="channels_last")
            x = ops.clip(x, float(self.value_range[0]), float(self.value_range[1]))
            height, width = resized
        if self.image_size is not None and (height, width) != self.image_size:
            th, tw = self.image_size
            top, left = int(round((height - th) / 2.0)), int(round((width - tw) / 2.0))
            x = x[:, top:top + th, left:left + tw, :]
        return x


def _size(value):
    if value is None:
        return None
    try:
        size = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    except TypeError:
        size = ()
    if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 and v >= 1 for v in size):
        raise ValueError(f"image_size must be an int >= 1, (height, width) or None, got "
                         f"{value!r}")
    return tuple(int(v) for v in size)


def _values(value, name):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    try:
        values = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got "
                        f"{value!r}") from None
    if not values or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                             and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _same_values(given, named):
    return all(len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-9)
               for a, b in zip(given, named))


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "ImagePreprocessing",
           "NORMALIZATIONS", "PIXEL_NORMALIZATIONS", "RESIZE_RULES"]

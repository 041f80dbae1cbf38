"""TinyViT's fast pretraining distillation store (REFERENCE.md §4): run a teacher ONCE over the
images for E epochs, keep per image and epoch only (augmentation seed, top-K class ids, top-K
probabilities), and train students later by REPLAYING the augmentation from the stored seed.

    store = write_store(teacher, images, "store/", epochs=3, topk=10,
                        config=ReplayAugment(output_size=224))          # pass 1 (resumable)
    store = open_store("store/", images, expect={"topk": 10})          # pass 2
    ds = store.dataset(epoch=0, batch_size=64, shuffle_seed=0)
    image, label = next(iter(ds))   # (64, 224, 224, 3) float32 in [0, 1];
                                    # {"ids": (64, 10) int32, "values": (64, 10) float32}
    target = dense_soft_targets(label["ids"], label["values"], num_classes)   # (64, C):
                                    # poa_keras.losses.distill

Augmentation (``replay_augment``): a PURE function of (uint8 image, int seed), built only from
stateless tf.random ops whose op seeds are (seed, k), one k per draw: random resized crop
(torchvision's RandomResizedCrop.get_params, via ``multicrop.crop_boxes``; bilinear), horizontal
flip, then brightness, contrast, saturation jitter (in that fixed order, each factor uniform in
[max(0, 1 - s), 1 + s]). Output float32 in [0, 1], (height, width, 3). The same seed and image
give the same pixels in any process, on any backend (the pipeline is tf.data on every backend).
MixUp / CutMix (``mixup`` / ``cutmix`` > 0): the images of an epoch are dealt in pairs
(``epoch_partners``: a permutation from PCG64([seed, epoch, 1])); each image is mixed with its
partner's augmented image by parameters drawn from the pair's seed, seeds[i] XOR seeds[partner]
(REFERENCE.md §4), so both images of a pair share lam and the CutMix box (``mix_parameters``,
``mix_pair``), and an image's pixels depend only on (its pair, their seeds): any batching replays
them. Keras' RandAugment / MixUp / CutMix layers are NOT used: their randomness is stateful (a
SeedGenerator that advances per call), so an image cannot be re-created from a stored seed.

On disk (``directory``):
  store.json        the header, written (atomically) before any epoch: format version, teacher
                    name and a sha256 of its weights, K, number of classes, number of images,
                    a sha256 of the images (bytes, shape, dtype), the augmentation config and
                    its code version, the seed, the epochs, the record layout.
  epoch_XXXX.bin    one per epoch: num_images fixed-size little-endian records, in image order:
                    seed int32, K class ids int16 (uint16 when 32768 < C <= 65536), K
                    probabilities float16, sorted descending: RECORD_BYTES = 4 + 4 K bytes per
                    image per epoch. Each shard is written to a temporary file and renamed into
                    place (``files.atomic_path``): a shard is complete or absent.

Seeds: the seeds of epoch e are ``numpy.random.Generator(PCG64([seed, e])).integers(0, 2**31,
num_images, dtype=int32)``: they depend on (seed, e) only, so resuming or extending a store draws
the same ones.

Limits: ``images`` is an in-memory uint8 array (N, H, W, 3) (the dataset is built with
``from_tensor_slices``, which holds it in the graph: up to about 2 GB).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from poa_keras.data.multicrop import crop_boxes
from poa_keras.files import atomic_path, atomic_write_json
from poa_keras.validation import check_int

FORMAT = "poa_keras.softlabels"
FORMAT_VERSION = 1
# Bumped whenever replay_augment's pixels change: a store is only valid with the exact
# augmentation code that wrote it (REFERENCE.md §4).
AUGMENT_VERSION = 1
HEADER = "store.json"
SEED_HIGH = 2 ** 31
# The header keys that must agree for a store to be resumed or read with given images/teacher.
_IDENTITY = ("format", "format_version", "teacher", "teacher_fingerprint", "topk",
             "num_classes", "num_images", "image_shape", "images_fingerprint", "augment",
             "augment_version", "seed", "ids_dtype", "record_bytes")


class IncompleteStore(ValueError):
    """A store's epoch shard is missing or of the wrong size (``write_store`` completes it)."""


def record_dtype(topk, ids_dtype="int16"):
    """numpy structured dtype of one record: seed <i4, ids (K,), values <f2 (K,): 4 + 4K bytes."""
    ids = {"int16": "<i2", "uint16": "<u2"}[ids_dtype]
    return np.dtype([("seed", "<i4"), ("ids", ids, (topk,)), ("values", "<f2", (topk,))])


def ids_dtype_for(num_classes):
    """int16 for up to 32768 classes (REFERENCE's layout), uint16 up to 65536; more: an error."""
    if num_classes <= 2 ** 15:
        return "int16"
    if num_classes <= 2 ** 16:
        return "uint16"
    raise ValueError(f"the store keeps class ids in 16 bits: at most 65536 classes, the teacher "
                     f"has {num_classes}")


def epoch_filename(epoch):
    return f"epoch_{epoch:04d}.bin"


# ----- augmentation ----------------------------------------------------------------------------

def _pair(value, name):
    if isinstance(value, numbers.Number):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    return tuple(check_int(v, name, 1) for v in value)


def _interval(value, name, low_bound):
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not (low_bound < value[0] <= value[1]) or \
            not all(math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be (low, high) with {low_bound} < low <= high, got "
                         f"{value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ReplayAugment:
    """The replayable augmentation's settings (see ``replay_augment``).

    output_size: int or (height, width) of the output.
    scale: area fraction range of the random resized crop (torchvision's default (0.08, 1)).
    ratio: aspect-ratio range of the crop (log-uniform).
    flip_prob: probability of a horizontal flip.
    jitter: brightness / contrast / saturation strength s (factors in [max(0, 1-s), 1+s]);
      0 disables the colour jitter.
    mixup, cutmix: the Beta(a, a) parameter a of MixUp / CutMix between the two images of a
      pair (``epoch_partners``), 0 = off (the default: TinyViT's 22k distillation has neither).
    mix_prob: probability that a pair is mixed at all; switch_prob: with both on, the
      probability of CutMix rather than MixUp (timm's defaults 1.0 and 0.5).
    """
    output_size: tuple = (224, 224)
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    jitter: float = 0.4
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "output_size", _pair(self.output_size, "output_size"))
        scale = _interval(self.scale, "scale", 0.0)
        if scale[1] > 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        set_(self, "scale", scale)
        set_(self, "ratio", _interval(self.ratio, "ratio", 0.0))
        flip = float(self.flip_prob)
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        set_(self, "flip_prob", flip)
        jitter = float(self.jitter)
        if not (math.isfinite(jitter) and jitter >= 0.0):
            raise ValueError(f"jitter must be a finite number >= 0, got {self.jitter!r}")
        set_(self, "jitter", jitter)
        for name in ("mixup", "cutmix"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0 (the Beta parameter; 0 = "
                                 f"off), got {getattr(self, name)!r}")
            set_(self, name, value)
        for name in ("mix_prob", "switch_prob"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
            set_(self, name, value)

    @property
    def mixes(self):
        """Whether pairs of images are mixed (MixUp or CutMix on, with a chance to apply)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def get_config(self):
        config = {"output_size": list(self.output_size), "scale": list(self.scale),
                  "ratio": list(self.ratio), "flip_prob": self.flip_prob, "jitter": self.jitter}
        if self.mixes:   # left out when off: the record of an unmixed store stays as it was
            config.update(mixup=self.mixup, cutmix=self.cutmix, mix_prob=self.mix_prob,
                          switch_prob=self.switch_prob)
        return config

    @classmethod
    def from_config(cls, config):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown ReplayAugment settings {unknown}; valid: {sorted(fields)}")
        return cls(**config)

    def to_json(self):
        return json.dumps(self.get_config(), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_config(json.loads(text))


def _as_config(config):
    if isinstance(config, ReplayAugment):
        return config
    if isinstance(config, dict):
        return ReplayAugment.from_config(config)
    if isinstance(config, str):
        return ReplayAugment.from_json(config)
    raise TypeError(f"config must be a ReplayAugment, a dict or its JSON, got {config!r}")


def _draw_seed(seed, k):
    return tf.stack([tf.cast(seed, tf.int64), tf.constant(k, tf.int64)])


def replay_augment(image, seed, config):
    """One image (H, W, 3) uint8 and an int seed (python int or int32 scalar tensor, in
    [0, 2^31)) -> the augmented image (height, width, 3) float32 in [0, 1].

    A pure function of (image, seed, config): only stateless ops, op seeds (seed, k). Works
    eagerly and inside tf.data / tf.function (the store maps it over (image, seed) pairs)."""
    config = _as_config(config)
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"replay_augment takes uint8 images, got {image.dtype.name}")
    image = tf.ensure_shape(image, (None, None, 3))
    x = tf.cast(image, tf.float32) / 255.0
    shape = tf.shape(x)
    boxes = crop_boxes(_draw_seed(seed, 0), shape[0], shape[1],
                       np.array([config.scale], np.float32), config.ratio)
    x = tf.image.crop_and_resize(x[None], boxes, tf.zeros((1,), tf.int32), config.output_size,
                                 method="bilinear")[0]
    if config.flip_prob > 0:
        flip = tf.random.stateless_uniform((), _draw_seed(seed, 1)) < config.flip_prob
        x = tf.where(flip, tf.reverse(x, axis=[1]), x)
    if config.jitter > 0:
        low, high = max(0.0, 1.0 - config.jitter), 1.0 + config.jitter
        f = tf.random.stateless_uniform((3,), _draw_seed(seed, 2), low, high)
        x = tf.clip_by_value(x * f[0], 0.0, 1.0)                          # brightness
        mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x))
        x = tf.clip_by_value(f[1] * x + (1.0 - f[1]) * mean, 0.0, 1.0)    # contrast
        gray = tf.image.rgb_to_grayscale(x)
        x = tf.clip_by_value(f[2] * x + (1.0 - f[2]) * gray, 0.0, 1.0)    # saturation
    return tf.ensure_shape(x, (*config.output_size, 3))


def epoch_partners(seed, epoch, num_images):
    """The MixUp / CutMix partner of every image in an epoch: a permutation drawn from
    PCG64([seed, epoch, 1]) dealt in pairs (its entries 2j and 2j + 1 are partners); with an odd
    count the last image is its own partner (left unmixed). (num_images,) int64."""
    order = np.random.Generator(np.random.PCG64([int(seed), int(epoch), 1])).permutation(
        num_images)
    partners = np.arange(num_images)
    pairs = order[:num_images - num_images % 2].reshape(-1, 2)
    partners[pairs[:, 0]], partners[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    return partners


def mix_parameters(pair_seed, config):
    """(mode, lam, box) of a pair from its seed (seeds[i] XOR seeds[partner], REFERENCE.md §4):
    mode 0 = unmixed, 1 = MixUp, 2 = CutMix; lam ~ Beta(a, a) (stateless gamma draws); box
    (top, left, bottom, right) in pixels of the CutMix patch of area (1 - lam) H W, centred
    uniformly and clipped (timm's rand_bbox), lam then recomputed from the clipped box. Each
    draw is a stateless op keyed by (pair_seed, 100 + k)."""
    config = _as_config(config)
    height, width = config.output_size
    u = tf.random.stateless_uniform((2,), _draw_seed(pair_seed, 100))
    use_cutmix = config.cutmix > 0 and (config.mixup <= 0 or u[1] < config.switch_prob)
    alpha = tf.where(use_cutmix, config.cutmix, config.mixup) if config.cutmix > 0 and \
        config.mixup > 0 else (config.cutmix if config.cutmix > 0 else config.mixup)
    alpha = tf.cast(alpha, tf.float32)
    g = tf.random.stateless_gamma((2,), _draw_seed(pair_seed, 101), alpha=alpha)
    lam = g[0] / tf.maximum(g[0] + g[1], 1e-12)
    centre = tf.random.stateless_uniform((2,), _draw_seed(pair_seed, 102))
    cut = tf.sqrt(1.0 - lam)
    cy, cx = centre[0] * height, centre[1] * width
    half_h, half_w = tf.round(cut * height) / 2.0, tf.round(cut * width) / 2.0
    top = tf.cast(tf.clip_by_value(tf.round(cy - half_h), 0, height), tf.int32)
    bottom = tf.cast(tf.clip_by_value(tf.round(cy + half_h), 0, height), tf.int32)
    left = tf.cast(tf.clip_by_value(tf.round(cx - half_w), 0, width), tf.int32)
    right = tf.cast(tf.clip_by_value(tf.round(cx + half_w), 0, width), tf.int32)
    area = tf.cast((bottom - top) * (right - left), tf.float32)
    lam = tf.where(use_cutmix, 1.0 - area / float(height * width), lam)
    mode = tf.where(u[0] < config.mix_prob, tf.where(use_cutmix, 2, 1), 0)
    return mode, lam, tf.stack([top, left, bottom, right])


def mix_pair(x, partner, pair_seed, config):
    """Image ``x`` mixed with its partner's augmented image by the pair's ``mix_parameters``:
    MixUp lam x + (1 - lam) partner; CutMix: the partner's pixels inside the box."""
    mode, lam, box = mix_parameters(pair_seed, config)
    height, width = config.output_size
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= box[0]) & (rows < box[2]) & (cols >= box[1]) & (cols < box[3])
    cut = tf.where(inside[:, :, None], partner, x)
    mixed = lam * x + (1.0 - lam) * partner
    return tf.where(mode == 2, cut, tf.where(mode == 1, mixed, x))


def _augmented_dataset(images, seeds, config, batch_size, order=None, partners=None):
    """tf.data of batches of replay_augment(images[i], seeds[i]) in ``order`` (default: index
    order), each mixed with its partner's (``partners[i]``, ``mix_pair``) when the config mixes.
    Writer and reader both use this, so stored and replayed pixels come from one graph."""
    config = _as_config(config)
    order = np.arange(len(images)) if order is None else np.asarray(order)
    seeds = np.asarray(seeds)
    if config.mixes and partners is None:
        raise ValueError("this augmentation mixes pairs of images (mixup / cutmix): give the "
                         "epoch's partners (epoch_partners(seed, epoch, num_images))")
    if config.mixes:
        other = np.asarray(partners)[order]
        ds = tf.data.Dataset.from_tensor_slices((images[order], seeds[order], images[other],
                                                 seeds[other]))

        def augment(x, s, y, t):
            a, b = replay_augment(x, s, config), replay_augment(y, t, config)
            return mix_pair(a, b, tf.bitwise.bitwise_xor(s, t), config)

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = tf.data.Dataset.from_tensor_slices((images[order], seeds[order]))
        ds = ds.map(lambda x, s: replay_augment(x, s, config),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds if batch_size is None else ds.batch(batch_size)


# ----- fingerprints ----------------------------------------------------------------------------

def _check_images(images):
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array (N, H, W, 3) of uint8, got "
                        f"{type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or \
            images.shape[0] < 1:
        raise ValueError(f"images must be a uint8 array (N >= 1, H, W, 3), got dtype "
                         f"{images.dtype} and shape {images.shape}")
    return images


def images_fingerprint(images):
    """sha256 of the images' shape, dtype and bytes (hex)."""
    images = np.ascontiguousarray(_check_images(images))
    h = hashlib.sha256(f"{images.shape}|{images.dtype.str}|".encode())
    h.update(memoryview(images).cast("B"))
    return h.hexdigest()


def teacher_fingerprint(teacher):
    """sha256 of a Keras model's weights (in order: shapes, dtypes, values), hex: two teachers
    with the same architecture and different weights differ. Weight paths are left out: Keras'
    automatic layer names ("dense_3") change from one process to the next."""
    import keras

    h = hashlib.sha256()
    for w in teacher.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(w))
        h.update(f"{value.shape}|{value.dtype.str}|".encode())
        h.update(memoryview(value).cast("B") if value.size else b"")
    return h.hexdigest()


def _differences(expected, found, keys):
    return [k for k in keys if k in expected and expected[k] != found.get(k)]


def _describe(keys, expected, found):
    parts = []
    for k in keys:
        a, b = expected.get(k), found.get(k)
        if isinstance(a, str) and len(a) == 64 and isinstance(b, str):   # hashes: shorten
            a, b = a[:12] + "...", b[:12] + "..."
        parts.append(f"{k}: store has {b!r}, expected {a!r}")
    return "; ".join(parts)


# ----- writer ----------------------------------------------------------------------------------

def epoch_seeds(seed, epoch, num_images):
    """The augmentation seeds of one epoch: int32 in [0, 2^31), from PCG64 seeded by (seed,
    epoch)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch)]))
    return rng.integers(0, SEED_HIGH, size=num_images, dtype=np.int32)


def _teacher_probabilities(teacher, batch, preprocess, topk, context):
    """Teacher logits for a batch -> (ids, values) top-K of the softmax, sorted descending."""
    import keras

    shape = tuple(batch.shape)
    if preprocess is not None:
        batch = preprocess(batch)
    try:
        out = teacher(batch, training=False)
    except (ValueError, TypeError) as error:   # e.g. another input size than the replay's
        raise ValueError(f"the teacher failed on the augmented images ({context}): a batch of "
                         f"shape {shape} float32 in [0, 1]"
                         f"{', through preprocess' if preprocess is not None else ''}; give "
                         f"an augmentation output size the teacher takes, or a preprocess that "
                         f"maps to its input ({type(error).__name__}: {error})") from error
    if not hasattr(out, "shape") or isinstance(out, (dict, list, tuple)):
        raise ValueError(f"the teacher must map images to class logits (B, C); it returned "
                         f"{type(out).__name__} ({context})")
    logits = np.asarray(keras.ops.convert_to_numpy(out))
    if logits.ndim != 2 or logits.shape[0] != len(batch):
        raise ValueError(f"the teacher must map images to class logits of shape (B, C) = "
                         f"({len(batch)}, C); it returned shape {logits.shape} ({context})")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"the teacher must return float logits, got dtype {logits.dtype} "
                         f"({context})")
    if not np.isfinite(logits).all():
        raise ValueError(f"the teacher returned NaN or inf logits ({context})")
    if logits.shape[1] > 1 and (logits >= 0).all() and \
            np.allclose(logits.astype(np.float64).sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"the teacher returned probabilities (every row >= 0, summing to 1), "
                         f"not logits ({context}): give the model before its softmax; the "
                         f"store takes the softmax itself")
    if logits.shape[1] < topk:
        raise ValueError(f"topk={topk} is larger than the teacher's number of classes "
                         f"{logits.shape[1]}; valid: 1 <= topk <= {logits.shape[1]}")
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :topk]
    return ids, np.take_along_axis(p, ids, axis=1), logits.shape[1]


def _remove_dead_temporaries(directory):
    """Temporary shards (``.epoch_XXXX.<pid>.<hex>.tmp.bin``) of writers no longer running."""
    pattern = re.compile(r"^\.epoch_\d{4}\.(\d+)\.[0-9a-f]{8}\.tmp\.bin$")
    for name in os.listdir(directory):
        match = pattern.match(name)
        if not match:
            continue
        pid = int(match[1])
        try:
            if pid != os.getpid():
                os.kill(pid, 0)
                continue   # alive: another writer's
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def check_teacher(teacher, images, config, topk=1, preprocess="auto", seed=0, count=1):
    """The teacher's number of classes, from its output on the first ``count`` images augmented
    as epoch 0 of ``seed``; a ValueError when it fails on them or returns anything but class
    logits (B, C), C >= ``topk``: a dict, another shape, integers, NaN, or probabilities (rows
    >= 0 summing to 1: give the logits before the softmax)."""
    images = _check_images(images)
    config = _as_config(config)
    preprocess = _resolve_preprocess(teacher, preprocess)
    count = min(int(count), len(images))
    probe = next(iter(_augmented_dataset(images[:count], epoch_seeds(seed, 0, count), config,
                                         count, partners=np.arange(count))))
    return _teacher_probabilities(teacher, probe.numpy(), preprocess, topk,
                                  f"probing the teacher on {count} image(s)")[2]


def unit_range_input(model):
    """How [0, 1] images (the replay's output) enter ``model``: its preprocessing record's
    ``from_unit_range`` (an ImageClassifier: normalisation and input size), or None (as they
    are) for a model without one. The store's teacher and the distillation trainer share it."""
    record = getattr(model, "preprocessing", None)
    return None if record is None else record.from_unit_range


def _resolve_preprocess(teacher, preprocess):
    if isinstance(preprocess, str) and preprocess == "auto":
        preprocess = unit_range_input(teacher)
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be 'auto', None or a callable, got {preprocess!r}")
    return preprocess


def write_store(teacher, images, directory, *, epochs, topk, config, seed=0, batch_size=64,
                teacher_name=None, preprocess="auto", verbose=1):
    """Pass 1: writes (or completes) a soft-label store; returns it opened (``SoftLabelStore``).

    Args:
      teacher: a Keras model mapping a float32 batch (B, h, w, 3) -- the augmented images in
        [0, 1], after ``preprocess`` -- to class logits (B, C), C >= topk.
      images: uint8 numpy array (N, H, W, 3).
      directory: the store's folder (created).
      epochs: int >= 1, the epochs of augmentation to store (0 .. epochs - 1).
      topk: K >= 1, the probabilities kept per image (<= C).
      config: ReplayAugment (or its dict / JSON).
      seed: int >= 0; the seeds of epoch e come from PCG64([seed, e]).
      batch_size: teacher batch size.
      teacher_name: the teacher's name in the header. Given, it must match a store being
        resumed; None records ``teacher.name`` but only the weights' sha256 is compared (Keras'
        automatic names change between processes).
      preprocess: a callable applied to each augmented batch (float32 in [0, 1]) before the
        teacher; "auto" (default): the teacher's ``preprocessing.from_unit_range`` when it has
        a preprocessing record (an ``ImageClassifier``: its normalisation and input size), as
        the online teacher of ``methods.distill`` gets them; None: the [0, 1] images as they are.
      verbose: 0 silent, 1 a progress bar, 2 one line at the end.

    Resuming: a directory holding a store of the same identity (teacher weights, images,
    config, K, seed) keeps its complete epoch shards and writes the missing or wrong-sized ones;
    ``epochs`` may grow. A store of anything else is refused, naming the differing keys.
    """
    import keras

    images = _check_images(images)
    epochs = check_int(epochs, "epochs", 1)
    topk = check_int(topk, "topk", 1)
    seed = check_int(seed, "seed", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    config = _as_config(config)
    preprocess = _resolve_preprocess(teacher, preprocess)
    if not callable(teacher) or not hasattr(teacher, "weights"):
        raise TypeError(f"teacher must be a Keras model, got {type(teacher).__name__}")
    directory = Path(directory)
    n = len(images)
    # The number of classes: images through the teacher (also checks its output), before
    # anything is written
    num_classes = check_teacher(teacher, images, config, topk, preprocess, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    ids_dtype = ids_dtype_for(num_classes)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "teacher": teacher_name if teacher_name is not None else teacher.name,
              "teacher_fingerprint": teacher_fingerprint(teacher), "topk": topk,
              "num_classes": num_classes, "num_images": n,
              "image_shape": list(images.shape[1:]),
              "images_fingerprint": images_fingerprint(images),
              "augment": config.get_config(),
              "augment_version": AUGMENT_VERSION, "seed": seed, "epochs": epochs,
              "ids_dtype": ids_dtype, "record_bytes": 4 + 4 * topk}
    path = directory / HEADER
    if path.exists():
        old = _read_header(path)
        keys = [k for k in _IDENTITY if k != "teacher" or teacher_name is not None]
        differ = _differences(header, old, keys)
        if differ:
            raise ValueError(f"{directory} holds a soft-label store of another "
                             f"{'/'.join(differ)}: {_describe(differ, header, old)}. Use "
                             f"another directory (or delete this one) to write a new store")
        header["teacher"] = old["teacher"]
        header["epochs"] = max(epochs, int(old.get("epochs", 0)))
        if header != old:
            atomic_write_json(path, header)
    else:
        atomic_write_json(path, header)
    _remove_dead_temporaries(directory)

    dtype = record_dtype(topk, ids_dtype)
    expected_size = n * dtype.itemsize
    todo = [e for e in range(epochs)
            if not ((directory / epoch_filename(e)).is_file()
                    and (directory / epoch_filename(e)).stat().st_size == expected_size)]
    bar = keras.utils.Progbar(n * len(todo), verbose=int(verbose)) if verbose and todo else None
    done = 0
    for e in todo:
        seeds = epoch_seeds(seed, e, n)
        with atomic_path(directory / epoch_filename(e)) as tmp, open(tmp, "wb") as f:
            start = 0
            for batch in _augmented_dataset(images, seeds, config, batch_size,
                                            partners=epoch_partners(seed, e, n)):
                batch = batch.numpy()
                ids, values, _ = _teacher_probabilities(
                    teacher, batch, preprocess, topk,
                    f"epoch {e}, images {start}..{start + len(batch) - 1}")
                records = np.empty(len(batch), dtype)
                records["seed"] = seeds[start:start + len(batch)]
                records["ids"] = ids
                records["values"] = values.astype(np.float16)
                f.write(records.tobytes())
                start += len(batch)
                done += len(batch)
                if bar is not None:
                    bar.update(done)
            f.flush()
            os.fsync(f.fileno())
    return SoftLabelStore(directory, images, header)


# ----- reader ----------------------------------------------------------------------------------

def _read_header(path):
    try:
        header = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable soft-label store header ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a soft-label store header (format "
                         f"{header.get('format') if isinstance(header, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: store format version {header.get('format_version')!r}, this "
                         f"poa_keras reads version {FORMAT_VERSION}")
    return header


class SoftLabelStore:
    """An opened store (``open_store`` / ``write_store``): ``header``, ``records(epoch)``,
    ``dataset(epoch, ...)``. Attributes: topk, num_classes, num_images, epochs, config."""

    def __init__(self, directory, images, header):
        self.directory = Path(directory)
        self.images = images
        self.header = header
        self.topk = int(header["topk"])
        self.num_classes = int(header["num_classes"])
        self.num_images = int(header["num_images"])
        self.epochs = int(header["epochs"])
        self.config = ReplayAugment.from_config(header["augment"])
        self.dtype = record_dtype(self.topk, header["ids_dtype"])

    @property
    def record_bytes(self):
        return self.dtype.itemsize

    def shard_path(self, epoch):
        return self.directory / epoch_filename(epoch)

    def check_shard(self, epoch):
        """Raises a ValueError naming the file and its expected size if the shard of ``epoch``
        is missing or of the wrong size."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or \
                not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must be an int in [0, {self.epochs}), got {epoch!r}")
        path = self.shard_path(epoch)
        expected = self.num_images * self.record_bytes
        if not path.is_file():
            raise IncompleteStore(
                f"soft-label shard {path} is missing (expected {expected} bytes: "
                f"{self.num_images} images x {self.record_bytes} bytes); run write_store "
                f"(poa-keras distill-store) again to complete it")
        size = path.stat().st_size
        if size != expected:
            raise IncompleteStore(
                f"soft-label shard {path} is truncated or corrupt: {size} bytes, expected "
                f"{expected} ({self.num_images} images x {self.record_bytes} bytes); run "
                f"write_store (poa-keras distill-store) again to rewrite it")
        return path

    def records(self, epoch):
        """Read-only numpy memmap (num_images,) of records: "seed" int32, "ids" (K,) int16,
        "values" (K,) float16."""
        path = self.check_shard(epoch)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(self.num_images,))

    def dataset(self, epoch, batch_size, shuffle_seed=None, drop_remainder=False, labels=None):
        """tf.data of (images (B, h, w, 3) float32 in [0, 1] replayed from the stored seeds,
        {"ids": (B, K) int32, "values": (B, K) float32}); image order, or a permutation drawn
        from PCG64(shuffle_seed). ``labels`` (N,) ints: also "labels" (B,) int32 (for logs)."""
        rec = self.records(epoch)
        extra = {"ids": np.asarray(rec["ids"], np.int32),
                 "values": np.asarray(rec["values"], np.float32)}
        return replay_dataset(self.images, np.asarray(rec["seed"], np.int32), self.config,
                              batch_size, shuffle_seed=shuffle_seed,
                              drop_remainder=drop_remainder, labels=labels, extra=extra,
                              partners=epoch_partners(self.header["seed"], epoch,
                                                      self.num_images))


def replay_dataset(images, seeds, config, batch_size, shuffle_seed=None, drop_remainder=False,
                   labels=None, extra=None, partners=None):
    """tf.data of (replay_augment(images[i], seeds[i]) batched, dict) (the images alone when
    the dict would be empty): the store's reader, and
    the same images without a store (an online teacher, hard labels: ``epoch_seeds`` gives the
    seeds a store would hold). The dict holds ``extra``'s per-image arrays and, with
    ``labels`` (N,) ints, "labels" int32. Image order, or a permutation from
    PCG64(shuffle_seed). ``partners``: the epoch's MixUp / CutMix partners (``epoch_partners``)
    when the config mixes."""
    batch_size = check_int(batch_size, "batch_size", 1)
    images = _check_images(images)
    seeds = np.asarray(seeds, np.int32)
    if seeds.shape != (len(images),):
        raise ValueError(f"seeds must have shape ({len(images)},) (one per image), got "
                         f"{seeds.shape}")
    extra = dict(extra or {})
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be ({len(images)},) ints, one per image, got "
                             f"{labels.dtype} {labels.shape}")
        extra["labels"] = labels.astype(np.int32)
    order = np.arange(len(images))
    if shuffle_seed is not None:
        order = np.random.Generator(np.random.PCG64(int(shuffle_seed))).permutation(len(images))
    augmented = _augmented_dataset(images, seeds, config, None, order, partners)
    if not extra:   # the images alone
        return augmented.batch(batch_size, drop_remainder=drop_remainder).prefetch(
            tf.data.AUTOTUNE)
    ds = tf.data.Dataset.zip((augmented, tf.data.Dataset.from_tensor_slices(
        {k: np.asarray(v)[order] for k, v in extra.items()})))
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


_EXPECT = ("teacher", "teacher_fingerprint", "topk", "num_classes", "config", "seed", "epochs")


def open_store(directory, images, *, expect=None):
    """Opens a store for ``images`` (the uint8 array it was written from), checking its header:
    another dataset (fingerprint), or any ``expect`` entry that differs, is refused naming the
    differing keys; so is a missing or wrong-sized epoch shard.

    expect: dict with any of teacher (a name, or a Keras model: its weights' sha256 is
    compared), teacher_fingerprint, topk, num_classes, config (ReplayAugment / dict / JSON),
    seed, epochs (the store must hold at least this many)."""
    directory = Path(directory)
    path = directory / HEADER
    if not path.is_file():
        raise ValueError(f"{directory} holds no soft-label store (no {HEADER})")
    header = _read_header(path)
    images = _check_images(images)
    expect = dict(expect or {})
    unknown = sorted(set(expect) - set(_EXPECT))
    if unknown:
        raise ValueError(f"unknown expect keys {unknown}; valid: {list(_EXPECT)}")
    wanted = {"images_fingerprint": images_fingerprint(images), "num_images": len(images),
              "image_shape": list(images.shape[1:])}
    if "teacher" in expect:
        t = expect.pop("teacher")
        if isinstance(t, str):
            wanted["teacher"] = t
        else:
            wanted["teacher_fingerprint"] = teacher_fingerprint(t)
    if "config" in expect:
        wanted["augment"] = _as_config(expect.pop("config")).get_config()
    min_epochs = expect.pop("epochs", None)
    wanted.update(expect)
    differ = _differences(wanted, header, list(wanted))
    if differ:
        raise ValueError(f"{directory} holds a soft-label store of another {'/'.join(differ)} "
                         f"than asked for: {_describe(differ, wanted, header)}")
    if header.get("augment_version") != AUGMENT_VERSION:
        raise ValueError(f"{directory}: written with augmentation code version "
                         f"{header.get('augment_version')!r}, this poa_keras replays version "
                         f"{AUGMENT_VERSION}: the stored labels do not match its images")
    if min_epochs is not None and int(header["epochs"]) < int(min_epochs):
        raise IncompleteStore(f"{directory} holds {header['epochs']} epochs, expected at least "
                              f"{min_epochs}; its teacher can add them (write_store, or "
                              f"poa-keras distill-store --epochs={min_epochs})")
    store = SoftLabelStore(directory, images, header)
    for e in range(store.epochs):
        store.check_shard(e)
    return store


__all__ = ["AUGMENT_VERSION", "FORMAT_VERSION", "IncompleteStore", "ReplayAugment",
           "SoftLabelStore", "check_teacher", "epoch_partners", "epoch_seeds",
           "images_fingerprint", "mix_pair", "mix_parameters", "open_store", "record_dtype",
           "replay_augment", "replay_dataset", "teacher_fingerprint", "unit_range_input",
           "write_store"]

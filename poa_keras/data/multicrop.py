"""DINO multi-crop augmentation as a tf.data pipeline (REFERENCE.md §2, DESIGN.md contract 7).

    ds = multicrop_dataset(images, batch_size=64, global_size=32, local_size=16, num_local=6)
    batch = next(iter(ds))
    batch["global"]   # (2, B, 32, 32, 3) float32: the two global views of every image
    batch["local"]    # (6, B, 16, 16, 3) float32: the local views

Per view, in the reference's order: random resized crop (area scale range, aspect ratio
log-uniform in [3/4, 4/3]; bilinear at 2x then 2x2 average pooling, where DINO uses PIL
bicubic) -> horizontal flip p 0.5 -> colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order per image) with p 0.8
-> grayscale p 0.2 -> Gaussian blur (sigma ~ U(0.1, 2) pixels of the view) with p 1.0 on global
view 1, 0.1 on global view 2, 0.5 on local views -> solarisation (x >= 0.5 -> 1 - x) with p 0.2
on global view 2 only -> normalisation.

Values: inputs are uint8 (0..255) or floats in `value_range` (default [0, 1]); the output is
float32, normalised with the ImageNet mean/std by default (normalize="imagenet": about
[-2.1, 2.6]); normalize="minus_one_one" gives [-1, 1], normalize=None gives [0, 1].

Backends: everything runs in tf.data on the CPU, whatever KERAS_BACKEND is, and yields
tf.Tensors. `model.fit(ds)` accepts the dataset on every backend; to feed arrays by hand with
JAX or PyTorch, iterate `ds.as_numpy_iterator()` (dicts of numpy arrays, for jnp.asarray /
torch.from_numpy).

Seeds: every random draw is a stateless op whose seed comes from `seed` (the shuffle, and two
seeded `tf.data.Dataset.random` streams: one value per image for the crops, one per batch for the
photometric augmentations). So the same seed gives the same sequence of batches, epoch after
epoch, even with parallel map calls; each new epoch (a new iterator over the same dataset)
gets new crops and a new order.

Replay: the building blocks ``crop_boxes``, ``photometric``, ``color_jitter``,
``gaussian_blur`` and ``apply_to`` are pure functions of (images, seed) -- stateless ops only --
so an augmentation that must be replayed from a stored seed (a soft-label store that keeps
the teacher's outputs per augmented image) calls them with that seed and gets the same pixels.

Why not keras_cv.layers.RandomCropAndResize (keras-cv 0.9 with Keras 3.15; poa_keras does
not depend on keras-cv: Keras core's RandAugment / MixUp / CutMix serve fine-tuning): it runs
inside tf.data, but (1) given a seed, its area and aspect-ratio samplers are two tf.random.uniform ops
with the SAME op seed, so they draw the same number: large crops are always wide and small ones
always tall (correlation 1.0 measured); (2) its randomness is stateful, so with a parallel
`map` the same seed does not give the same batches; (3) its aspect ratio is uniform, not
log-uniform, and boxes are clipped to the image, which shrinks the area below the requested
range. The crops here follow torchvision's RandomResizedCrop (used by DINO) with stateless ops.
"""
import math
import os
import re
import sys
import warnings

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
BAD_IMAGE_CHOICES = ("error", "skip")
_NORMALIZATIONS = ("imagenet", "minus_one_one", None)


# ----- sources ---------------------------------------------------------------------------------

def images_from_dataset(dataset, image_key="image"):
    """Reduces a tf.data / TFDS dataset to a dataset of single images.

    Elements may be an image (H, W, C), an (image, label, ...) tuple, or a dict holding the
    image under `image_key` (TFDS: tfds.load(name, split="train")). Batched datasets (rank-4
    images) are unbatched.
    """
    spec = dataset.element_spec
    if isinstance(spec, dict):
        if image_key not in spec:
            raise ValueError(f"dataset elements are dicts with keys {sorted(spec)}; "
                             f"no image under image_key={image_key!r}")
        dataset = dataset.map(lambda e: e[image_key])
    elif isinstance(spec, tuple):
        dataset = dataset.map(lambda *e: e[0])
    spec = dataset.element_spec
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank not in (3, 4):
        raise ValueError(f"expected images (H, W, C) or batches (B, H, W, C), got {spec}")
    if spec.shape.rank == 4:
        dataset = dataset.unbatch()
    return dataset


def _decode(path):
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def unreadable_images(paths, progress=False):
    """The positions in ``paths`` of the files that do not decode as images (or decode to an
    empty one), ascending: every file is read and decoded once, in parallel, by the same
    decoder the pipelines use. ``progress``: a progress bar (on stderr)."""
    n = len(paths)
    if n == 0:
        return []
    ds = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), list(paths)))
    # A file that fails to decode is dropped by ignore_errors: the positions that do not come
    # out are the unreadable files (the error itself never names the file).
    ds = ds.map(lambda i, path: (i, tf.reduce_prod(tf.shape(_decode(path))[:2]) > 0),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().batch(256)
    readable = np.zeros(n, bool)
    reached, shown = 0, -1
    for index, nonempty in ds.as_numpy_iterator():
        readable[index] = nonempty
        reached = max(reached, int(index.max()) + 1)
        if progress and 50 * reached // n != shown:
            shown = 50 * reached // n
            print(f"\rchecking the images: {reached}/{n}", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\rchecking the images: {n}/{n}", file=sys.stderr, flush=True)
    return [int(i) for i in np.flatnonzero(~readable)]


def _why_unreadable(path):
    """The decoder's complaint about one file (its first line)."""
    try:
        image = _decode(path)
    except (tf.errors.OpError, ValueError) as error:
        text = getattr(error, "message", None) or str(error)
        text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\].*", "", text).strip()
        return text.splitlines()[0] if text else type(error).__name__
    return "an empty image" if min(image.shape[:2]) == 0 else "unreadable"


def _describe_bad(paths, limit=5):
    shown = [f"{p} ({_why_unreadable(p)})" for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return "; ".join(shown) + more


def images_from_directory(directory, image_size=None, with_labels=False, on_bad_image="error",
                          progress=False):
    """Images from a folder tree (recursively; .jpg .jpeg .png .bmp .gif), in sorted path order.

    Args:
      directory: root folder. With with_labels=True its sub-folders are the classes.
      image_size: None keeps every image's own size (multi-crop handles any size); an int or
        (height, width) resizes all of them (bilinear, antialiased).
      with_labels: also return int32 labels (index of the first-level sub-folder).
      on_bad_image: every file is decoded once before the dataset is made
        (``unreadable_images``), so that a bad file stops nothing later, half way through a
        training run: "error" raises a ValueError naming the files that do not decode (and
        why), "skip" leaves them out with a warning giving their number.
      progress: show the progress of that check (on stderr).

    Returns:
      A tf.data.Dataset of uint8 (H, W, 3) images, or of (image, label) pairs plus the list of
      class names when with_labels=True.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"not a directory: {directory!r}")
    if on_bad_image not in BAD_IMAGE_CHOICES:
        raise ValueError(f"on_bad_image must be one of {list(BAD_IMAGE_CHOICES)}, got "
                         f"{on_bad_image!r}")
    paths, labels = [], []
    class_names = sorted(d for d in os.listdir(directory)
                         if os.path.isdir(os.path.join(directory, d)))
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(root, name)
                paths.append(path)
                first = os.path.relpath(path, directory).split(os.sep)[0]
                labels.append(class_names.index(first) if first in class_names else -1)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory!r}")
    if with_labels and min(labels) < 0:
        raise ValueError(f"with_labels=True needs every image inside a class sub-folder of "
                         f"{directory!r}; some are at the top level")
    size = _pair(image_size, "image_size") if image_size is not None else None
    bad = unreadable_images(paths, progress=progress)
    if bad:
        bad_paths = [paths[i] for i in bad]
        if on_bad_image == "error" or len(bad) == len(paths):
            raise ValueError(
                f"{len(bad)} of the {len(paths)} image files under {directory!r} cannot be "
                f"decoded: {_describe_bad(bad_paths)}. Remove or replace them"
                + (", or leave them out with on_bad_image='skip' (a recipe's "
                   "data.on_bad_image, the command line's --on_bad_image=skip)."
                   if len(bad) < len(paths) else "."))
        warnings.warn(f"skipped {len(bad)} of the {len(paths)} image files under "
                      f"{directory!r}: they cannot be decoded ({_describe_bad(bad_paths, 3)})",
                      stacklevel=2)
        keep = sorted(set(range(len(paths))) - set(bad))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]

    def load(path):
        image = _decode(path)
        if size is not None:
            image = tf.image.resize(image, size, antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return image

    ds = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if not with_labels:
        return ds
    labelled = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(
        np.asarray(labels, np.int32))))
    return labelled, class_names


# ----- the pipeline ----------------------------------------------------------------------------

def multicrop_dataset(images, batch_size, global_size=224, local_size=96, num_local=8,
                      num_global=2,
                      global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), seed=0,
                      normalize="imagenet", shuffle=True, shuffle_buffer=10_000, repeat=False,
                      drop_remainder=True, value_range=None, image_key="image",
                      ratio=(3.0 / 4.0, 4.0 / 3.0), supersample=2, flip_prob=0.5,
                      color_jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                      blur_prob=(1.0, 0.1, 0.5), blur_sigma=(0.1, 2.0),
                      solarize_prob=(0.0, 0.2, 0.0), masks=False, mask_patch_size=None,
                      mask_probability=0.5, mask_ratio=(0.1, 0.5),
                      num_parallel_calls=tf.data.AUTOTUNE):
    """DINO multi-crop batches: {"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)} float32.

    Args:
      images: uint8/float array (N, H, W, C) (C = 1 or 3), a tf.data.Dataset of images (see
        `images_from_dataset`: tuples and TFDS dicts work; images may differ in size), or a path
        to a folder of images (see `images_from_directory`).
      batch_size: images per batch B.
      global_size, local_size: output sizes, int or (height, width).
      num_local: number v of local views (0 gives a "local" entry with no views).
      num_global: 2 global views (DINO, POA, SimSiam), or 1 (MAE: "global" is (1, B, ...));
        blur_prob / solarize_prob then use their first entry for it. Masks need 2.
      global_scale, local_scale: crop area range as a fraction of the image (POA: (0.32, 1.0)
        and (0.05, 0.32); DINO: (0.4, 1.0) and (0.05, 0.4)).
      seed: int; the same seed gives the same batches (see the module docstring).
      normalize: "imagenet" (mean/std), "minus_one_one" or None ([0, 1]).
      shuffle, shuffle_buffer: shuffle the images (seeded; reshuffled every epoch). Array inputs
        are shuffled as a whole (by index); datasets through a buffer of this many images.
      repeat: repeat forever (then use steps_per_epoch); else one pass per epoch.
      drop_remainder: drop the last incomplete batch (static batch size for compiled steps).
      value_range: range of float inputs, default (0, 1); uint8 inputs are always 0..255.
      image_key: where dict elements hold the image.
      ratio: aspect-ratio range of the crops (log-uniform).
      supersample: crops are sampled bilinearly at this many times the output resolution and
        average-pooled back (antialiasing; 1 = plain bilinear). DINO resizes with PIL bicubic.
      flip_prob, color_jitter (brightness, contrast, saturation, hue), jitter_prob,
      grayscale_prob: as DINO, the same for every view.
      blur_prob, solarize_prob: (global view 1, global view 2, local views) probabilities.
      blur_sigma: Gaussian blur sigma range in pixels of the view.
      masks: also yield iBOT masks: every batch then holds "masks", (2, B, H/p * W/p) bool
        (True = masked patch, row-major over the patch grid of a global view), iBOT / DINOv2
        block-wise masks (`masking.mask_batch` over the 2B global views together:
        int(2B * mask_probability) of them masked, ratios stratified over mask_ratio,
        shuffled), seeded like the rest.
      mask_patch_size: the backbone's patch size p (required with masks=True).
      mask_probability, mask_ratio: fraction of the global views that get a mask (POA 0.5)
        and their masking ratio range (POA (0.1, 0.5)); a POA trainer's ``ibot_mask_*`` recipe
        keys should match them (they size its masked-token buffer).
      num_parallel_calls: for the map stages (results stay deterministic).

    Returns:
      A tf.data.Dataset of dicts {"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)} (plus
      "masks": (2, B, N) bool with masks=True).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(num_local) < 0:
        raise ValueError(f"num_local must be >= 0, got {num_local}")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
    global_size = _pair(global_size, "global_size")
    local_size = _pair(local_size, "local_size")
    global_scale = _range(global_scale, "global_scale", upper=1.0)
    local_scale = _range(local_scale, "local_scale", upper=1.0)
    ratio = _range(ratio, "ratio", upper=None)
    blur_prob = _three(blur_prob, "blur_prob")
    solarize_prob = _three(solarize_prob, "solarize_prob")
    num_local = int(num_local)
    if num_global not in (1, 2):
        raise ValueError(f"num_global must be 1 or 2, got {num_global!r}")
    if masks and num_global != 2:
        raise ValueError("masks=True needs num_global=2 (iBOT masks cover both global views)")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be an int >= 1, got {supersample}")
    if len(tuple(color_jitter)) != 4 or min(color_jitter) < 0:
        raise ValueError("color_jitter must be four non-negative strengths (brightness, "
                         f"contrast, saturation, hue), got {color_jitter}")
    for name, p in (("flip_prob", flip_prob), ("jitter_prob", jitter_prob),
                    ("grayscale_prob", grayscale_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if masks:
        if mask_patch_size is None:
            raise ValueError("masks=True needs mask_patch_size: the backbone's patch size (the "
                             "masks cover its patch grid of the global views)")
        mask_patch_size = int(mask_patch_size)
        if mask_patch_size < 1 or global_size[0] % mask_patch_size or \
                global_size[1] % mask_patch_size:
            raise ValueError(f"mask_patch_size={mask_patch_size} must be a positive divisor of "
                             f"the global view size {global_size}")
        if not 0.0 <= float(mask_probability) <= 1.0:
            raise ValueError(f"mask_probability must be a probability in [0, 1], got "
                             f"{mask_probability}")
        mask_ratio = tuple(float(r) for r in mask_ratio)
        if len(mask_ratio) != 2 or not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
            raise ValueError(f"mask_ratio must be (low, high) with 0 <= low <= high <= 1, got "
                             f"{mask_ratio}")
    # The fourth seed (masks) leaves the first three, and so every existing pipeline, unchanged.
    shuffle_seed, crop_seed, photo_seed, mask_seed = (
        int(s) for s in np.random.SeedSequence(int(seed)).generate_state(4))

    ds, scale = _source(images, shuffle, shuffle_buffer, shuffle_seed, value_range, image_key)
    if repeat:
        ds = ds.repeat()

    # Crops: one random stream value per image, split into one seed per view.
    crop_stream = tf.data.Dataset.random(seed=crop_seed, rerandomize_each_iteration=True)

    view_scales = np.array([global_scale] * num_global + [local_scale] * num_local, np.float32)

    def crop_views(image, rnd):
        image = _to_float_rgb(image, scale)
        shape = tf.shape(image)
        # All views' boxes in one vectorised draw, all views of a size in one resampling op:
        # tf.data runs a few large ops much faster than many small ones.
        boxes = crop_boxes(tf.stack([rnd, tf.constant(0, tf.int64)]), shape[0], shape[1],
                            view_scales, ratio)
        views_g = _resample(image, boxes[:num_global], global_size, supersample)
        if num_local:
            local = _resample(image, boxes[num_global:], local_size, supersample)
        else:
            local = tf.zeros((0, *local_size, 3), tf.float32)
        return views_g, local

    # Plain graph functions (no autograph: nothing here needs it, and it slows tracing).
    ds = tf.data.Dataset.zip((ds, crop_stream)).map(
        tf.autograph.experimental.do_not_convert(crop_views),
        num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)

    # Photometric augmentations: batched, one random stream value per batch.
    photo_stream = tf.data.Dataset.random(seed=photo_seed, rerandomize_each_iteration=True)
    jitter = tuple(float(j) for j in color_jitter)
    common = dict(flip_prob=float(flip_prob), jitter=jitter, jitter_prob=float(jitter_prob),
                  grayscale_prob=float(grayscale_prob),
                  blur_sigma=tuple(float(b) for b in blur_sigma), normalize=normalize)

    def augment(batch, rnd, mask_rnd=None):
        views_g, views_l = batch                      # (B, g, H, W, 3), (B, v, h, w, 3)
        seeds = tf.random.experimental.stateless_split(tf.stack([rnd, tf.constant(1, tf.int64)]),
                                                       2)
        # All views of one size go through together as (views * B) images, each with its own
        # view's blur / solarisation probability.
        b = tf.shape(views_g)[0]
        out_g = _photometric_graph(_view_major(views_g, global_size), seeds[0],
                                   blur_prob=blur_prob[:num_global],
                                   solarize_prob=solarize_prob[:num_global], **common)
        out = {"global": tf.reshape(out_g, (num_global, -1, *global_size, 3))}
        if num_local:
            out_l = _photometric_graph(_view_major(views_l, local_size), seeds[1],
                                       blur_prob=blur_prob[2:] * num_local,
                                       solarize_prob=solarize_prob[2:] * num_local, **common)
            out["local"] = tf.reshape(out_l, (num_local, -1, *local_size, 3))
        else:
            out["local"] = tf.zeros((0, b, *local_size, 3), tf.float32)
        if mask_rnd is not None:
            out["masks"] = _batch_masks(mask_rnd, b, views_g.shape[0], global_size,
                                        mask_patch_size, float(mask_probability), mask_ratio)
        return out

    streams = (ds, photo_stream)
    if masks:
        streams += (tf.data.Dataset.random(seed=mask_seed, rerandomize_each_iteration=True),)
    ds = tf.data.Dataset.zip(streams).map(
        tf.autograph.experimental.do_not_convert(augment),
        num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _batch_masks(rnd, batch, static_batch, global_size, patch_size, mask_prob, mask_ratio):
    """iBOT masks (2, B, N) bool for the 2B global views of a batch, drawn in numpy
    (`masking.mask_batch`) from the batch's random stream value."""
    from poa_keras.data.masking import mask_batch

    grid = (global_size[0] // patch_size, global_size[1] // patch_size)
    n = grid[0] * grid[1]

    def draw(value, b):
        rng = np.random.default_rng(int(np.asarray(value, np.int64).view(np.uint64)))
        masks = mask_batch(2 * int(b), grid, mask_prob, mask_ratio, rng=rng, flat=True)
        return masks.reshape(2, int(b), n)   # view-major, like "global"

    masks = tf.numpy_function(draw, [rnd, batch], tf.bool, stateful=False)
    return tf.ensure_shape(masks, (2, static_batch, n))


# ----- helpers ---------------------------------------------------------------------------------

def _pair(size, name):
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size}")
    return size


def _range(values, name, upper):
    low, high = (float(v) for v in values)
    if not 0.0 < low <= high or (upper is not None and high > upper):
        bound = f"0 < low <= high <= {upper}" if upper is not None else "0 < low <= high"
        raise ValueError(f"{name} must satisfy {bound}, got {values}")
    return low, high


def _three(values, name):
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} must be three probabilities (global 1, global 2, local), "
                         f"got {values}")
    return values


def _source(images, shuffle, shuffle_buffer, shuffle_seed, value_range, image_key):
    """A dataset of single images and the factor that maps them to [0, 1]."""
    if isinstance(images, (str, os.PathLike)):
        images = images_from_directory(images)
    if isinstance(images, tf.data.Dataset):
        ds = images_from_dataset(images, image_key=image_key)
        dtype = ds.element_spec.dtype
        if shuffle:
            ds = ds.shuffle(int(shuffle_buffer), seed=shuffle_seed, reshuffle_each_iteration=True)
    else:
        array = tf.convert_to_tensor(images)
        if array.shape.rank != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"expected images (N, H, W, 1 or 3), got shape {array.shape}")
        dtype = array.dtype
        # Shuffle indices, not images: no copy of the data set in a shuffle buffer.
        ds = tf.data.Dataset.range(array.shape[0])
        if shuffle:
            ds = ds.shuffle(array.shape[0], seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda i: tf.gather(array, i))
    if dtype == tf.uint8:
        return ds, 1.0 / 255.0
    if not dtype.is_floating:
        raise ValueError(f"images must be uint8 or float, got {dtype.name}")
    low, high = value_range if value_range is not None else (0.0, 1.0)
    if high <= low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    if low != 0.0:
        ds = ds.map(lambda x: x - tf.cast(low, x.dtype))
    return ds, 1.0 / (high - low)


def _to_float_rgb(image, scale):
    image = tf.cast(image, tf.float32) * scale
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] is None:
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image),
                        lambda: image)
    return tf.clip_by_value(tf.ensure_shape(image, (None, None, 3)), 0.0, 1.0)


def crop_boxes(seed, height, width, scales, ratio, attempts=10):
    """torchvision's RandomResizedCrop.get_params with stateless draws, for V views at once:
    per view up to `attempts` (area, log-aspect) proposals, the first that fits wins; else the
    whole image narrowed to the allowed aspect ratios, centred.

    Args: seed [2]; height, width of the image; scales (V, 2) area ranges; ratio (low, high).
    Returns: (V, 4) boxes [y1, x1, y2, x2] for tf.image.crop_and_resize: normalised so that
    0 and 1 are the centres of the first and last pixel, spanning the centres of the first and
    last pixel of the crop.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    views = scales.shape[0]
    u = tf.random.stateless_uniform((4, views, attempts), seed)
    lo, hi = tf.constant(scales[:, :1]), tf.constant(scales[:, 1:])
    area = h * w * (lo + (hi - lo) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w >= 1.0) & (crop_h >= 1.0) & (crop_w <= w) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)   # (V,)
    found = tf.reduce_any(fits, axis=1)

    def pick(t):
        return tf.gather(t, first, axis=1, batch_dims=1)

    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    ch = tf.where(found, pick(crop_h), fb_h)
    cw = tf.where(found, pick(crop_w), fb_w)
    top = tf.where(found, tf.floor(pick(u[2]) * (h - ch + 1.0)), tf.floor((h - ch) / 2.0))
    left = tf.where(found, tf.floor(pick(u[3]) * (w - cw + 1.0)), tf.floor((w - cw) / 2.0))
    top = tf.clip_by_value(top, 0.0, h - ch)
    left = tf.clip_by_value(left, 0.0, w - cw)
    span_h = tf.maximum(h - 1.0, 1.0)
    span_w = tf.maximum(w - 1.0, 1.0)
    return tf.stack([top / span_h, left / span_w, (top + ch - 1.0) / span_h,
                     (left + cw - 1.0) / span_w], axis=1)


def _resample(image, boxes, size, supersample):
    """Crops (V, 4) normalised corner-aligned boxes out of one image (H, W, 3) and resizes
    them to `size`: bilinear sampling at `supersample` times the output resolution, then
    average pooling by the same factor (antialiasing for downscales up to about that factor).
    Returns (V, height, width, 3)."""
    k = int(supersample)
    out = tf.image.crop_and_resize(image[None], boxes, tf.zeros(tf.shape(boxes)[:1], tf.int32),
                                   (size[0] * k, size[1] * k), method="bilinear")
    if k > 1:
        out = tf.nn.avg_pool2d(out, k, k, "VALID")
    return out


def _view_major(views, size):
    """(B, V, h, w, 3) -> (V * B, h, w, 3), view-major (all images of view 0 first)."""
    return tf.reshape(tf.transpose(views, (1, 0, 2, 3, 4)), (-1, *size, 3))


def _gray(x):
    return tf.image.rgb_to_grayscale(x)   # 0.2989 R + 0.587 G + 0.114 B, as torchvision


def _per_image(values):
    return values[:, None, None, None]


def color_jitter(x, seed, brightness, contrast, saturation, hue):
    """torchvision ColorJitter on a batch: per-image factors and a per-image random order.

    Each of the four slots partitions the batch by the op each image applies there, runs every
    op on its part only and stitches the parts back: every image goes through exactly its four
    ops (computing all ops for all images at every slot would cost four times as much). The
    slots are a tf.while_loop, so the graph holds the ops once (faster to build)."""
    batch = tf.shape(x)[0]
    u = tf.unstack(tf.random.stateless_uniform((4, batch), seed))
    order_key = tf.random.stateless_uniform(
        (batch, 4), tf.random.experimental.stateless_fold_in(seed, 1))
    order = tf.argsort(order_key, axis=1)   # (N, 4) int32: the op of each image at each slot

    def factor(i, strength):
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * u[i]

    # (N, 4) per-image parameters: brightness, contrast, saturation factors and hue shift.
    params = tf.stack([factor(0, brightness), factor(1, contrast), factor(2, saturation),
                       hue * (2.0 * u[3] - 1.0)], axis=1)

    def adjust_brightness(img, p):
        return tf.clip_by_value(img * _per_image(p[0]), 0.0, 1.0)

    def adjust_contrast(img, p):
        mean = tf.reduce_mean(_gray(img), axis=(1, 2, 3), keepdims=True)
        c = _per_image(p[1])
        return tf.clip_by_value(c * img + (1.0 - c) * mean, 0.0, 1.0)

    def adjust_saturation(img, p):
        s = _per_image(p[2])
        return tf.clip_by_value(s * img + (1.0 - s) * _gray(img), 0.0, 1.0)

    def adjust_hue(img, p):
        # The fused AdjustHue kernel (one scalar shift per call), image by image: three times
        # faster than rgb_to_hsv / hsv_to_rgb on the batch, with the same result.
        out = tf.map_fn(lambda args: tf.image.adjust_hue(args[0], args[1]), (img, p[3]),
                        fn_output_signature=tf.float32)
        return tf.reshape(out, tf.shape(img))   # keeps (0, h, w, 3) when no image is here

    ops = [(brightness, adjust_brightness), (contrast, adjust_contrast),
           (saturation, adjust_saturation), (hue, adjust_hue)]
    positions = tf.range(batch)

    def slot_step(slot, img):
        which = tf.gather(order, slot, axis=1)
        parts = tf.dynamic_partition(img, which, 4)
        part_params = tf.dynamic_partition(params, which, 4)
        indices = tf.dynamic_partition(positions, which, 4)
        done = [fn(part, tf.unstack(pp, num=4, axis=1)) if strength > 0 else part
                for (strength, fn), part, pp in zip(ops, parts, part_params)]
        return slot + 1, tf.ensure_shape(tf.dynamic_stitch(indices, done), img.shape)

    _, x = tf.while_loop(lambda slot, img: slot < 4, slot_step, (tf.constant(0), x))
    return x


def gaussian_blur(x, seed, sigma_range):
    """Per-image Gaussian blur (N, h, w, 3), sigma ~ U(sigma_range) pixels, kernel radius
    ceil(3 * max sigma). Separable depthwise convolutions over the images stacked as channels,
    so each image has its own kernel. Pixels outside the image are ignored (the weights are
    renormalised at the borders), so a flat image stays flat."""
    n = tf.shape(x)[0]
    height, width = x.shape[1], x.shape[2]
    sigma = tf.random.stateless_uniform((n,), seed, sigma_range[0], sigma_range[1])
    radius = int(math.ceil(3.0 * sigma_range[1]))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = tf.exp(-taps[None] ** 2 / (2.0 * tf.square(sigma)[:, None]))   # (N, 2r + 1)
    per_channel = tf.repeat(kernel, 3, axis=0)                               # (N * 3, 2r + 1)

    def renormaliser(length):
        """(N * 3, length): the kernel weight that falls inside the image at each position."""
        pos = np.arange(length)[:, None] + taps[None].astype(np.int64)
        inside = ((pos >= 0) & (pos < length)).astype(np.float32)            # (length, 2r + 1)
        return tf.matmul(per_channel, tf.constant(inside), transpose_b=True)

    # (N, h, w, 3) -> (1, h, w, N * 3): channel c of image i at index 3 i + c
    stacked = tf.reshape(tf.transpose(x, (1, 2, 0, 3)), (1, height, width, -1))
    taps_first = tf.transpose(per_channel)                                   # (2r + 1, N * 3)
    stacked = tf.nn.depthwise_conv2d(stacked, taps_first[:, None, :, None], (1, 1, 1, 1),
                                     "SAME")
    stacked /= tf.transpose(renormaliser(height))[None, :, None, :]
    stacked = tf.nn.depthwise_conv2d(stacked, taps_first[None, :, :, None], (1, 1, 1, 1),
                                     "SAME")
    stacked /= tf.transpose(renormaliser(width))[None, None, :, :]
    return tf.transpose(tf.reshape(stacked, (height, width, n, 3)), (2, 0, 1, 3))


def apply_to(x, selected, fn):
    """fn on the images of x (N, h, w, 3) where selected (N,) is True; the others unchanged.
    Only the selected images are computed (a blur with p 0.1 costs a tenth of a full one)."""
    which = tf.cast(selected, tf.int32)

    def apply():
        keep, change = tf.dynamic_partition(x, which, 2)
        positions = tf.dynamic_partition(tf.range(tf.shape(x)[0]), which, 2)
        return tf.dynamic_stitch(positions, [keep, fn(change)])

    # With nothing selected fn would see an empty batch (a zero-sized blur filter is an error).
    return tf.ensure_shape(tf.cond(tf.reduce_any(selected), apply, lambda: x), x.shape)


def photometric(x, seed, flip_prob, jitter, jitter_prob, grayscale_prob, blur_prob,
                 blur_sigma, solarize_prob, normalize):
    """A view-major batch of views (V * B, h, w, 3) in [0, 1] -> augmented and normalised.

    blur_prob and solarize_prob are tuples with one probability per view (V of them); the
    other settings are floats shared by all views."""
    n = tf.shape(x)[0]
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8), num=8)

    def coin(i, p):
        if isinstance(p, tuple):   # per view -> per image of the view-major stack
            p = tf.repeat(tf.constant(p, tf.float32), n // len(p))
        return tf.random.stateless_uniform((n,), seeds[i]) < p

    if flip_prob > 0:
        x = tf.where(_per_image(coin(0, flip_prob)), tf.reverse(x, axis=[2]), x)
    if jitter_prob > 0 and any(j > 0 for j in jitter):
        x = apply_to(x, coin(1, jitter_prob), lambda v: color_jitter(v, seeds[2], *jitter))
    if grayscale_prob > 0:
        x = apply_to(x, coin(3, grayscale_prob), lambda v: tf.tile(_gray(v), (1, 1, 1, 3)))
    if max(blur_prob) > 0:
        x = apply_to(x, coin(4, blur_prob), lambda v: gaussian_blur(v, seeds[5], blur_sigma))
    if max(solarize_prob) > 0:
        x = apply_to(x, coin(6, solarize_prob), lambda v: tf.where(v >= 0.5, 1.0 - v, v))
    x = tf.clip_by_value(x, 0.0, 1.0)
    if normalize == "imagenet":
        x = (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    elif normalize == "minus_one_one":
        x = 2.0 * x - 1.0
    return x


# Traced once per (view shape, settings) and reused by every pipeline that needs it: building
# the photometric graph is the slowest part of constructing a pipeline.
_photometric_graph = tf.function(photometric, autograph=False)

"""Running a fine-tuning recipe end to end: labelled data, augmentation, an ImageClassifier,
the optimizer, checkpoints, resume and the fine-tuned preset (MAE-Lite's recipe, REFERENCE.md §3).

    from poa_keras.finetune import finetune, load_finetune_recipe
    result = finetune("demo_finetune", "runs/demo_finetune")   # a name, a .py file or a dict
    result.classifier          # the fine-tuned ImageClassifier (saved as classifier/)
    result.top1                # top-1 on the held-out split

A fine-tuning recipe is a Python file in recipes/ (shipped as ``poa_keras.recipes``) defining
``FINETUNE_RECIPE``, a dict; pretraining recipes define ``RECIPE`` (poa_keras/pretrain.py), and
each runner refuses the other kind with a message naming the command that runs it. Every key
has a default but ``train.epochs``, ``train.batch_size`` and the model (``DEFAULTS``: MAE-Lite's
fine-tuning recipe); docs/finetune.md describes each key. The sections:

* ``model``: ``preset`` (a registered name or a preset directory, e.g. a pretraining run's
  ``teacher/``) or ``config`` (a named configuration with random weights, and ``config_args``
  overriding its entries); ``subnet`` (None: the intact network; a size name, a tuple, or a
  dict of spec fields such as ``{"width": 48, "depth": 3}``: that size, extracted);
  ``load_weights``; ``preprocessing`` (changes of the backbone's ``ImagePreprocessing`` record,
  e.g. the evaluation's ``crop_pct`` and ``interpolation``; saved with the classifier);
* ``classifier``: ``pooling`` ("avg_norm": MAE-Lite's global average pool + fc_norm; "avg",
  "cls"), ``dropout``, ``num_classes`` (default: the data's);
* ``data``: ``source`` "shapes" (the embedded data set: ``num_images`` train and ``num_val``
  held-out images, ``image_size``, ``seed``, ``palette``), "folder" (``path``: one sub-folder
  per class; ``val_path``, or ``val_fraction`` of ``path`` held out; ``on_bad_image``) or
  "tfds" (``name``, ``split``, ``val_split``, ``data_dir``, ``image_key``, ``label_key``);
  ``steps_per_epoch`` (default: train images // batch), ``shuffle_buffer``, ``threads``,
  ``val_batch_size``;
* ``augment``: RandomResizedCrop (``crop_scale``, ``crop_ratio``, ``interpolation``) to
  ``image_size`` (default: the model's) and a flip (``flip_prob``), then Keras' RandAugment
  (``randaugment_ops``, 0 = off; ``randaugment_factor``), Keras' RandomColorJitter
  (``color_jitter``; skipped when RandAugment is on unless ``force_color_jitter``, as timm
  does), Keras' MixUp / CutMix (``mixup`` / ``cutmix``: their alphas, 0 = off; ``mix_prob``,
  ``switch_prob``); ``lanes``: the Keras layers run in that many independent seeded lanes;
* ``optimizer``: ``name`` "adamw", ``beta_1``, ``beta_2``, ``epsilon``;
* ``train``: ``epochs``, ``batch_size``, ``lr`` (at ``reference_batch`` images: MAE-Lite's
  lr = 1e-3 * batch / 256 is lr=1e-3, lr_scaling="linear", reference_batch=256),
  ``lr_scaling``, ``reference_batch``, ``min_lr``, ``warmup_epochs`` (linear from 0, then a
  cosine to min_lr, per step), ``weight_decay`` (AdamW's, not on biases, norms, the cls token
  and position embeddings), ``layer_decay`` (and ``patch_embed_lr_mult``, through
  ``ImageClassifier.layer_decay_optimizer``), ``clip_grad`` (a global norm, None: none),
  ``label_smoothing``;
* ``checkpoint``: ``every_epochs``, ``keep``, ``max_abs``;
* ``seed``: the classifier's initialisation and every random draw of the data.

The data of epoch e is a function of (seed, e) (the crops and flips stateless, the Keras
layers created afresh per epoch with seeds of (seed, e) and run in order), so a run killed at
any moment and resumed from its last checkpoint (every epoch) goes on exactly as the
uninterrupted run would have. A run directory holds ``checkpoints/``, ``log.csv`` (with the
held-out ``val_accuracy`` of every epoch), ``recipe.json`` and, after the last epoch,
``classifier/`` (``ImageClassifier.from_preset``) and ``result.json`` (top-1, class names).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from poa_keras.files import atomic_write_json
from poa_keras.pretrain import (
    BAD_IMAGE_CHOICES, DATA_SOURCES, apply_override, backbone_keys,
    bool_rule, check_keys, choice_rule, compilation_cache_dir, enable_compilation_cache,
    epoch_seed, fit_epochs, folder_images, fraction_pair_rule, limit_threads, number_rule,
    open_checkpoints, recipe_changes, recipe_from_file, shapes_split,
    shipped_recipe, steps_per_epoch, tfds_images, wrong_kind_message)
from poa_keras import pretrain as pretrain_runner
from poa_keras.methods.schedules import no_weight_decay

SECTIONS = ("name", "description", "model", "classifier", "data", "augment", "optimizer",
            "train", "distill", "checkpoint", "seed")
# Every key of every section, with its default: MAE-Lite's fine-tuning recipe (REFERENCE.md §3)
# where it has one. None in train.epochs / train.batch_size: a recipe must give them.
DEFAULTS = {
    "model": dict(preset=None, config=None, config_args=None, subnet=None, load_weights=True,
                  preprocessing=None),
    "classifier": dict(pooling="avg_norm", dropout=0.0, num_classes=None),
    "data": dict(source="shapes", num_images=10_000, num_val=2_000, image_size=64, seed=None,
                 palette="light_on_dark", path=None, val_path=None, val_fraction=0.2,
                 on_bad_image="error", name=None, split="train", val_split="validation",
                 data_dir=None, image_key="image", label_key="label", steps_per_epoch=None,
                 shuffle_buffer=10_000, threads=None, val_batch_size=None),
    "augment": dict(image_size=None, crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
                    interpolation="bicubic", flip_prob=0.5, randaugment_ops=2,
                    randaugment_factor=0.45, color_jitter=0.3, force_color_jitter=False,
                    mixup=0.2, cutmix=0.0, mix_prob=1.0, switch_prob=0.5, lanes=1),
    "optimizer": dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    "train": dict(epochs=None, batch_size=None, lr=1e-3, lr_scaling="linear",
                  reference_batch=256, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                  layer_decay=0.85, patch_embed_lr_mult=1.0, clip_grad=None,
                  label_smoothing=0.0),
    "checkpoint": dict(every_epochs=1, keep=2, max_abs=1e12),
    # TinyViT's fast distillation (REFERENCE.md §4): present and non-empty, the run trains on a
    # teacher's soft labels (``_distillation_run``) instead of the data's labels; its train and
    # augment defaults are TinyViT's (``distillation_defaults``).
    "distill": dict(teacher=None, teacher_recipe=None, targets="stored", topk=10,
                    store=None, store_epochs=None, teacher_batch_size=64),
}
DISTILL_TARGETS = ("stored", "teacher", "teacher_dense", "labels")
CROP_INTERPOLATIONS = ("bicubic", "bilinear")
# Keys a resumed run may change: they leave the data, the model and the schedules as they were
# (names, the checkpoint settings, the pipeline's threads, where the files lie).
RESUMABLE_KEYS = ("name", "description", "checkpoint.every_epochs", "checkpoint.keep",
                  "checkpoint.max_abs", "data.threads", "data.path", "data.val_path",
                  "data.data_dir", "model.preset", "distill.store", "distill.teacher_batch_size")


# ------------------------------------------------------------------------------------ recipes

def recipe_names():
    """Names of the fine-tuning recipes shipped in ``poa_keras.recipes``."""
    return pretrain_runner.recipe_names("finetune")


def section(recipe, name):
    """A section of a recipe with its defaults filled in (a new dict): ``DEFAULTS``, and for a
    distillation recipe (a ``distill`` section) TinyViT's (``distillation_defaults``) over
    them."""
    defaults = DEFAULTS[name]
    if recipe.get("distill") and name in ("train", "augment"):
        defaults = dict(defaults, **distillation_defaults()[name])
    return dict(defaults, **(recipe.get(name) or {}))


def distillation_defaults():
    """The ``train`` and ``augment`` defaults of a distillation recipe: TinyViT's 22k
    distillation (``methods.distill.DISTILL_RECIPE``: AdamW lr 2.5e-4 x batch / 512, 5 warmup
    epochs, weight decay 0.01, clipping 5; no layer decay, no label smoothing; no mixup /
    cutmix / RandAugment, colour jitter 0.4, the replay's bilinear crop)."""
    from poa_keras.methods.distill import DISTILL_RECIPE

    return {"train": dict(DISTILL_RECIPE, layer_decay=1.0, patch_embed_lr_mult=1.0,
                          label_smoothing=0.0),
            "augment": dict(interpolation="bilinear", randaugment_ops=0, color_jitter=0.4,
                            mixup=0.0, cutmix=0.0)}


def load_finetune_recipe(recipe, overrides=()):
    """A fine-tuning recipe dict from a shipped name, a .py file defining FINETUNE_RECIPE, or
    a dict; then ``overrides`` ("section.key=value", values parsed as Python literals) are
    applied and the recipe is validated. Returns a deep copy. A pretraining recipe is refused,
    naming the command that runs it."""
    if isinstance(recipe, dict):
        result = copy.deepcopy(recipe)
        if "method" in result:
            raise ValueError(wrong_kind_message("this recipe dict (a 'method' section)",
                                                "finetune"))
    elif isinstance(recipe, (str, os.PathLike)) and os.fspath(recipe).endswith(".py"):
        path = os.fspath(recipe)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file {path} does not exist")
        result = recipe_from_file(path, "finetune")
    elif isinstance(recipe, str):
        result = shipped_recipe(recipe, "finetune")
    else:
        raise TypeError(f"recipe must be a name, a .py path or a dict, got {type(recipe).__name__}")
    for item in overrides or ():
        apply_override(result, item, sections=SECTIONS)
    validate_finetune_recipe(result)
    return result


def _pair_rule():
    def check(value, where):
        ok = (isinstance(value, (tuple, list)) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
              and 0 < value[0] <= value[1])
        if not ok:
            raise ValueError(f"{where} must be a pair (low, high) with 0 < low <= high, got "
                             f"{value!r}")
    return check


def _crop_scale_rule(value, where):
    fraction_pair_rule(value, where)
    if not value[0] > 0:
        raise ValueError(f"{where} must be a pair (low, high) with 0 < low <= high <= 1, got "
                         f"{value!r}")


def _jitter_rule(value, where):
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(values) not in (1, 3) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                        or not 0 <= v <= 1 for v in values):
        raise ValueError(f"{where} must be a strength in [0, 1] for brightness, contrast and "
                         f"saturation, or three of them, got {value!r}")


def _string_rule(none=True):
    def check(value, where):
        if not (isinstance(value, str) and value) and not (none and value is None):
            raise ValueError(f"{where} must be a non-empty string{' or None' if none else ''}, "
                             f"got {value!r}")
    return check


def _subnet_rule(value, where):
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return
    elif isinstance(value, (tuple, list)):
        return
    raise ValueError(f"{where} must be None (the intact network), a size name, a tuple of spec "
                     f"fields or a dict of them (e.g. {{'width': 48, 'depth': 3}}), got "
                     f"{value!r}")


_POSITIVE = number_rule(0, low_open=True)
_NON_NEGATIVE = number_rule(0)
_FRACTION = number_rule(0, 1)
_COUNT = number_rule(1, integer=True)
VALUE_RULES = {
    "model": dict(preset=_string_rule(), config=_string_rule(), load_weights=bool_rule,
                  subnet=_subnet_rule),
    "classifier": dict(dropout=number_rule(0, 1, high_open=True),
                       num_classes=number_rule(2, integer=True, none=True)),
    "data": dict(source=choice_rule(*DATA_SOURCES), num_images=_COUNT,
                 num_val=_COUNT, image_size=_COUNT, seed=number_rule(0, integer=True, none=True),
                 path=_string_rule(), val_path=_string_rule(),
                 val_fraction=number_rule(0, 1, low_open=True, high_open=True),
                 on_bad_image=choice_rule(*BAD_IMAGE_CHOICES), name=_string_rule(),
                 split=_string_rule(False), val_split=_string_rule(False),
                 data_dir=_string_rule(), image_key=_string_rule(False),
                 label_key=_string_rule(False),
                 steps_per_epoch=number_rule(1, integer=True, none=True),
                 shuffle_buffer=_COUNT, threads=number_rule(0, integer=True, none=True),
                 val_batch_size=number_rule(1, integer=True, none=True)),
    "augment": dict(image_size=number_rule(1, integer=True, none=True),
                    crop_scale=_crop_scale_rule, crop_ratio=_pair_rule(),
                    interpolation=choice_rule(*CROP_INTERPOLATIONS), flip_prob=_FRACTION,
                    randaugment_ops=number_rule(0, integer=True), randaugment_factor=_FRACTION,
                    color_jitter=_jitter_rule, force_color_jitter=bool_rule,
                    mixup=_NON_NEGATIVE, cutmix=_NON_NEGATIVE, mix_prob=_FRACTION,
                    switch_prob=_FRACTION, lanes=_COUNT),
    "optimizer": dict(name=choice_rule("adamw"), beta_1=number_rule(0, 1, high_open=True),
                      beta_2=number_rule(0, 1, high_open=True), epsilon=_POSITIVE),
    "train": dict(epochs=_COUNT, batch_size=_COUNT, lr=_POSITIVE,
                  lr_scaling=choice_rule("linear", "sqrt", "none"),
                  reference_batch=number_rule(1, integer=True, none=True), min_lr=_NON_NEGATIVE,
                  warmup_epochs=_NON_NEGATIVE, weight_decay=_NON_NEGATIVE,
                  layer_decay=number_rule(0, 1, low_open=True),
                  patch_embed_lr_mult=_NON_NEGATIVE,
                  clip_grad=number_rule(0, low_open=True, none=True),
                  label_smoothing=number_rule(0, 1, high_open=True)),
    "checkpoint": dict(every_epochs=_COUNT, keep=_COUNT, max_abs=_POSITIVE),
    "distill": dict(teacher=_string_rule(), teacher_recipe=_string_rule(),
                    targets=choice_rule(*DISTILL_TARGETS), topk=_COUNT, store=_string_rule(),
                    store_epochs=number_rule(1, integer=True, none=True),
                    teacher_batch_size=_COUNT),
}


def validate_finetune_recipe(recipe):
    """Checks a fine-tuning recipe before anything is built: every key of every section (an
    unknown one names the closest valid key and lists them all), the values' types and ranges,
    the model (one of preset / config; a configuration's name and arguments) and the
    preprocessing changes. Returns it."""
    from poa_keras.classifier import POOLINGS
    from poa_keras.preprocessing import ImagePreprocessing

    if not isinstance(recipe, dict):
        raise TypeError(f"a recipe is a dict, got {type(recipe).__name__}")
    if "method" in recipe:
        raise ValueError(wrong_kind_message("this recipe (a 'method' section)", "finetune"))
    check_keys("", recipe, SECTIONS)
    for name in DEFAULTS:
        if not isinstance(recipe.get(name) or {}, dict):
            raise ValueError(f"recipe section {name!r} must be a dict, got {recipe.get(name)!r}")
        check_keys(name, recipe.get(name) or {}, DEFAULTS[name])
    for key in ("name", "description"):
        if recipe.get(key) is not None and not isinstance(recipe[key], str):
            raise ValueError(f"recipe {key} must be a string, got {recipe[key]!r}")
    number_rule(0, integer=True)(recipe.get("seed", 0), "seed")
    for name, rules in VALUE_RULES.items():
        for key, value in (recipe.get(name) or {}).items():
            if key in rules:
                rules[key](value, f"{name}.{key}")
    train = recipe.get("train") or {}
    for key in ("epochs", "batch_size"):
        if train.get(key) is None:
            raise ValueError(f"recipe train section needs {key!r} (a positive integer)")
    if float(section(recipe, "train")["warmup_epochs"]) >= int(train["epochs"]):
        raise ValueError(f"train.warmup_epochs={section(recipe, 'train')['warmup_epochs']!r} "
                         f"leaves no epoch for the cosine decay: train.epochs="
                         f"{train['epochs']!r}; give fewer warmup epochs")
    classifier = section(recipe, "classifier")
    choice_rule(*POOLINGS)(classifier["pooling"], "classifier.pooling")

    model = section(recipe, "model")
    given = [k for k in ("preset", "config") if model[k] is not None]
    if len(given) != 1:
        raise ValueError("recipe model section needs exactly one of 'preset' (a registered "
                         "preset name or a preset directory, e.g. a pretraining run's teacher/) "
                         f"and 'config' (a named configuration with random weights), got "
                         f"{recipe.get('model')!r}")
    if model["config"] is not None:
        args = model["config_args"] or {}
        if not isinstance(args, dict):
            raise ValueError(f"model.config_args must be a dict of the configuration's "
                             f"arguments, got {args!r}")
        check_keys("model.config_args", args, backbone_keys(model["config"]),
                   label=f"configuration {model['config']!r}")
    elif model["config_args"]:
        raise ValueError("model.config_args changes a named configuration (model.config); a "
                         "preset's architecture is its own")
    preprocessing = model["preprocessing"] or {}
    if not isinstance(preprocessing, dict):
        raise ValueError(f"model.preprocessing must be a dict of ImagePreprocessing fields, got "
                         f"{preprocessing!r}")
    fields = [f.name for f in dataclasses.fields(ImagePreprocessing)]
    check_keys("model.preprocessing", preprocessing, fields, label="ImagePreprocessing")
    try:
        ImagePreprocessing(**preprocessing)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.preprocessing {preprocessing}: {error}") from None

    if recipe.get("distill"):
        _validate_distill(recipe)
    data = section(recipe, "data")
    if data["source"] == "folder" and not data["path"]:
        raise ValueError('data.source="folder" needs data.path, a folder with one sub-folder '
                         "of images per class (or --data on the command line)")
    if data["source"] == "tfds" and not data["name"]:
        raise ValueError('data.source="tfds" needs data.name, a TFDS data set name (e.g. '
                         'data.name="imagenette")')
    return recipe


# --------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class LabelledData:
    """The train and held-out images of a recipe: each either numpy ``(images, labels)``
    (uint8 (N, H, W, C), int labels) or a tf.data set of (uint8 image, int label) pairs."""
    train: object
    val: object
    num_train: int | None
    num_val: int | None
    class_names: list


def labelled_data(recipe, progress=False):
    """The ``LabelledData`` of a recipe's data section (see the module docstring)."""
    data = section(recipe, "data")
    raw = {k: v for k, v in (recipe.get("data") or {}).items() if v is not None}
    seed = int(recipe.get("seed") or 0)
    if data["source"] == "shapes":
        (x, y), (xv, yv), names = shapes_split(raw, seed)
        if len(x) == 0 or len(xv) == 0:
            raise ValueError(f"data.num_images={data['num_images']} / data.num_val="
                             f"{data['num_val']} leave an empty split (the shapes are split "
                             "stratified by class)")
        return LabelledData((x, y.astype("int32")), (xv, yv.astype("int32")), len(x), len(xv),
                            list(names))
    if data["source"] == "folder":
        ds, names, size = folder_images(data["path"], data, with_labels=True, progress=progress)
        if len(names) < 2:
            raise ValueError(f"data.path={data['path']!r} has {len(names)} class folder(s); "
                             "classification needs at least 2")
        if data["val_path"]:
            val, val_names, val_size = folder_images(data["val_path"], data, with_labels=True,
                                                     progress=progress, where="data.val_path")
            if list(val_names) != list(names):
                raise ValueError(f"data.val_path={data['val_path']!r} has the classes "
                                 f"{val_names}, data.path={data['path']!r} has {names}: "
                                 "they must be the same folders")
            return LabelledData(ds, val, size, val_size, list(names))
        return _split_folder(ds, size, names, float(data["val_fraction"]), seed)
    train, size, info = tfds_images(data, data["split"], with_info=True)
    val, val_size = tfds_images(data, data["val_split"])
    feature = info.features[data["label_key"]] if data["label_key"] in info.features else None
    if feature is None or not hasattr(feature, "names"):
        raise ValueError(f"TFDS {data['name']!r} has no class label {data['label_key']!r} "
                         f"(data.label_key); its features: {sorted(info.features)}")

    def pairs(ds):
        return ds.map(lambda e: (e[data["image_key"]], e[data["label_key"]]))

    return LabelledData(pairs(train), pairs(val), size, val_size, list(feature.names))


def _split_folder(ds, size, names, val_fraction, seed):
    """A labelled folder split in two by a seeded permutation: ``val_fraction`` held out."""
    import tensorflow as tf

    if size is None:
        raise ValueError("the image folder's size is unknown; give data.val_path")
    num_val = int(round(size * val_fraction))
    if not 0 < num_val < size:
        raise ValueError(f"data.val_fraction={val_fraction} of {size} images leaves an empty "
                         "split; give data.val_path or another fraction")
    held_out = np.zeros(size, bool)
    held_out[np.random.default_rng(seed).permutation(size)[:num_val]] = True
    table = tf.constant(held_out)

    def part(keep_val):
        return (ds.enumerate().filter(lambda i, e: tf.equal(table[i], keep_val))
                .map(lambda i, e: e))

    return LabelledData(part(False), part(True), size - num_val, num_val, list(names))


def _rgb(image):
    """A uint8 / float image (H, W, 1 or 3) as float32 RGB in [0, 255]."""
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    if image.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(image)
    if image.shape[-1] is None:
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image),
                        lambda: image)
    return tf.ensure_shape(image, (None, None, 3))


def random_resized_crop(image, seed, size, scale, ratio, interpolation="bicubic",
                        flip_prob=0.5):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip of one image, stateless: the box
    is ``data.multicrop.crop_boxes`` (torchvision's rule: area in ``scale`` of the image,
    log-uniform aspect ratio in ``ratio``, 10 tries, then the centred fallback), cut at whole
    pixels and resized to ``size`` x ``size`` with ``interpolation`` (antialiased, like PIL),
    then flipped with probability ``flip_prob``.

    Args: image (H, W, 3) float32 in [0, 255]; seed [2] int64; size an int or (height,
    width); the rest Python values.
    Returns: (height, width, 3) float32 in [0, 255].
    """
    import tensorflow as tf

    from poa_keras.data.multicrop import crop_boxes

    shape = tf.shape(image)
    box = crop_boxes(seed, shape[0], shape[1], np.array([scale], np.float32), ratio)[0]
    span_h = tf.maximum(tf.cast(shape[0], tf.float32) - 1.0, 1.0)
    span_w = tf.maximum(tf.cast(shape[1], tf.float32) - 1.0, 1.0)
    top = tf.cast(tf.round(box[0] * span_h), tf.int32)
    left = tf.cast(tf.round(box[1] * span_w), tf.int32)
    height = tf.cast(tf.round(box[2] * span_h), tf.int32) - top + 1
    width = tf.cast(tf.round(box[3] * span_w), tf.int32) - left + 1
    crop = tf.image.crop_to_bounding_box(image, top, left, height, width)
    size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    out = tf.image.resize(crop, size, method=interpolation, antialias=True)
    out = tf.clip_by_value(out, 0.0, 255.0)
    coin = tf.random.stateless_uniform((), tf.stack([seed[0], seed[1] + 1]))
    return tf.cond(coin < flip_prob, lambda: tf.image.flip_left_right(out), lambda: out)


def color_jitter_factors(strength):
    """Keras RandomColorJitter arguments closest to torchvision's ColorJitter(b, c, s) (timm's
    ``color_jitter``: one strength for all three, or three): the same brightness range
    (additive in Keras: +-b of the value range, multiplicative 1 +- b in torchvision), the same
    contrast factors 1 +- c, and the same saturation multipliers 1 +- s (Keras' factor f
    multiplies the HSV saturation by f / (1 - f))."""
    b, c, s = (tuple(strength) if isinstance(strength, (tuple, list)) else (strength,) * 3)
    kwargs = {}
    if b:
        kwargs["brightness_factor"] = float(b)
    if c:
        kwargs["contrast_factor"] = float(c)
    if s:
        kwargs["saturation_factor"] = ((1.0 - s) / (2.0 - s), (1.0 + s) / (2.0 + s))
    return kwargs


def _seeds(seed, count):
    """``count`` 31-bit ints from one seed (Keras seed generators take ints)."""
    return [int(v >> 1) for v in np.random.SeedSequence(int(seed)).generate_state(count)]


def _keras_image_layers(augment, seed):
    """The per-image Keras layers of one lane: [RandAugment] and [RandomColorJitter], as the
    recipe asks (timm's rule: no colour jitter with RandAugment unless forced)."""
    import keras

    layers = []
    ra_seed, jitter_seed = _seeds(seed, 2)
    if int(augment["randaugment_ops"]) > 0:
        layers.append(keras.layers.RandAugment(
            value_range=(0, 255), num_ops=int(augment["randaugment_ops"]),
            factor=float(augment["randaugment_factor"]),
            interpolation="bilinear", seed=ra_seed))
    jitter = color_jitter_factors(augment["color_jitter"])
    if jitter and (not layers or augment["force_color_jitter"]):
        layers.append(keras.layers.RandomColorJitter(value_range=(0, 255), seed=jitter_seed,
                                                     **jitter))
    return layers


def epoch_dataset(recipe, train, epoch, steps, num_classes, image_size, mean, std):
    """The ``steps`` training batches of epoch ``epoch``: (images (B, H, W, 3) float32 of
    ``image_size`` (an int or (H, W)),
    normalised with ``mean`` / ``std`` of [0, 1] pixels; labels (B, num_classes) float32, one
    row per image summing to 1). A function of (recipe seed, epoch) only."""
    import keras
    import tensorflow as tf

    augment = section(recipe, "augment")
    batch = int(recipe["train"]["batch_size"])
    shuffle_seed, crop_seed, layer_seed, mix_seed, coin_seed = _seeds(
        epoch_seed(int(recipe.get("seed") or 0), epoch), 5)
    autotune = tf.data.AUTOTUNE
    if isinstance(train, tuple):
        images, labels = (tf.convert_to_tensor(a) for a in train)
        n = int(images.shape[0])
        ds = tf.data.Dataset.range(n).shuffle(n, seed=shuffle_seed).repeat()
        ds = ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    else:
        buffer = int(section(recipe, "data")["shuffle_buffer"])
        ds = train.shuffle(buffer, seed=shuffle_seed).repeat()

    # RandomResizedCrop and flip: stateless, one random stream value per image.
    scale = tuple(float(v) for v in augment["crop_scale"])
    ratio = tuple(float(v) for v in augment["crop_ratio"])

    def crop(element, rnd):
        image, label = element
        seed = tf.stack([rnd, tf.constant(0, tf.int64)])
        out = random_resized_crop(_rgb(image), seed, image_size, scale, ratio,
                                  augment["interpolation"], float(augment["flip_prob"]))
        return out, tf.cast(label, tf.int32)

    crops = tf.data.Dataset.random(seed=crop_seed)
    ds = tf.data.Dataset.zip((ds, crops)).map(
        tf.autograph.experimental.do_not_convert(crop), num_parallel_calls=autotune,
        deterministic=True)

    # Keras' per-image layers hold seed-generator state: each lane's layers run in order (a
    # map without parallel calls), the lanes side by side within one call.
    lanes = int(augment["lanes"])
    lane_layers = [_keras_image_layers(augment, s) for s in _seeds(layer_seed, lanes)]
    if lane_layers[0]:
        def per_image(images, labels):
            out = []
            for i, layers in enumerate(lane_layers):
                x = images[i]
                for layer in layers:
                    x = layer(x)
                out.append(tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 255.0))
            return tf.stack(out), labels

        ds = ds.batch(lanes, drop_remainder=True).map(per_image).unbatch()

    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)))
    mixers = []
    mix_seeds = _seeds(mix_seed, 2)
    if float(augment["mixup"]) > 0:
        mixers.append(keras.layers.MixUp(alpha=float(augment["mixup"]), seed=mix_seeds[0]))
    if float(augment["cutmix"]) > 0:
        alpha = float(augment["cutmix"])
        mixers.append(keras.layers.CutMix(factor=(alpha, alpha), seed=mix_seeds[1]))
    if mixers:
        mix_prob, switch_prob = float(augment["mix_prob"]), float(augment["switch_prob"])

        def mix(batch_data, rnd):
            images, labels = batch_data
            outs = [m({"images": images, "labels": labels}) for m in mixers]
            coins = tf.random.stateless_uniform((2,), tf.stack([rnd, tf.constant(0, tf.int64)]))
            chosen = outs[0]
            if len(outs) == 2:   # timm: CutMix with probability switch_prob, else MixUp
                use_cut = coins[1] < switch_prob
                chosen = {k: tf.where(use_cut, outs[1][k], outs[0][k]) for k in outs[0]}
            apply = coins[0] < mix_prob
            return (tf.where(apply, tf.cast(chosen["images"], tf.float32), images),
                    tf.where(apply, tf.cast(chosen["labels"], tf.float32), labels))

        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=coin_seed))).map(mix)

    mean = tf.constant(np.asarray(mean, np.float32))
    std = tf.constant(np.asarray(std, np.float32))
    ds = ds.map(lambda x, y: ((x / 255.0 - mean) / std, y), num_parallel_calls=autotune,
                deterministic=True)
    # The maps of the Keras layers must run one call at a time, in order: their seed
    # generators are variables. tf.data's map_parallelization parallelises a map given no
    # num_parallel_calls when it deems the function stateless; off, it never does (a
    # precaution: the variables' reads and writes are what makes these functions stateful).
    # And one iterator must read the dataset (``train_batches``): they share the variables.
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = False
    return ds.take(steps).with_options(options)


def train_batches(recipe, train, steps, start_epoch, stop_epoch, num_classes, image_size,
                  preprocessing):
    """A Python generator of the (images, labels) numpy batches of epochs [start_epoch,
    stop_epoch), ``steps`` per epoch. Each epoch's pipeline (``epoch_dataset``) is built when
    its first batch is wanted, not all of them up front: a RandAugment lane takes seconds to
    trace (on JAX much longer), and a run has hundreds of epochs. One iterator reads each
    pipeline, so every batch is a function of (seed, epoch) however the caller reads them."""
    threads = section(recipe, "data")["threads"]
    for epoch in range(start_epoch, stop_epoch):
        ds = limit_threads(epoch_dataset(recipe, train, epoch, steps, num_classes, image_size,
                                         preprocessing.mean, preprocessing.std), threads)
        yield from ds.prefetch(2).as_numpy_iterator()


def eval_dataset(val, preprocessing, num_classes, batch_size, count=None):
    """Batches of held-out (images, one-hot labels), the images preprocessed as the model's
    record says (``ImagePreprocessing``): resized and centre-cropped by its rule when it asks
    for it (``resized_size``: timm's evaluation resizes to size / crop_pct, then crops),
    rounded to whole pixel values as PIL would, then normalised (float32: the classifier
    takes them as they are). Raw images are uint8. ``count``: the number of images, when the
    dataset cannot tell (a filtered folder), so that Keras knows where it ends."""
    import tensorflow as tf

    if preprocessing.image_size is None:
        raise ValueError("the model's preprocessing keeps every image's size "
                         "(image_size=None); fine-tuning needs a fixed input size: set "
                         "model.preprocessing.image_size")
    if isinstance(val, tuple):
        images, labels = val
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype("int32")))
        height, width = images.shape[1:3]
        resample = (preprocessing.resized_size(height, width) is not None
                    or (height, width) != tuple(preprocessing.image_size))
    else:
        ds, resample = val, True
        if count is not None and int(ds.cardinality()) < 0:
            ds = ds.apply(tf.data.experimental.assert_cardinality(int(count)))
    mean = tf.constant(np.asarray(preprocessing.mean, np.float32))
    std = tf.constant(np.asarray(preprocessing.std, np.float32))

    def prepare(image, label):
        image = _eval_image(image, preprocessing) if resample else _rgb(image)
        image = (image / 255.0 - mean) / std
        return image, tf.one_hot(tf.cast(label, tf.int32), num_classes)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def _eval_image(image, preprocessing):
    """One raw image (H, W, C) resized by ``preprocessing.resized_size`` (if it asks for it)
    and centre-cropped to its size, as float32 whole pixel values in [0, 255]."""
    import tensorflow as tf

    th, tw = preprocessing.image_size

    def plan(height, width):
        size = preprocessing.resized_size(int(height), int(width))
        return np.asarray(size if size is not None else (height, width), np.int32)

    image = _rgb(image)
    shape = tf.shape(image)
    size = tf.numpy_function(plan, [shape[0], shape[1]], tf.int32, stateful=False)
    size = tf.ensure_shape(size, (2,))

    def resize():
        out = tf.image.resize(image, size, method=preprocessing.interpolation,
                              antialias=preprocessing.antialias)
        return tf.round(tf.clip_by_value(out, 0.0, 255.0))

    image = tf.cond(tf.reduce_all(tf.equal(size, shape[:2])), lambda: image, resize)
    top = tf.cast(tf.round(tf.cast(size[0] - th, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(size[1] - tw, tf.float32) / 2.0), tf.int32)
    return tf.image.crop_to_bounding_box(image, top, left, th, tw)


# ------------------------------------------------------------------------------ the classifier

def warmup_cosine(peak_lr, min_lr, total_steps, warmup_steps):
    """MAE-Lite's learning rate per step s (a Keras schedule of the optimizer's step count):
    ``peak_lr * s / W`` for s < W (linear from 0), then
    ``min_lr + (peak_lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2``, held at min_lr
    from step T on (W = warmup_steps, T = total_steps). Keras' CosineDecay with a warmup is
    exactly this rule."""
    import keras

    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps="
                         f"{total_steps})")
    alpha = float(min_lr) / float(peak_lr)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(float(peak_lr), total_steps, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, total_steps - warmup_steps, alpha=alpha, warmup_target=float(peak_lr),
        warmup_steps=warmup_steps)


def learning_rate_schedule(recipe, steps):
    """The recipe's schedule (``warmup_cosine``) for ``steps`` steps per epoch: the peak lr is
    ``train.lr`` scaled to the batch (``schedules.scaled_lr``: MAE-Lite's lr * batch / 256 with
    lr_scaling="linear", reference_batch=256)."""
    from poa_keras.methods.schedules import scaled_lr

    train = section(recipe, "train")
    peak = scaled_lr(float(train["lr"]), int(train["batch_size"]), train["lr_scaling"],
                     train["reference_batch"])
    total = int(train["epochs"]) * int(steps)
    warmup = int(round(float(train["warmup_epochs"]) * int(steps)))
    return warmup_cosine(peak, float(train["min_lr"]), total, warmup)


def check_model_source(recipe):
    """A FileNotFoundError, before anything is built, when ``model.preset`` is neither a preset
    directory nor a registered preset (a pretraining run that has not run yet), saying how to
    give one."""
    from poa_keras.files import recover_directory
    from poa_keras.presets import list_presets

    preset = section(recipe, "model")["preset"]
    if preset is None:
        return
    recover_directory(preset)   # a save killed between its two renames left the old one aside
    if not os.path.isdir(preset) and preset not in list_presets():
        raise FileNotFoundError(
            f"model.preset={preset!r} is neither a preset directory nor a registered preset "
            f"({sorted(list_presets())}). Give one with --override=model.preset=DIR "
            "(finetune(..., overrides=['model.preset=DIR'])), e.g. the teacher/ of a "
            "pretraining run (poa-keras pretrain --recipe=demo --output=runs/demo writes "
            "runs/demo/teacher)")


def model_backbone(recipe):
    """The recipe's backbone: ``model.config`` (random weights, seeded by the recipe's seed)
    or ``model.preset``, at ``model.subnet`` (extracted), with ``model.preprocessing`` applied
    to its record."""
    import keras

    from poa_keras.backbones import Backbone, from_config_name

    model = section(recipe, "model")
    keras.utils.set_random_seed(int(recipe.get("seed") or 0))
    subnet = model["subnet"]
    by_fields = isinstance(subnet, dict)
    if model["config"] is not None:
        backbone = from_config_name(model["config"], **(model["config_args"] or {}))
        if subnet is not None:
            spec = (backbone.subnet_from_kwargs(**subnet) if by_fields
                    else backbone.resolve_subnet(subnet))
            backbone = backbone.extract(spec)
    else:
        check_model_source(recipe)
        size = subnet if by_fields else {"subnet": subnet}
        backbone = Backbone.from_preset(model["preset"],
                                        load_weights=bool(model["load_weights"]), **size)
    if model["preprocessing"]:
        backbone.preprocessing = dataclasses.replace(backbone.preprocessing,
                                                     **model["preprocessing"])
    return backbone


def build_classifier(recipe, num_classes, steps):
    """The compiled ImageClassifier of a recipe: the backbone (``model_backbone``), the head
    (``classifier`` section), AdamW with the warmup-cosine schedule, no weight decay on
    ``no_weight_decay`` variables, layer-wise lr decay through
    ``ImageClassifier.layer_decay_optimizer``, gradient clipping, and softmax cross-entropy on
    soft labels (MixUp / CutMix) with label smoothing; top-1 as ``accuracy``."""
    import keras

    classifier = recipe_classifier(recipe, model_backbone(recipe), num_classes)
    train, opt = section(recipe, "train"), section(recipe, "optimizer")
    inner = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(recipe, steps),
        weight_decay=float(train["weight_decay"]), beta_1=float(opt["beta_1"]),
        beta_2=float(opt["beta_2"]), epsilon=float(opt["epsilon"]),
        global_clipnorm=None if train["clip_grad"] is None else float(train["clip_grad"]))
    inner.exclude_from_weight_decay(
        var_list=[v for v in classifier.trainable_variables if no_weight_decay(v)])
    optimizer = inner
    if (float(train["layer_decay"]), float(train["patch_embed_lr_mult"])) != (1.0, 1.0):
        optimizer = classifier.layer_decay_optimizer(
            inner, layer_decay=float(train["layer_decay"]),
            patch_embed_lr_mult=float(train["patch_embed_lr_mult"]))
    compile_for_labels(classifier, recipe, optimizer)
    return classifier


def recipe_classifier(recipe, backbone, num_classes):
    """The ``ImageClassifier`` of ``backbone`` with the recipe's ``classifier`` head."""
    from poa_keras.classifier import ImageClassifier

    head = section(recipe, "classifier")
    return ImageClassifier(backbone, num_classes, pooling=head["pooling"],
                           dropout=float(head["dropout"]))


def compile_for_labels(classifier, recipe, optimizer="auto"):
    """Compiles ``classifier`` with softmax cross-entropy on (soft) one-hot labels, with the
    recipe's label smoothing, and top-1 as ``accuracy`` (the held-out evaluation's)."""
    import keras

    classifier.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True,
            label_smoothing=float(section(recipe, "train")["label_smoothing"])),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


# ------------------------------------------------------------------- distillation (TinyViT)

def _validate_distill(recipe):
    """The ``distill`` section's consistency: no teacher for hard labels, an augmentation the
    store can replay, no fine-tuning-only training keys (the teacher a run needs:
    ``check_distill_sources``, at run time)."""
    distill = section(recipe, "distill")
    targets = distill["targets"]
    sources = [k for k in ("teacher", "teacher_recipe") if distill[k]]
    if targets == "labels" and sources:
        raise ValueError(f"distill.targets='labels' trains on the data's labels (the hard-label "
                         f"arm); it takes no teacher, got distill.{sources[0]}")
    augment = section(recipe, "augment")
    if targets == "labels" and (augment["mixup"] or augment["cutmix"]):
        raise ValueError("distill.targets='labels' trains on one-hot labels, which the replayed "
                         "mixup / cutmix would have to mix too (not built): set "
                         "augment.mixup=0 and augment.cutmix=0")
    unreplayable = [k for k in ("randaugment_ops",) if augment[k]]
    if unreplayable:
        raise ValueError(
            "distillation replays its augmentation from stored seeds (random resized crop, "
            "flip, colour jitter, mixup / cutmix: data.softlabels.ReplayAugment); "
            + ", ".join(f"augment.{k}={augment[k]!r}" for k in unreplayable)
            + " cannot be replayed: set " + ", ".join(f"augment.{k}=0" for k in unreplayable))
    if augment["interpolation"] != "bilinear":
        raise ValueError(f"augment.interpolation={augment['interpolation']!r}: the replayed crop "
                         "is bilinear; set augment.interpolation='bilinear'")
    jitter = augment["color_jitter"]
    if isinstance(jitter, (list, tuple)) and len(set(jitter)) != 1:
        raise ValueError(f"augment.color_jitter={jitter!r}: the replayed jitter has one strength "
                         "for brightness, contrast and saturation; give one number")
    train = section(recipe, "train")
    for key, neutral in (("layer_decay", 1.0), ("patch_embed_lr_mult", 1.0),
                         ("label_smoothing", 0.0)):
        if float(train[key]) != neutral:
            raise ValueError(f"train.{key}={train[key]!r}: TinyViT's distillation has none; set "
                             f"train.{key}={neutral}")


def check_distill_sources(recipe):
    """Before anything is built: a distillation recipe names a teacher exactly when its targets
    need one (a shipped recipe may leave it to ``--teacher``)."""
    distill = section(recipe, "distill")
    targets = distill["targets"]
    sources = [k for k in ("teacher", "teacher_recipe") if distill[k]]
    if targets == "stored" and not sources and distill["store"]:
        return   # an existing store serves the student without its teacher
    if targets != "labels" and len(sources) != 1:
        raise ValueError(f"distill.targets={targets!r} needs exactly one of distill.teacher (an "
                         "ImageClassifier preset directory, a registered preset name or a "
                         ".keras file; the CLI's --teacher) and distill.teacher_recipe (a "
                         "fine-tuning recipe, run first in <output>/teacher_run); with "
                         "targets 'stored', distill.store alone reads a store written before; "
                         f"got { {k: distill[k] for k in ('teacher', 'teacher_recipe')} }")


def replay_config(recipe, image_size):
    """The ``ReplayAugment`` of a distillation recipe's ``augment`` section at ``image_size``."""
    from poa_keras.data.softlabels import ReplayAugment

    augment = section(recipe, "augment")
    jitter = augment["color_jitter"]
    jitter = jitter[0] if isinstance(jitter, (list, tuple)) else jitter
    return ReplayAugment(output_size=int(image_size), scale=tuple(augment["crop_scale"]),
                         ratio=tuple(augment["crop_ratio"]), flip_prob=augment["flip_prob"],
                         jitter=float(jitter), mixup=augment["mixup"], cutmix=augment["cutmix"],
                         mix_prob=augment["mix_prob"], switch_prob=augment["switch_prob"])


def in_memory_images(split, size, count=None, progress=False):
    """(uint8 images (N, size, size, 3), int32 labels): a numpy split as it is; a tf.data one
    (folder, TFDS) decoded, its shorter side resized to ``size`` (antialiased bilinear) and
    centre-cropped. The soft-label store keeps the images in memory: N x size^2 x 3 bytes."""
    import tensorflow as tf

    if isinstance(split, tuple):
        return split[0], np.asarray(split[1], np.int32)

    def fit(image, label):
        image = _rgb(image)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        new = tf.cast(tf.math.ceil(shape * (size / tf.reduce_min(shape))), tf.int32)
        image = tf.image.resize(image, new, antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, size, size)
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8), label

    import keras

    bar = keras.utils.Progbar(count, verbose=1) if progress else None
    images, labels = [], []
    for x, y in split.map(fit, num_parallel_calls=tf.data.AUTOTUNE).batch(256):
        images.append(x.numpy())
        labels.append(y.numpy())
        if bar is not None:
            bar.add(len(x))
    if not images:
        raise ValueError("the training split holds no images")
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_teacher(teacher):
    """The teacher model named by ``distill.teacher``: a .keras file (``keras.saving.load_model``
    with safe_mode: no code is run) or an ``ImageClassifier`` preset (a directory or a
    registered name)."""
    import keras

    from poa_keras.classifier import ImageClassifier
    from poa_keras.presets import list_presets

    if os.fspath(teacher).endswith(".keras"):
        if not os.path.isfile(teacher):
            raise FileNotFoundError(f"distill.teacher={teacher!r}: no such .keras file")
        return keras.saving.load_model(teacher, compile=False, safe_mode=True)
    if not os.path.isdir(teacher) and teacher not in list_presets():
        raise FileNotFoundError(
            f"distill.teacher={teacher!r} is neither a .keras file, an ImageClassifier preset "
            f"directory (e.g. a fine-tuning run's classifier/) nor a registered preset "
            f"({sorted(list_presets())})")
    return ImageClassifier.from_preset(teacher)


def teacher_name(recipe):
    """The teacher's name in a store's header: ``distill.teacher`` as given, or the teacher
    recipe's name; None without either."""
    distill = section(recipe, "distill")
    if distill["teacher"]:
        return distill["teacher"]
    if distill["teacher_recipe"]:
        teacher_recipe = load_finetune_recipe(distill["teacher_recipe"])
        return teacher_recipe.get("name") or os.path.basename(str(distill["teacher_recipe"]))
    return None


def distill_teacher(recipe, output_dir, verbose="auto"):
    """(teacher model, its name for the store's header) of a distillation recipe: loaded from
    ``distill.teacher``, or the classifier of ``distill.teacher_recipe``, which is run (or
    resumed, or found finished) in ``<output_dir>/teacher_run`` first; None for hard labels."""
    from poa_keras.classifier import ImageClassifier

    distill = section(recipe, "distill")
    if distill["teacher"]:
        return load_teacher(distill["teacher"]), distill["teacher"]
    if not distill["teacher_recipe"]:
        return None, None
    teacher_recipe = load_finetune_recipe(distill["teacher_recipe"])
    if teacher_recipe.get("distill"):
        raise ValueError(f"distill.teacher_recipe={distill['teacher_recipe']!r} distills from a "
                         "teacher itself; give a recipe that trains on labels")
    run_dir = os.path.join(output_dir, "teacher_run")
    preset = os.path.join(run_dir, "classifier")
    if not os.path.isdir(preset):
        finetune(teacher_recipe, run_dir, verbose=verbose)
    return ImageClassifier.from_preset(preset), teacher_name(recipe)


def _input_size(backbone):
    """The side of a backbone's input: its preprocessing record's size, else its image_size."""
    record = backbone.preprocessing
    return int(record.image_size[0]) if record is not None and record.image_size \
        else int(backbone.image_size)


def augmented_size(recipe):
    """The side of the augmented images a recipe trains at: ``augment.image_size``, else its
    model's input size (read without building the network)."""
    size = section(recipe, "augment")["image_size"]
    if size:
        return int(size)
    from poa_keras.backbones import BACKBONE_CLASSES, Backbone

    model = section(recipe, "model")
    if model["config"] is not None:
        cls = next(c for c in BACKBONE_CLASSES.values() if model["config"] in c.configs)
        return _input_size(cls.unbuilt(config_name=model["config"],
                                       **(model["config_args"] or {})))
    check_model_source(recipe)
    return _input_size(Backbone.from_preset(model["preset"], load_weights=False))


def write_recipe_store(recipe, teacher, images, directory, teacher_name=None, image_size=None,
                       verbose=1):
    """Pass 1 of a distillation recipe: the soft-label store of ``teacher`` over ``images``
    (``data.softlabels.write_store``: ``distill.store_epochs`` (default: ``train.epochs``)
    epochs, ``distill.topk``, the ``augment`` section's replayable augmentation at
    ``image_size`` (default: ``augmented_size``, the student's), the recipe's seed);
    resumable."""
    from poa_keras.data.softlabels import write_store

    distill = section(recipe, "distill")
    if image_size is None:
        image_size = augmented_size(recipe)
    return write_store(teacher, images, directory,
                       epochs=distill["store_epochs"] or int(recipe["train"]["epochs"]),
                       topk=int(distill["topk"]), config=replay_config(recipe, image_size),
                       seed=int(recipe.get("seed") or 0),
                       batch_size=int(distill["teacher_batch_size"]), teacher_name=teacher_name,
                       verbose=verbose)


def distill_batches(recipe, images, labels, config, store, steps, start_epoch, stop_epoch):
    """The numpy batches of epochs [start_epoch, stop_epoch): epoch e replays store epoch
    e mod ``store_epochs`` (the stored seeds; without a store, the seeds a store would hold),
    in a permutation seeded by (seed, e), with the stored top-K (a store) and the labels."""
    from poa_keras.data.softlabels import epoch_partners, epoch_seeds, replay_dataset

    distill = section(recipe, "distill")
    seed = int(recipe.get("seed") or 0)
    store_epochs = distill["store_epochs"] or int(recipe["train"]["epochs"])
    batch = int(recipe["train"]["batch_size"])
    threads = section(recipe, "data")["threads"]
    for epoch in range(start_epoch, stop_epoch):
        shuffle = epoch_seed(seed, epoch)
        shard = epoch % store_epochs   # a store may hold more epochs than the recipe reads
        if store is not None:
            ds = store.dataset(shard, batch, shuffle_seed=shuffle, drop_remainder=True,
                               labels=labels)
        else:
            ds = replay_dataset(images, epoch_seeds(seed, shard, len(images)), config, batch,
                                shuffle_seed=shuffle, drop_remainder=True, labels=labels,
                                partners=epoch_partners(seed, shard, len(images)))
        yield from limit_threads(ds.take(steps), threads).as_numpy_iterator()


def build_distillation(recipe, classifier, steps, teacher, store=None):
    """The compiled ``methods.distill.SoftLabelDistillation`` of a recipe around ``classifier``
    (AdamW; the ``train`` section's schedule, weight decay and clipping)."""
    import keras

    from poa_keras.methods.distill import SoftLabelDistillation

    train, opt = section(recipe, "train"), section(recipe, "optimizer")
    targets = section(recipe, "distill")["targets"]
    keys = ("epochs", "batch_size", "lr", "lr_scaling", "reference_batch", "min_lr",
            "warmup_epochs", "weight_decay", "clip_grad")
    trainer = SoftLabelDistillation(
        classifier, recipe=dict({k: train[k] for k in keys}, steps_per_epoch=int(steps)),
        teacher=teacher if targets.startswith("teacher") else None,
        topk=int(section(recipe, "distill")["topk"]) if targets == "teacher" else None,
        targets={"teacher_dense": "teacher"}.get(targets, targets), store=store)
    trainer.compile(optimizer=keras.optimizers.AdamW(
        learning_rate=trainer.learning_rate_at(0), weight_decay=float(train["weight_decay"]),
        beta_1=float(opt["beta_1"]), beta_2=float(opt["beta_2"]),
        epsilon=float(opt["epsilon"])))
    return trainer


# ----------------------------------------------------------------------------------------- run

def _finished_store(recipe, directory, images, config):
    """The complete store in ``directory`` written for this recipe (images, K, augmentation,
    seed, epochs; the teacher's name: ``distill.teacher``'s when given, else, for the run's own
    store, the teacher recipe's), or None when there is none yet or it is incomplete (a missing
    shard, fewer epochs) and a teacher can complete it. A student on a finished store never
    loads its teacher."""
    from poa_keras.data.softlabels import HEADER, IncompleteStore, open_store

    distill = section(recipe, "distill")
    if not os.path.isfile(os.path.join(directory, HEADER)):
        if distill["teacher"] or distill["teacher_recipe"]:
            return None
        raise FileNotFoundError(f"distill.store={directory!r} holds no soft-label store; write "
                                "one with poa-keras distill-store, or give a teacher")
    expect = {"topk": int(distill["topk"]), "config": config,
              "seed": int(recipe.get("seed") or 0),
              "epochs": distill["store_epochs"] or int(recipe["train"]["epochs"])}
    # a store named explicitly (distill.store) is the user's choice: its teacher's name is
    # compared only with a distill.teacher given; the run's own store with its teacher recipe's
    name = distill["teacher"] if distill["store"] else teacher_name(recipe)
    if name is not None:
        expect["teacher"] = name
    try:
        return open_store(directory, images, expect=expect)
    except IncompleteStore:
        if distill["teacher"] or distill["teacher_recipe"]:
            return None   # a missing or cut shard: the teacher writes it (write_store resumes)
        raise


def _distillation_run(recipe, data, output_dir, verbose, progress):
    """The parts of a distillation run (the ``distill`` section): the student's backbone, the
    training images in memory, the teacher (its recipe run first), the store (targets
    "stored"), the classifier with the teacher's classes and its trainer."""
    backbone = model_backbone(recipe)
    image_size = section(recipe, "augment")["image_size"] or _input_size(backbone)
    distill = section(recipe, "distill")
    teacher = teacher_name = None
    if distill["teacher"] and distill["targets"] != "labels":   # a bad file fails before the
        teacher, teacher_name = distill_teacher(recipe, output_dir, verbose)   # images decode
    images, labels = in_memory_images(data.train, int(section(recipe, "data")["image_size"]),
                                      count=data.num_train, progress=progress)
    config = replay_config(recipe, image_size)
    store = None
    store_dir = distill["store"] or os.path.join(output_dir, "store")
    if distill["targets"] == "stored":
        store = _finished_store(recipe, store_dir, images, config)
    if store is None and teacher is None and distill["targets"] != "labels":
        teacher, teacher_name = distill_teacher(recipe, output_dir, verbose)
    if teacher is not None and distill["targets"] != "stored":
        from poa_keras.data.softlabels import check_teacher

        check_teacher(teacher, images, config, int(distill["topk"]),
                      seed=int(recipe.get("seed") or 0))   # logits, and K <= its classes
    if distill["targets"] == "stored" and store is None:
        store = write_recipe_store(recipe, teacher, images, store_dir, teacher_name=teacher_name,
                                   image_size=image_size,
                                   verbose=0 if not progress else
                                   (1 if verbose == "auto" else int(verbose)))
    if store is not None:
        num_classes = store.num_classes
    elif teacher is not None:
        from poa_keras.methods.distill import num_classes_of

        num_classes = num_classes_of(teacher, "teacher")
    else:
        num_classes = section(recipe, "classifier")["num_classes"] or len(data.class_names)
    given = section(recipe, "classifier")["num_classes"]
    if given is not None and given != num_classes:
        raise ValueError(f"classifier.num_classes={given}: the student learns the teacher's "
                         f"{num_classes} classes; leave it out")
    if distill["targets"] == "labels" and int(labels.max()) >= num_classes:
        raise ValueError(f"the data has labels up to {int(labels.max())}, the classifier "
                         f"{num_classes} classes")
    steps = steps_per_epoch(recipe, len(images))
    full = len(images) // int(recipe["train"]["batch_size"])
    if steps > full:
        raise ValueError(f"data.steps_per_epoch={steps}: a replayed epoch of {len(images)} "
                         f"images holds {full} full batches of {recipe['train']['batch_size']}; "
                         f"give at most {full} (each epoch replays its own stored epoch)")
    import keras

    # the head's initialisation: from the seed alone, whether a teacher was built or not
    keras.utils.set_random_seed(int(np.random.SeedSequence(
        [int(recipe.get("seed") or 0), 1]).generate_state(1)[0] % 2 ** 31))
    classifier = recipe_classifier(recipe, backbone, num_classes)
    compile_for_labels(classifier, recipe)
    trainer = build_distillation(recipe, classifier, steps, teacher, store)
    # labels ride along for the accuracy log only when they index the teacher's classes
    keep_labels = num_classes == len(data.class_names)
    if store is not None:
        identity = store.header["teacher_fingerprint"]
    elif teacher is not None:
        from poa_keras.data.softlabels import teacher_fingerprint

        identity = teacher_fingerprint(teacher)
    else:
        identity = None
    return {"trainer": trainer, "classifier": classifier, "num_classes": num_classes,
            "teacher_fingerprint": identity,
            "steps": steps, "images": images, "labels": labels if keep_labels else None,
            "config": config, "store": store}


@dataclasses.dataclass
class FinetuneResult:
    classifier: object
    history: list            # one dict of logs per finished epoch (all epochs of the run)
    top1: float | None       # top-1 of the classifier on the held-out split (None: a
                             # distilled classifier whose classes are not the data's)
    class_names: list
    output_dir: str
    resumed_from: str | None
    preset_dir: str | None   # classifier/, written after the recipe's last epoch


def _check_resume(output_dir, saved_recipe, recipe, epochs_done):
    changes = recipe_changes(saved_recipe, recipe)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    if refused:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"{output_dir} holds a fine-tuning run of another recipe (keys that "
                         f"differ: {listed}); use a new output directory (a resumed run may "
                         f"change only {list(RESUMABLE_KEYS)})")
    if int(recipe["train"]["epochs"]) < epochs_done:
        raise ValueError(f"train.epochs={recipe['train']['epochs']}: {output_dir} has already "
                         f"run {epochs_done} epochs")


def finetune(recipe, output_dir, *, overrides=(), resume=True, verbose="auto", callbacks=(),
             epochs=None, compilation_cache="auto"):
    """Runs (or resumes) a fine-tuning recipe; returns a FinetuneResult.

    Args:
        recipe: a shipped fine-tuning recipe name, a .py path or a dict (module docstring).
        output_dir: the run directory (checkpoints, log.csv, recipe.json, classifier/,
            result.json).
        overrides: "section.key=value" strings applied to the recipe.
        resume: continue from the latest checkpoint in output_dir if there is one (its recipe
            must be this one, but for ``RESUMABLE_KEYS``); False refuses a directory that
            already holds checkpoints.
        verbose: Keras fit verbosity ("auto", 0, 1, 2).
        callbacks: extra Keras callbacks.
        epochs: stop after this many epochs of the recipe (the schedule keeps the recipe's
            length; a later call resumes).
        compilation_cache: JAX's persistent compilation cache (see
            ``pretrain.compilation_cache_dir``); ignored on other backends.

    Raises:
        NonFiniteLoss: the loss became NaN/inf, or (``NonFiniteState``) the weights did; the
            run stopped, the last good checkpoint kept.
    """
    recipe = load_finetune_recipe(recipe, overrides)
    check_model_source(recipe)
    if recipe.get("distill"):
        check_distill_sources(recipe)
    output_dir = os.fspath(output_dir)
    checkpointing = section(recipe, "checkpoint")
    manager, latest = open_checkpoints(output_dir, checkpointing, resume)
    if latest is not None:   # checked before the data and the model are made
        saved = manager.read_state(latest)
        _check_resume(output_dir, saved.get("recipe"), recipe, int(saved.get("epoch", 0)))

    enable_compilation_cache(compilation_cache_dir(compilation_cache, output_dir))
    progress = verbose not in (0, "0")
    data = labelled_data(recipe, progress=progress)
    batch = int(recipe["train"]["batch_size"])
    total_epochs = int(recipe["train"]["epochs"])
    state = {"recipe": recipe}
    if recipe.get("distill"):
        run = _distillation_run(recipe, data, output_dir, verbose, progress)
        model, num_classes, steps = run["trainer"], run["num_classes"], run["steps"]
        classifier = run["classifier"]
        # the teacher behind the targets (the store's, or the online one): a resumed run goes
        # on with the one it started with
        state["teacher_fingerprint"] = run["teacher_fingerprint"]
        if latest is not None:
            before = manager.read_state(latest).get("teacher_fingerprint")
            if before is not None and before != run["teacher_fingerprint"]:
                raise ValueError(f"{output_dir} was trained on the soft labels of another teacher "
                                 f"(weights sha256 {before[:12]}..., now "
                                 f"{str(run['teacher_fingerprint'])[:12]}...); use a new "
                                 "output directory")
    else:
        num_classes = section(recipe, "classifier")["num_classes"] or len(data.class_names)
        if num_classes < len(data.class_names):
            raise ValueError(f"classifier.num_classes={num_classes} is less than the data's "
                             f"{len(data.class_names)} classes")
        steps = steps_per_epoch(recipe, data.num_train)
        model = classifier = build_classifier(recipe, num_classes, steps)
    preprocessing = classifier.preprocessing
    image_size = section(recipe, "augment")["image_size"] or preprocessing.image_size or int(
        classifier.backbone.image_size)
    # top-1 on the held-out labels: the classifier's classes must be the data's (a teacher of
    # other classes, e.g. ImageNet-22k on 1k data, leaves it out)
    scored = num_classes == len(data.class_names) or not recipe.get("distill")
    val = eval_dataset(data.val, preprocessing, num_classes,
                       section(recipe, "data")["val_batch_size"] or batch, count=data.num_val)

    # Keras builds the compiled loss and metrics at their first use, and a checkpoint holds
    # the metrics' variables: one held-out batch builds them now (its test program serves
    # validation), so that fit does not build them from a peek at the training batches.
    classifier.evaluate(val.take(1), verbose=0)
    history, start_epoch = [], 0
    if latest is not None:
        state = manager.restore(model, latest)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    os.makedirs(output_dir, exist_ok=True)   # only now: a bad recipe leaves no empty directory
    atomic_write_json(os.path.join(output_dir, "recipe.json"), recipe, indent=1, default=list)

    stop_epoch = total_epochs if epochs is None else min(total_epochs, start_epoch + int(epochs))
    if start_epoch < stop_epoch:
        if recipe.get("distill"):
            stream = distill_batches(recipe, run["images"], run["labels"], run["config"],
                                     run["store"], steps, start_epoch, stop_epoch)
            fit_kwargs = {}
        else:
            stream = train_batches(recipe, data.train, steps, start_epoch, stop_epoch,
                                   num_classes, image_size, preprocessing)
            fit_kwargs = {"validation_data": val}
        import warnings

        with warnings.catch_warnings():
            # a ViT's mask token (iBOT pretraining only) gets no gradient here: expected
            warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
            fit_epochs(model, stream, output_dir=output_dir, manager=manager, steps=steps,
                       start_epoch=start_epoch, stop_epoch=stop_epoch, history=history,
                       state=state, every_epochs=checkpointing["every_epochs"],
                       advice=("Lower train.lr or raise train.warmup_epochs and run the recipe "
                               "in a new output directory; or check the data for NaN values."),
                       verbose=verbose, callbacks=callbacks, **fit_kwargs)
    top1 = (float(classifier.evaluate(val, verbose=0, return_dict=True)["accuracy"]) if scored
            else None)
    preset_dir = None
    if stop_epoch == total_epochs:
        preset_dir = os.path.join(output_dir, "classifier")
        classifier.save_to_preset(preset_dir)
        atomic_write_json(os.path.join(output_dir, "result.json"), {
            "top1": top1, "num_val": data.num_val, "class_names": data.class_names,
            "epochs": total_epochs, "steps_per_epoch": steps, "history": history})
    return FinetuneResult(classifier=classifier, history=history, top1=top1,
                          class_names=data.class_names, output_dir=output_dir,
                          resumed_from=latest, preset_dir=preset_dir)


__all__ = ["DEFAULTS", "FinetuneResult", "LabelledData", "SECTIONS", "build_classifier",
           "check_model_source", "color_jitter_factors", "epoch_dataset", "eval_dataset",
           "finetune", "labelled_data", "learning_rate_schedule", "load_finetune_recipe",
           "model_backbone", "no_weight_decay", "random_resized_crop", "recipe_names",
           "section", "train_batches", "validate_finetune_recipe", "warmup_cosine"]

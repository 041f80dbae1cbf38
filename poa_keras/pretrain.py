"""Running a pretraining recipe end to end: data, trainer, checkpoints, resume, the teacher.

    from poa_keras.pretrain import load_recipe, pretrain
    result = pretrain("demo", "runs/demo")        # a recipe name, a .py file or a dict
    result.teacher                                # the EMA teacher backbone (an ElasticViT)
                                                  # (SimSiam/SSQL: the trained backbone)

A recipe is a Python file in recipes/ (shipped as ``poa_keras.recipes``) defining ``RECIPE``, a
dict with these sections (see recipes/demo.py for a commented example; fine-tuning recipes
define ``FINETUNE_RECIPE`` and run with poa_keras/finetune.py, and each runner refuses the other
kind):

* ``method``: "poa", "dino" (teacher/student, EMA teacher), "simsiam" or "ssql" (two views, no
  teacher: methods/simsiam.py, methods/ssql.py);
* ``backbone``: ``config`` (a named backbone configuration of any family, see
  ``poa_keras.backbones.config_names()``) plus overrides of it;
* ``head``: arguments of the projection head(s) (``out_dims`` for POA's several heads,
  ``out_dim`` for one DINOHead; SimSiam / SSQL: ``projector`` and ``predictor``, dicts of the
  arguments of ``SimSiamProjector`` and ``SimSiamPredictor``);
* ``data``: ``source`` = "shapes" (the embedded data set: ``num_images``, ``image_size``,
  ``seed``, ``palette``), "folder" (``path``), or "tfds" (``name``, ``split``, ``data_dir``), and the
  multi-crop settings of ``multicrop_dataset`` (``global_size``, ``local_size``,
  ``num_local``, ``global_scale``, ``local_scale``, ...); ``steps_per_epoch`` when the data
  set size is unknown; ``threads`` (a private tf.data thread pool of that size; default: tf.data's
  own pools). SimSiam / SSQL train on the two global views only (``num_local`` is 0) and their
  augmentation defaults are SSQL's (``TWO_VIEW_DATA_DEFAULTS``: crop scale (0.2, 1), jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, flip, blur p 0.5 on both views, no solarisation)
  where DINO's are the pipeline's;
* ``optimizer``: ``name`` "adamw" (the default for poa and dino: ``beta_1``, ``beta_2``,
  ``epsilon``) or "sgd" (the default for simsiam and ssql: ``momentum``, 0.9, ``nesterov``);
* ``train``: the trainer's recipe (schedules and method keys: ``epochs``, ``batch_size``,
  ``lr``, ..., see ``Schedules.from_recipe``, ``POA_RECIPE``, ``DINO_RECIPE``);
* ``checkpoint``: ``every_epochs``, ``keep``;
* ``seed``.

One Keras epoch of ``fit`` is one recipe epoch (``steps_per_epoch`` = images // batch size).
The data of epoch e is the multi-crop pipeline seeded with (seed, e), so a resumed run sees
exactly the batches the uninterrupted run would have seen. A run directory holds
``checkpoints/`` (see methods/checkpoint.py), ``log.csv`` (Keras' CSVLogger, one row per
epoch), ``recipe.json`` and, at the end, ``teacher/`` (the EMA teacher as a preset, ready for
``Backbone.from_preset(dir, width=..., depth=...)``; SimSiam and SSQL have no EMA teacher: there
``teacher/`` holds the trained backbone of the encoder). Running ``pretrain`` again on the same
directory resumes from the latest checkpoint (``resume=True``) with the same step count.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import numbers
import os
import pkgutil
from pathlib import Path

import numpy as np

from poa_keras.files import atomic_write_json

RECIPE_SECTIONS = ("name", "description", "method", "backbone", "head", "data", "optimizer",
                   "train", "checkpoint", "seed", "distill")
METHODS = ("poa", "dino", "simsiam", "ssql", "mae")
TWO_VIEW_METHODS = ("simsiam", "ssql")     # two global views, no teacher, SGD by default
OPTIMIZERS = {"adamw": ("beta_1", "beta_2", "epsilon"), "sgd": ("momentum", "nesterov")}
# SSQL's augmentation (REFERENCE.md §5; SimSiam's ImageNet one), the defaults of the two-view
# methods' data section where the pipeline's own defaults are DINO's: both views alike.
TWO_VIEW_DATA_DEFAULTS = dict(
    num_local=0, global_scale=(0.2, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8,
    grayscale_prob=0.2, flip_prob=0.5, blur_prob=(0.5, 0.5, 0.0), blur_sigma=(0.1, 2.0),
    solarize_prob=(0.0, 0.0, 0.0))
# MAE's augmentation (REFERENCE.md §3, MAE-Lite): ONE view, RandomResizedCrop (0.08, 1) and a
# flip, nothing photometric.
MAE_DATA_DEFAULTS = dict(
    num_global=1, num_local=0, global_scale=(0.08, 1.0), flip_prob=0.5,
    color_jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=0.0, grayscale_prob=0.0,
    blur_prob=(0.0, 0.0, 0.0), solarize_prob=(0.0, 0.0, 0.0))
# The ``distill`` section of an MAE recipe (MAE-Lite's attention distillation): the frozen
# teacher, a preset (``teacher``: a name or a directory) or a recipe trained first into
# <output_dir>/distill_teacher (``teacher_recipe``: a name or a .py file); the loss weight and
# blocks are train keys (distill_weight, distill_blocks, teacher_blocks).
DISTILL_KEYS = ("teacher", "teacher_recipe")
DATA_SOURCES = ("shapes", "folder", "tfds")
BAD_IMAGE_CHOICES = ("error", "skip")   # data.on_bad_image (images_from_directory)
_MULTICROP_KEYS = ("global_size", "local_size", "num_global", "num_local", "global_scale", "local_scale",
                   "normalize", "shuffle_buffer", "ratio", "supersample", "flip_prob",
                   "color_jitter", "jitter_prob", "grayscale_prob", "blur_prob", "blur_sigma",
                   "solarize_prob", "masks", "mask_patch_size", "mask_probability", "mask_ratio")
# The data section: the source's keys (shapes, folder, tfds), the epoch length, the pipeline's
# threads and the multi-crop settings (passed to multicrop_dataset).
DATA_KEYS = ("source", "num_images", "num_val", "image_size", "seed", "palette", "path",
             "on_bad_image", "name", "split", "data_dir", "image_key", "steps_per_epoch",
             "threads") + _MULTICROP_KEYS


# ------------------------------------------------------------------------------------ recipes

# A recipe file defines one dict, whose name says the kind of recipe: pretraining recipes (this
# module) define RECIPE, fine-tuning recipes (poa_keras/finetune.py) FINETUNE_RECIPE. Each kind
# is refused by the other runner, with a message naming the command that runs it.
RECIPE_VARIABLES = {"pretrain": "RECIPE", "finetune": "FINETUNE_RECIPE"}
_RECIPE_RUNNERS = {"pretrain": "poa-keras pretrain --recipe=... (poa_keras.pretrain.pretrain)",
                   "finetune": "poa-keras finetune --recipe=... (poa_keras.finetune.finetune)"}


def recipes_dir():
    """The shipped recipes: the installed ``poa_keras.recipes`` package, or the top-level
    recipes/ folder of a source checkout (where ``python -m poa_keras.cli`` imports the package
    from the checkout, which has no poa_keras/recipes)."""
    try:
        import poa_keras.recipes as package

        return list(package.__path__)[0]
    except ModuleNotFoundError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "recipes")


def recipe_kind(path):
    """The kind of the recipe file at ``path`` ("pretrain" or "finetune"), read from the name of
    the dict it assigns at the top level (``RECIPE_VARIABLES``) without running it; None when it
    assigns neither."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return next((kind for kind, variable in RECIPE_VARIABLES.items() if variable in names), None)


def recipe_names(kind="pretrain"):
    """Names of the recipes of one kind ("pretrain" or "finetune") shipped in
    ``poa_keras.recipes``."""
    directory = recipes_dir()
    return sorted(m.name for m in pkgutil.iter_modules([directory])
                  if not m.name.startswith("_")
                  and recipe_kind(os.path.join(directory, f"{m.name}.py")) == kind)


def wrong_kind_message(what, kind):
    """The error text for ``what`` (a recipe name or file), a recipe of the other kind than
    ``kind``, the kind the caller runs: which kind it is and the command that runs it."""
    other = next(k for k in RECIPE_VARIABLES if k != kind)
    label = {"pretrain": "pretraining", "finetune": "fine-tuning"}
    return (f"{what} is a {label[other]} recipe (it defines {RECIPE_VARIABLES[other]}), not a "
            f"{label[kind]} one: run it with {_RECIPE_RUNNERS[other]}")


def recipe_from_file(path, kind="pretrain"):
    """The recipe dict a .py file defines (a deep copy): ``RECIPE_VARIABLES[kind]``; a file of
    the other kind is a ValueError naming the command that runs it."""
    variable = RECIPE_VARIABLES[kind]
    found = recipe_kind(path)
    if found is not None and found != kind:
        raise ValueError(wrong_kind_message(f"recipe file {path}", kind))
    spec = importlib.util.spec_from_file_location(
        f"_poa_keras_recipe_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, variable, None), dict):
        raise ValueError(f"recipe file {path} must define a dict named {variable}")
    return copy.deepcopy(getattr(module, variable))


def shipped_recipe(name, kind="pretrain"):
    """The shipped recipe ``name`` of a kind (its ``name`` set); an unknown name, or one of the
    other kind, is a ValueError listing the shipped recipes of this kind."""
    names = recipe_names(kind)
    if name not in names:
        if name in recipe_names(next(k for k in RECIPE_VARIABLES if k != kind)):
            raise ValueError(wrong_kind_message(f"recipe {name!r}", kind)
                             + f"; shipped recipes of this kind: {names}")
        raise ValueError(f"unknown recipe {name!r}{_did_you_mean(name, names, quote=True)}; "
                         f"shipped recipes: {names} (or give a path to a .py file defining "
                         f"{RECIPE_VARIABLES[kind]})")
    result = recipe_from_file(os.path.join(recipes_dir(), f"{name}.py"), kind)
    result.setdefault("name", name)
    return result


def load_recipe(recipe, overrides=()):
    """A recipe dict from a shipped recipe name, a path to a .py file defining RECIPE, or a
    dict; then ``overrides`` ("section.key=value" strings, values parsed as Python literals)
    are applied. Returns a deep copy. A fine-tuning recipe (a name, a file defining
    FINETUNE_RECIPE, a dict with a ``model`` section) is refused, naming the command that runs
    it."""
    if isinstance(recipe, dict):
        result = copy.deepcopy(recipe)
        if "model" in result and "method" not in result:
            raise ValueError(wrong_kind_message("this recipe dict (a 'model' section, no "
                                                "'method')", "pretrain"))
    elif isinstance(recipe, (str, os.PathLike)) and os.fspath(recipe).endswith(".py"):
        path = os.fspath(recipe)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file {path} does not exist")
        result = recipe_from_file(path)
    elif isinstance(recipe, str):
        result = shipped_recipe(recipe)
    else:
        raise TypeError(f"recipe must be a name, a .py path or a dict, got {type(recipe).__name__}")
    for item in overrides or ():
        apply_override(result, item)
    validate_recipe(result)
    return result


def apply_override(recipe, item, sections=RECIPE_SECTIONS):
    """Applies one "section.key=value" (or "key=value" for top-level keys) in place;
    ``sections``: the recipe's valid sections and top-level keys."""
    if "=" not in item:
        raise ValueError(f"an override must look like section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as a path
    parts = key.strip().split(".")
    if parts[0] not in sections:
        raise ValueError(f"override {item!r}: unknown recipe section {parts[0]!r}"
                         f"{_did_you_mean(parts[0], sections)}; sections: "
                         f"{list(sections)}")
    target = recipe
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    target[parts[-1]] = value


def _did_you_mean(key, valid, prefix="", quote=False):
    """" (did you mean <prefix><closest>?)" for the closest of ``valid`` (difflib), or ""."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {prefix}{close[0]!r}?)" if quote else \
        f" (did you mean {prefix}{close[0]}?)"


def _check_keys(section, given, valid, label=None):
    """A ValueError naming every key of ``given`` that is not in ``valid`` (each with the
    closest valid key) and listing the valid ones."""
    unknown = sorted(set(given) - set(valid), key=str)
    if not unknown:
        return
    prefix = f"{section}." if section else ""
    names = ", ".join(f"{prefix}{k}{_did_you_mean(k, valid, prefix)}" for k in unknown)
    raise ValueError(f"unknown recipe key{'s' if len(unknown) > 1 else ''} {names}; valid "
                     f"{label or section or 'top-level'} keys: {sorted(valid)}")


def _number_rule(low=None, high=None, low_open=False, high_open=False, integer=False,
                 none=False):
    """A check of one recipe value: a finite (integral) number in a range, or None."""
    if low is not None and high is not None:
        text = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        text = f"{'>' if low_open else '>='} {low:g}"
    else:
        text = ""
    what = ("an integer" if integer else "a number") + (f" {text}" if text else "") + \
        (" or None" if none else "")

    def check(value, where):
        if value is None and none:
            return
        ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
              and math.isfinite(value) and (not integer or float(value).is_integer()))
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise ValueError(f"{where} must be {what}, got {value!r}")
    return check


def _choice_rule(*choices):
    def check(value, where):
        if value not in choices:
            raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}"
                             + (_did_you_mean(value, choices, quote=True)
                                if isinstance(value, str) else ""))
    return check


def _bool_rule(value, where):
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False, got {value!r}")


def _fraction_pair_rule(value, where):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value)
            or not 0 <= value[0] <= value[1] <= 1):
        raise ValueError(f"{where} must be a pair (low, high) with 0 <= low <= high <= 1, got "
                         f"{value!r}")


def _bits_rule(what):
    """A check of a list of bit-widths to draw from (SSQL: BitSampler's own check)."""
    def check(value, where):
        from poa_keras.quantization.sampler import BitSampler

        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise ValueError(f"{where} must be a list of bit-widths, got {value!r}")
        try:
            BitSampler(**{what: value})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
    return check


def _max_tokens_rule(value, where):
    if value is None or value == "all":
        return
    _number_rule(1, integer=True)(value, where)


# The checks above under public names, for the other recipe runner (poa_keras/finetune.py):
# one wording of every recipe error.
did_you_mean, check_keys = _did_you_mean, _check_keys
number_rule, choice_rule, bool_rule, fraction_pair_rule = (
    _number_rule, _choice_rule, _bool_rule, _fraction_pair_rule)

_POSITIVE = _number_rule(0, low_open=True)
_NON_NEGATIVE = _number_rule(0)
_FRACTION = _number_rule(0, 1)
_COUNT = _number_rule(1, integer=True)
# Ranges of the recipe values; the KEYS of each section come from where they are used (the
# method's defaults, the schedules, the data pipeline), these only say which values are valid.
VALUE_RULES = {
    "train": dict(
        epochs=_COUNT, batch_size=_COUNT, reference_batch=_number_rule(1, integer=True, none=True),
        lr=_POSITIVE, min_lr=_NON_NEGATIVE, warmup_epochs=_NON_NEGATIVE,
        truncate=_number_rule(0, 1, low_open=True),
        iter_num_scale=_number_rule(0, 1, low_open=True),
        weight_decay=_NON_NEGATIVE, weight_decay_end=_NON_NEGATIVE,
        momentum_teacher=_FRACTION, final_momentum_teacher=_FRACTION,
        warmup_teacher_temp=_POSITIVE, teacher_temp=_POSITIVE,
        warmup_teacher_temp_epochs=_NON_NEGATIVE, freeze_last_layer_epochs=_NON_NEGATIVE,
        layer_decay=_number_rule(0, 1, low_open=True), patch_embed_lr_mult=_NON_NEGATIVE,
        clip_grad=_number_rule(0, low_open=True, none=True),
        lr_scaling=_choice_rule("sqrt", "linear", "none"),
        student_temp=_POSITIVE, centering=_choice_rule("center", "sinkhorn"),
        center_momentum=_FRACTION, sinkhorn_iterations=_COUNT,
        lambda_ie=_FRACTION, same_view_temp=_POSITIVE, koleo_weight=_NON_NEGATIVE,
        sampler_seed=_number_rule(0, integer=True),
        net_select_scale=_number_rule(0, low_open=True, none=True),
        ibot_weight=_NON_NEGATIVE, ibot_start_epoch=_NON_NEGATIVE,
        ibot_mask_probability=_FRACTION, ibot_mask_ratio=_fraction_pair_rule,
        ibot_max_tokens=_max_tokens_rule, elastic_student=_bool_rule,
        weight_decay_mode=_choice_rule("l2", "decoupled"),
        weight_bits=_bits_rule("weight_bits"), activation_bits=_bits_rule("activation_bits"),
        mask_ratio=_number_rule(0, 1, low_open=True, high_open=True),
        norm_pix_loss=_bool_rule, mask_seed=_number_rule(0, integer=True),
        distill_weight=_NON_NEGATIVE),
    "data": dict(
        source=_choice_rule(*DATA_SOURCES), num_images=_COUNT,
        num_val=_number_rule(0, integer=True), image_size=_COUNT,
        seed=_number_rule(0, integer=True), steps_per_epoch=_number_rule(1, integer=True,
                                                                         none=True),
        threads=_number_rule(0, integer=True, none=True),   # 0 / None: tf.data's own pools
        on_bad_image=_choice_rule(*BAD_IMAGE_CHOICES),
        global_size=_COUNT, local_size=_COUNT, num_local=_number_rule(0, integer=True),
        num_global=_choice_rule(1, 2)),
    "optimizer": dict(name=_choice_rule(*OPTIMIZERS), beta_1=_number_rule(0, 1, high_open=True),
                      beta_2=_number_rule(0, 1, high_open=True), epsilon=_POSITIVE,
                      momentum=_number_rule(0, 1, high_open=True), nesterov=_bool_rule),
    "checkpoint": dict(every_epochs=_COUNT, keep=_COUNT, max_abs=_POSITIVE),
}


def method_class(method):
    """The trainer class of a recipe's ``method`` ("poa" -> POA, "dino" -> DINO, "simsiam" ->
    SimSiam, "ssql" -> SSQL)."""
    if method not in METHODS:
        raise ValueError(f"recipe method must be one of {list(METHODS)}, got {method!r}"
                         + (_did_you_mean(method, METHODS, quote=True)
                            if isinstance(method, str) else ""))
    if method == "poa":
        from poa_keras.methods.poa import POA

        return POA
    if method == "simsiam":
        from poa_keras.methods.simsiam import SimSiam

        return SimSiam
    if method == "ssql":
        from poa_keras.methods.ssql import SSQL

        return SSQL
    if method == "mae":
        from poa_keras.methods.mae import MAE

        return MAE
    from poa_keras.methods.dino import DINO

    return DINO


def optimizer_name(recipe):
    """The recipe's optimizer: ``optimizer.name``, else "sgd" for SimSiam / SSQL and "adamw"
    for POA / DINO."""
    default = "sgd" if recipe.get("method") in TWO_VIEW_METHODS else "adamw"
    return (recipe.get("optimizer") or {}).get("name", default)


def train_keys(method):
    """Every key a recipe's ``train`` section may hold for ``method``: the trainer's recipe
    defaults (POA_RECIPE, DINO_RECIPE: schedules and method keys) and the run-length keys of
    ``Schedules.from_recipe`` (``epochs``, ``batch_size``; ``steps_per_epoch`` is set by
    pretrain from the data section)."""
    from poa_keras.methods import schedules

    keys = set(method_class(method).recipe_defaults) | set(schedules.RUN_KEYS)
    if method not in TWO_VIEW_METHODS + ("mae",):    # POA's truncated schedules
        keys |= set(schedules.ALIASES)
    return keys - {"steps_per_epoch"}


def backbone_keys(config):
    """The keys a recipe's ``backbone`` section may hold besides ``config``: the family's
    constructor arguments (and Keras' ``name`` / ``dtype``)."""
    from poa_keras.backbones import BACKBONE_CLASSES, Backbone, config_names

    names = config_names()
    if config not in names:
        raise ValueError(f"unknown backbone configuration backbone.config={config!r}"
                         f"{_did_you_mean(config, names, quote=True)}; known: {sorted(names)}")
    return _init_keys(BACKBONE_CLASSES[names[config]], Backbone) | {"name", "dtype", "init"}


def _init_keys(cls, base):
    keys = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, base) and "__init__" in vars(klass):
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                    keys.add(parameter.name)
    return keys - {"self"}


def head_keys(method, head):
    """The keys of a recipe's ``head`` section: the head's constructor arguments (POA: a
    MultiProjectionHead, or one DINOHead when ``out_dim`` is given; DINO: a DINOHead;
    SimSiam / SSQL: "projector" and "predictor", see ``two_view_head_keys``)."""
    from poa_keras.heads.dino import DINOHead, MultiProjectionHead

    if method in TWO_VIEW_METHODS:
        return set(two_view_head_keys())
    if method == "mae":   # the decoder's arguments; in_dim, patch_size, in_channels: the encoder's
        from poa_keras.heads.mae import MAEDecoder

        return (_init_keys(MAEDecoder, MAEDecoder) - {"in_dim", "patch_size", "in_channels"}) \
            | {"name", "dtype", "init"}
    cls = MultiProjectionHead if method == "poa" and "out_dim" not in head else DINOHead
    return _init_keys(cls, cls) | {"name", "dtype"}


def two_view_head_keys():
    """{"projector": its keys, "predictor": its keys}: the sub-sections of a SimSiam / SSQL
    recipe's ``head`` (the constructor arguments of SimSiamProjector and SimSiamPredictor;
    ``in_dim`` and ``dim`` follow from the backbone and the projector)."""
    from poa_keras.heads.simsiam import SimSiamPredictor, SimSiamProjector

    return {"projector": (_init_keys(SimSiamProjector, SimSiamProjector) - {"in_dim"})
            | {"name", "dtype"},
            "predictor": (_init_keys(SimSiamPredictor, SimSiamPredictor) - {"dim"})
            | {"name", "dtype"}}


def validate_recipe(recipe):
    """Checks a recipe before anything is built: every key of every section (an unknown one
    names the closest valid key and lists them all), the values' types and ranges, the
    backbone configuration (built without weights: ``Backbone.unbuilt``). Returns it."""
    if not isinstance(recipe, dict):
        raise TypeError(f"a recipe is a dict, got {type(recipe).__name__}")
    _check_keys("", recipe, RECIPE_SECTIONS)
    trainer_class = method_class(recipe.get("method"))
    for section in ("backbone", "head", "data", "train"):
        if not isinstance(recipe.get(section), dict):
            raise ValueError(f"recipe section {section!r} must be a dict, got "
                             f"{recipe.get(section)!r}")
    for section in ("optimizer", "checkpoint"):
        if not isinstance(recipe.get(section) or {}, dict):
            raise ValueError(f"recipe section {section!r} must be a dict, got "
                             f"{recipe.get(section)!r}")
    for key in ("name", "description"):
        if recipe.get(key) is not None and not isinstance(recipe[key], str):
            raise ValueError(f"recipe {key} must be a string, got {recipe[key]!r}")
    _number_rule(0, integer=True)(recipe.get("seed", 0), "seed")

    if "config" not in recipe["backbone"]:
        raise ValueError("recipe backbone needs 'config' (a named backbone configuration, see "
                         "poa_keras.backbones.config_names())")
    backbone = dict(recipe["backbone"])
    config = backbone.pop("config")
    _check_keys("backbone", recipe["backbone"], backbone_keys(config) | {"config"})
    for section in ("backbone", "head"):
        init = recipe[section].get("init")
        if init is not None and not isinstance(init, (str, os.PathLike)):
            raise ValueError(f"{section}.init must be a preset (a registered name or a "
                             f"directory), got {init!r}")
    backbone.pop("init", None)
    _check_keys("head", recipe["head"], head_keys(recipe["method"], recipe["head"]))
    if recipe["method"] in TWO_VIEW_METHODS:
        for part, keys in two_view_head_keys().items():
            section = recipe["head"].get(part) or {}
            if not isinstance(section, dict):
                raise ValueError(f"recipe head.{part} must be a dict of the arguments of the "
                                 f"{part}, got {section!r}")
            _check_keys(f"head.{part}", section, keys)
            for key in ("out_dim", "hidden_dim", "num_layers"):
                if key in section:   # None: the projector's default width
                    _number_rule(1, integer=True, none=key != "num_layers")(
                        section[key], f"head.{part}.{key}")
        num_local = recipe["data"].get("num_local", 0)
        if num_local != 0:
            raise ValueError(f"data.num_local={num_local!r}: {recipe['method']} trains on the "
                             "two global views only; set data.num_local=0 (or leave it out)")
    if recipe["method"] == "mae":
        _check_mae_sections(recipe)
    elif recipe.get("distill") is not None:
        raise ValueError(f"recipe section 'distill' belongs to method 'mae' (MAE-Lite's "
                         f"attention distillation), not {recipe['method']!r}")
    _check_keys("data", recipe["data"], DATA_KEYS)
    optimizer = recipe.get("optimizer") or {}
    name = optimizer_name(recipe)
    _choice_rule(*OPTIMIZERS)(name, "optimizer.name")
    _check_keys("optimizer", optimizer, ("name",) + OPTIMIZERS[name], label=f"optimizer ({name})")
    _check_keys("checkpoint", recipe.get("checkpoint") or {}, VALUE_RULES["checkpoint"])
    if "steps_per_epoch" in recipe["train"]:
        raise ValueError("train.steps_per_epoch is set from the data: give data.steps_per_epoch "
                         "instead (the length of an epoch in steps; default: images // "
                         "train.batch_size)")
    _check_keys("train", recipe["train"], train_keys(recipe["method"]),
                label=f"train ({trainer_class.__name__})")
    for key in ("epochs", "batch_size"):
        value = recipe["train"].get(key)
        if value is None:
            raise ValueError(f"recipe train section needs {key!r}")
        # One Keras epoch is one recipe epoch, so epochs must be whole (warmups, freezes and
        # temperature ramps may be fractional; data.steps_per_epoch shortens an epoch).
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                int(value) != value or int(value) < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
    for section, rules in VALUE_RULES.items():
        for key, value in (recipe.get(section) or {}).items():
            if key in rules:
                rules[key](value, f"{section}.{key}")
    # The backbone's own checks (sizes, head dims, ...), without building its weights.
    from poa_keras.backbones import BACKBONE_CLASSES, config_names

    family = BACKBONE_CLASSES[config_names()[config]]
    try:
        family.unbuilt(config_name=config, **backbone)
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe backbone {recipe['backbone']}: {error}") from error
    return recipe


def _check_mae_sections(recipe):
    """An MAE recipe: one view, no local crops, a ViT encoder, and a ``distill`` section
    naming exactly one teacher source."""
    for key, valid in (("num_local", (0,)), ("num_global", (1, 2))):
        value = recipe["data"].get(key, valid[0])
        if value not in valid:
            raise ValueError(f"data.{key}={value!r}: MAE trains on one view of each image "
                             f"(its first global view); valid: {list(valid)}")
    from poa_keras.backbones import BACKBONE_CLASSES, config_names

    family = BACKBONE_CLASSES[config_names()[recipe["backbone"]["config"]]].family
    if family != "ViT":
        raise ValueError(f"method 'mae' trains a ViT encoder; backbone.config="
                         f"{recipe['backbone']['config']!r} is a {family} configuration")
    distill = recipe.get("distill")
    if distill is None:
        return
    if not isinstance(distill, dict):
        raise ValueError(f"recipe section 'distill' must be a dict, got {distill!r}")
    _check_keys("distill", distill, DISTILL_KEYS)
    given = [k for k in DISTILL_KEYS if distill.get(k)]
    if len(given) != 1:
        raise ValueError(f"recipe distill section needs exactly one of {list(DISTILL_KEYS)} "
                         f"(a teacher preset, or a recipe that trains it), got {distill!r}")


# --------------------------------------------------------------------------------------- data

def _epoch_seed(seed, epoch):
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


def epoch_seed(seed, epoch):
    """The seed of epoch ``epoch``'s data of a run seeded with ``seed`` (a non-negative int): a
    resumed run rebuilds exactly the batches the uninterrupted run saw."""
    return _epoch_seed(seed, epoch)


def _known_size(ds, where):
    """A tf.data set's number of elements: None when unknown or infinite; an empty one is a
    ValueError (it would fail later, inside TensorFlow's shuffle)."""
    n = int(ds.cardinality())
    if n == 0:
        raise ValueError(f"{where} holds no images")
    return n if n > 0 else None


known_size = _known_size   # public name, for poa_keras/finetune.py


def folder_images(path, data, with_labels=False, progress=False, where="data.path"):
    """``images_from_directory`` of a recipe's image folder ``path`` (``where`` names the recipe
    key in messages): a missing folder is a FileNotFoundError; every file is decoded once first
    and a bad one stops here, naming it, or is left out with ``data.on_bad_image="skip"``.
    Returns the dataset (``with_labels``: of (image, label) pairs, and the class names) and its
    size."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{where}={path!r} is not a directory (recipe {where}, or --data "
                                "on the command line)")
    from poa_keras.data.multicrop import images_from_directory

    found = images_from_directory(path, with_labels=with_labels,
                                  on_bad_image=data.get("on_bad_image", "error"),
                                  progress=progress)
    ds = found[0] if with_labels else found
    size = _known_size(ds, f"{where}={path!r}")
    return (found[0], found[1], size) if with_labels else (ds, size)


def tfds_images(data, split, with_info=False):
    """``tfds.load`` of a recipe's TFDS data set (``data.name``, ``data.data_dir``) at ``split``
    and its size (with_info: and the data set's info); a missing package is an ImportError
    naming the extra to install."""
    if not data.get("name"):
        raise ValueError('data.source="tfds" needs data.name, a TFDS data set name (e.g. '
                         'data.name=imagenette)')
    try:
        import tensorflow_datasets as tfds  # only for source="tfds"
    except ImportError as error:
        raise ImportError('data.source="tfds" needs the tensorflow-datasets package: pip '
                          'install "poa_keras[tfds]" (or tensorflow-datasets)') from error

    ds, info = tfds.load(data["name"], split=split, data_dir=data.get("data_dir"),
                         with_info=True)
    size = _known_size(ds, f"TFDS {data['name']!r} split {split!r}")
    return (ds, size, info) if with_info else (ds, size)


def limit_threads(ds, threads):
    """``ds`` on a private tf.data thread pool of ``threads`` threads (None / 0: tf.data's own
    pools). A small pool keeps the augmentations from competing with the train step for the
    cores of a small CPU machine (measured on 2 cores with PyTorch: 10 s per step of the demo
    with tf.data's default pools, 7 s with one thread)."""
    if not threads:
        return ds
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = int(threads)
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def training_images(data, seed, progress=False):
    """(images or dataset/path for multicrop_dataset, number of images or None). An image
    folder is checked first: every file decoded once (``progress``: with a progress bar); a
    file that does not decode stops here, naming it, or is left out with
    ``data.on_bad_image="skip"``."""
    source = data.get("source", "shapes")
    if source == "shapes":
        # The training part of load_shapes: its held-out part (num_val images, with labels)
        # is what evaluation uses (benchmarks/quality.py), never seen in training.
        (images, _), _, _ = shapes_split(data, seed)
        if len(images) == 0:
            raise ValueError(f"data.num_images={data.get('num_images')} leaves no training "
                             "image (the shapes are split stratified by class)")
        return images, len(images)
    if source == "folder":
        return folder_images(data.get("path"), data, progress=progress)
    return tfds_images(data, data.get("split", "train"))


def shapes_split(data, seed=0):
    """load_shapes(...) of a "shapes" data section: ((train images, labels), (val images,
    labels), class names); pretraining uses the train images only."""
    from poa_keras.data.synthetic import load_shapes

    return load_shapes(num_train=int(data.get("num_images", 10_000)),
                       num_val=int(data.get("num_val", 2_000)),
                       image_size=int(data.get("image_size", 64)),
                       seed=int(data.get("seed", seed)),
                       palette=data.get("palette", "light_on_dark"))


def steps_per_epoch(recipe, num_images):
    data, batch = recipe["data"], int(recipe["train"]["batch_size"])
    if data.get("steps_per_epoch"):
        return int(data["steps_per_epoch"])
    if num_images is None:
        raise ValueError("the data set size is unknown: set data.steps_per_epoch in the recipe")
    if num_images < 1:
        raise ValueError(f"the data set holds {num_images} images: give at least one batch "
                         f"({batch})")
    steps = num_images // batch
    if steps < 1:
        raise ValueError(f"{num_images} images give no full batch of {batch}")
    return steps


def epoch_datasets(recipe, images, steps, start_epoch, epochs):
    """One finite tf.data stream of the batches of epochs [start_epoch, epochs): epoch e is the
    multi-crop pipeline seeded with (seed, e), cut to `steps` batches."""
    from poa_keras.data.multicrop import multicrop_dataset

    data, seed = recipe["data"], int(recipe.get("seed", 0))
    kwargs = {k: v for k, v in data.items() if k in _MULTICROP_KEYS}
    if recipe.get("method") in TWO_VIEW_METHODS:
        kwargs = dict(TWO_VIEW_DATA_DEFAULTS, **kwargs)
    elif recipe.get("method") == "mae":
        kwargs = dict(MAE_DATA_DEFAULTS, **kwargs)
    for key in ("global_scale", "local_scale", "ratio", "color_jitter", "blur_prob",
                "blur_sigma", "solarize_prob", "mask_ratio"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    stream = None
    for epoch in range(start_epoch, epochs):
        ds = multicrop_dataset(images, int(recipe["train"]["batch_size"]),
                               seed=_epoch_seed(seed, epoch), repeat=True,
                               image_key=data.get("image_key", "image"), **kwargs).take(steps)
        stream = ds if stream is None else stream.concatenate(ds)
    return limit_threads(stream, data.get("threads"))


# ------------------------------------------------------------------------------------ trainer

def build_trainer(recipe, steps, teacher=None):
    """The compiled trainer of a recipe (student built from its config; POA / DINO: teacher =
    copy; SimSiam / SSQL: projector and predictor from the ``head`` section; MAE: the decoder
    from the ``head`` section, and ``teacher``, the frozen distillation teacher, if any)."""
    import keras

    from poa_keras.backbones import from_config_name

    keras.utils.set_random_seed(int(recipe.get("seed", 0)))
    bcfg = dict(recipe["backbone"])
    config = bcfg.pop("config")
    init = bcfg.pop("init", None)
    # named after its configuration, so the saved teacher preset says what it is
    # ("teacher_vit_elastic_demo"; sweeps and plots show that name)
    backbone = from_config_name(config, name=bcfg.pop("name", config), **bcfg)
    recipe_preprocessing = data_preprocessing(recipe)
    if init is not None:   # e.g. a released dense model made elastic (Backbone.elastify)
        released = initialise_from_preset(backbone, init)
        if (released.mean, released.std) != (recipe_preprocessing.mean,
                                             recipe_preprocessing.std):
            import warnings

            warnings.warn(f"backbone.init={os.fspath(init)!r} was trained on images normalised "
                          f"with mean {released.mean} / std {released.std}; this recipe's data "
                          f"are normalised with mean {recipe_preprocessing.mean} / std "
                          f"{recipe_preprocessing.std} (data.normalize): it starts from inputs "
                          "it never saw", stacklevel=2)
    backbone.preprocessing = recipe_preprocessing   # the teacher preset records it
    train = dict(recipe["train"], steps_per_epoch=int(steps))
    cls = method_class(recipe["method"])
    head = dict(recipe["head"])
    if recipe["method"] in TWO_VIEW_METHODS:
        trainer = cls(backbone, projector=dict(head.get("projector") or {}),
                      predictor=dict(head.get("predictor") or {}), recipe=train)
        # the trainer applies the weight decay itself (PyTorch SGD's, weight_decay_mode="l2")
        # or hands its step value to the optimizer ("decoupled")
        learning_rate, weight_decay = trainer.learning_rate_at(0), None
    elif recipe["method"] == "mae":
        decoder_init = head.pop("init", None)
        trainer = cls(backbone, decoder=head, recipe=train, teacher=teacher)
        if decoder_init is not None:   # a converted full MAE checkpoint's decoder
            load_decoder_from_preset(trainer.decoder, decoder_init)
        values = trainer.step_hyperparameters(0)
        learning_rate, weight_decay = values["learning_rate"], values["weight_decay"]
    else:
        trainer = cls(backbone, head, recipe=train)
        learning_rate = float(trainer.schedules.at(0)["lr"])
        weight_decay = float(trainer.schedules.at(0)["weight_decay"])
    opt = dict(recipe.get("optimizer") or {})
    if optimizer_name(recipe) == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=learning_rate, weight_decay=weight_decay,
            momentum=float(opt.get("momentum", 0.9)), nesterov=bool(opt.get("nesterov", False)))
    else:
        optimizer = keras.optimizers.AdamW(
            learning_rate=learning_rate,
            weight_decay=0.0 if weight_decay is None else weight_decay,   # AdamW refuses None
            beta_1=float(opt.get("beta_1", 0.9)), beta_2=float(opt.get("beta_2", 0.999)),
            epsilon=float(opt.get("epsilon", 1e-8)))
    trainer.compile(optimizer=optimizer)
    return trainer


def initialise_from_preset(backbone, preset):
    """``backbone.init``: every weight of the preset's network copied into the recipe's
    backbone (its configuration, e.g. an elastic grid over a released dense model; shapes must
    agree); what the preset lacks (a mask token) keeps its initialisation. Returns the
    preset's ``ImagePreprocessing``."""
    from poa_keras.backbones import Backbone

    source = Backbone.from_preset(preset)
    try:
        backbone.copy_weights_from(source)
    except ValueError as error:
        raise ValueError(f"backbone.init={os.fspath(preset)!r} does not fit the recipe's "
                         f"backbone: {error}") from error
    return source.preprocessing


def load_decoder_from_preset(decoder, preset):
    """``head.init`` of an MAE recipe: the decoder weights a converted full MAE checkpoint
    keeps in its preset (``decoder.weights.h5``), by variable path; shapes must agree."""
    import json

    from poa_keras import presets
    from poa_keras.elastic import assign_by_path

    where = f"head.init={os.fspath(preset)!r}"
    directory = presets.resolve(preset).directory
    if directory is None or not (Path(directory) / presets.DECODER_WEIGHTS_FILE).is_file():
        raise ValueError(f"{where}: the preset holds no MAE decoder ({presets.DECODER_FILE}, "
                         f"{presets.DECODER_WEIGHTS_FILE}); convert a full MAE checkpoint "
                         "(e.g. mae_vit_b16_full)")
    directory = Path(directory)
    metadata = json.loads((directory / presets.METADATA_FILE).read_text())
    arrays = presets.load_variables(directory / presets.DECODER_WEIGHTS_FILE,
                                    (metadata.get("decoder") or {}).get("weights_sha256"), where)
    try:   # every key and shape checked before anything is written
        assign_by_path(decoder, arrays, where)
    except ValueError as error:
        saved = json.loads((directory / presets.DECODER_FILE).read_text())["config"]
        theirs = ", ".join(f"{k} {saved.get(k)}" for k in ("dim", "depth", "num_heads"))
        raise ValueError(f"{where}: its decoder ({theirs}) does not fit the recipe's head "
                         f"(dim {decoder.dim}, depth {decoder.depth}, num_heads "
                         f"{decoder.num_heads})") from error


def distillation_teacher(recipe, output_dir, verbose="auto"):
    """The frozen teacher of an MAE recipe's ``distill`` section (None without one): the preset
    ``distill.teacher``, or the result of ``distill.teacher_recipe``, which is run (or resumed,
    or found finished) in ``<output_dir>/distill_teacher`` first."""
    distill = recipe.get("distill")
    if not distill:
        return None
    from poa_keras.backbones import Backbone

    if distill.get("teacher"):
        return Backbone.from_preset(distill["teacher"])
    run_dir = os.path.join(os.fspath(output_dir), "distill_teacher")
    teacher_dir = os.path.join(run_dir, "teacher")
    if not os.path.isdir(teacher_dir):
        teacher_recipe = load_recipe(distill["teacher_recipe"])
        if teacher_recipe.get("distill"):
            raise ValueError(f"distill.teacher_recipe={distill['teacher_recipe']!r} distills "
                             "from a teacher itself; give a recipe that trains without one")
        pretrain(teacher_recipe, run_dir, verbose=verbose)
    return Backbone.from_preset(teacher_dir)


def trained_backbone(trainer):
    """The backbone a run delivers: the EMA teacher (POA, DINO), or the trained backbone of the
    encoder for methods without a teacher (SimSiam, SSQL)."""
    teacher = getattr(trainer, "teacher_backbone", None)
    return trainer.backbone if teacher is None else teacher


def data_preprocessing(recipe):
    """The ``ImagePreprocessing`` of a recipe's data pipeline, recorded in the teacher preset
    (so that evaluation feeds images as training did): the global crops' size (``global_size``;
    224, ``multicrop_dataset``'s default), their bilinear resampling and the recipe's
    ``normalize`` ("imagenet" by default). Images already at that size are only normalised."""
    from poa_keras.preprocessing import ImagePreprocessing

    data = recipe["data"]
    return ImagePreprocessing(image_size=data.get("global_size", 224), interpolation="bilinear",
                              pixel_normalization=data.get("normalize", "imagenet"))


@dataclasses.dataclass
class PretrainResult:
    trainer: object
    history: list            # one dict of logs per finished epoch (all epochs of the run)
    output_dir: str
    resumed_from: str | None
    recipe_changes: dict = dataclasses.field(default_factory=dict)   # of a resumed run

    @property
    def teacher(self):
        """The backbone the run delivers (saved as ``teacher/``): the EMA teacher for POA and
        DINO; SimSiam and SSQL have no EMA teacher, so there it is the trained backbone of the
        encoder (``trainer.backbone``)."""
        return trained_backbone(self.trainer)


def compilation_cache_dir(setting, output_dir):
    """Where JAX keeps compiled programs for a run: ``setting`` None / "off" (no persistent
    cache), "auto" (a cache the process already has, e.g. from ``JAX_COMPILATION_CACHE_DIR``,
    else "user"), "user" (``<Keras cache>/jax_compilation_cache``, shared by every run of
    this user), "run" (``<output_dir>/jax_compilation_cache``) or a directory."""
    if setting in (None, "off"):
        return None
    if setting == "auto":
        import keras

        if keras.backend.backend() != "jax":
            return None
        import jax

        current = jax.config.jax_compilation_cache_dir
        return current if current else compilation_cache_dir("user", output_dir)
    if setting == "user":
        from poa_keras import presets

        home = presets.cache_dir() or os.path.expanduser(os.path.join("~", ".keras"))
        return os.path.join(home, "jax_compilation_cache")   # $KERAS_HOME, else Keras' own
    if setting == "run":
        return os.path.join(os.fspath(output_dir), "jax_compilation_cache")
    if not isinstance(setting, (str, os.PathLike)) or not os.fspath(setting):
        raise ValueError(f"compilation_cache={setting!r}: give 'auto', 'user', 'run', 'off' "
                         "or a directory")
    return os.fspath(setting)


def enable_compilation_cache(path):
    """Points JAX's persistent compilation cache at ``path`` (nothing on other backends, or
    for None), so that a resumed or repeated run loads the train-step programs it compiled
    before instead of compiling them again. Returns the directory in use (or None)."""
    import keras

    if path is None or keras.backend.backend() != "jax":
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.fspath(path))
    if jax.config.jax_compilation_cache_dir != path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()   # JAX opens its cache once per process: re-point it
    return path


def _comparable(recipe):
    """The recipe as JSON would store it (tuples become lists), for resume checks."""
    return json.loads(json.dumps(recipe, default=list))


def resumable_keys():
    """The recipe keys a resumed run may change when asked to (``allow_recipe_change``): those
    that leave the saved state valid -- the schedules (functions of the step count and the
    recipe: ``Schedules.from_recipe``'s keys, learning rate, warmup, weight decay, teacher
    momentum and temperature, clipping, lr multipliers) and the run's length, the checkpoint
    settings, the pipeline's threads and where the image folder lies (``data.path``: the same
    images, moved). Not the data's content, the batch, the model or the method."""
    from poa_keras.methods import schedules

    keys = {f"train.{k}" for k in schedules.POA_DEFAULTS} | {"train.epochs"}
    keys |= {f"train.{k}" for k in schedules.ALIASES}
    keys |= {f"checkpoint.{k}" for k in VALUE_RULES["checkpoint"]}
    return keys | {"data.threads", "data.path", "name", "description"}


def recipe_changes(old, new):
    """{"section.key" (or a top-level key): (old value, new value)} of two recipes (values as
    JSON stores them; a missing key is None)."""
    old, new = _comparable(old) or {}, _comparable(new)
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
            changes.update({f"{key}.{k}": (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                            if a.get(k) != b.get(k)})
        elif a != b:
            changes[key] = (a, b)
    return changes


def check_allowed_changes(allow_recipe_change):
    """The checked list of ``allow_recipe_change`` ("train.lr,train.epochs" or a list)."""
    if isinstance(allow_recipe_change, str):
        allow_recipe_change = allow_recipe_change.split(",")
    allowed = [k.strip() for k in allow_recipe_change or () if k.strip()]
    valid = resumable_keys()
    for key in allowed:
        if key not in valid:
            raise ValueError(f"allow_recipe_change: {key!r} cannot change when a run resumes"
                             f"{_did_you_mean(key, valid)}; keys that can: {sorted(valid)}")
    return allowed


def _check_resume(output_dir, saved_recipe, recipe, allowed, epochs_done):
    """The changes of a resumed recipe (``recipe_changes``), or a ValueError naming the ones
    that are not allowed."""
    changes = recipe_changes(saved_recipe, recipe)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        resumable = resumable_keys()
        if all(k in resumable for k in refused):
            hint = (f"to resume with them changed, allow it: allow_recipe_change="
                    f"{sorted(refused)} (the CLI's --allow_recipe_change="
                    f"{','.join(sorted(refused))})")
        else:
            hint = ("use a new output directory (only the schedules, the number of epochs and "
                    "the checkpoint settings can change on resume, with allow_recipe_change)")
        raise ValueError(f"{output_dir} holds a run of another recipe (keys that differ: "
                         f"{listed}); {hint}")
    if int(recipe["train"]["epochs"]) < epochs_done:
        raise ValueError(f"train.epochs={recipe['train']['epochs']}: {output_dir} has already "
                         f"run {epochs_done} epochs")
    return changes


def open_checkpoints(output_dir, checkpointing, resume):
    """(CheckpointManager of ``<output_dir>/checkpoints`` with a recipe's ``checkpoint``
    settings, its latest checkpoint or None). A directory that holds checkpoints is refused
    (FileExistsError) unless ``resume``."""
    from poa_keras.methods.checkpoint import MAX_ABS, CheckpointManager

    manager = CheckpointManager(os.path.join(output_dir, "checkpoints"),
                                keep=int(checkpointing.get("keep", 2)),
                                max_abs=float(checkpointing.get("max_abs", MAX_ABS)))
    latest = manager.latest()
    if latest is not None and not resume:
        raise FileExistsError(f"{output_dir} already holds checkpoints ({latest}); pass "
                              "resume=True (the CLI's --resume) or use another directory")
    return manager, latest


def fit_epochs(model, data, *, output_dir, manager, steps, start_epoch, stop_epoch, history,
               state, every_epochs=1, advice=None, verbose="auto", callbacks=(),
               **fit_kwargs):
    """``model.fit`` over epochs [start_epoch, stop_epoch) of a recipe run, with its
    checkpoints, NaN stop and log; shared by the pretraining and fine-tuning runners.

    ``data`` yields ``steps`` batches per epoch (one stream for all the epochs). After every
    epoch its logs are appended to ``history`` (a list, changed in place: "epoch" is 1-based),
    then a checkpoint is written every ``every_epochs`` epochs and after ``stop_epoch``
    (``PretrainCheckpoint``; its state.json holds ``state`` and the history) and
    ``<output_dir>/log.csv`` gets a row. A NaN loss or an unsound state stops the run: the
    ``NonFiniteLoss`` / ``NonFiniteState`` is raised with ``advice`` (what to do), the last
    good checkpoint kept. ``fit_kwargs`` go to ``fit`` (e.g. ``validation_data``)."""
    import keras

    from poa_keras.methods.checkpoint import PretrainCheckpoint
    from poa_keras.methods.nan_guard import StopOnNonFiniteLoss

    def record(epoch, logs):
        history.append(dict({k: float(v) for k, v in (logs or {}).items()}, epoch=epoch + 1))

    def extra(finished, logs):
        return dict(state, history=history)

    saver = PretrainCheckpoint(manager, total_epochs=stop_epoch, every_epochs=int(every_epochs),
                               extra=extra, advice=advice)
    guard = StopOnNonFiniteLoss(last_checkpoint=manager.latest, advice=advice)
    own = [keras.callbacks.LambdaCallback(on_epoch_end=record), guard, saver,
           keras.callbacks.CSVLogger(os.path.join(output_dir, "log.csv"),
                                     append=start_epoch > 0)]
    # shuffle=False: the pipelines shuffle (seeded per epoch); Keras would ignore the flag for
    # a dataset, with a warning
    model.fit(data, epochs=stop_epoch, initial_epoch=start_epoch, steps_per_epoch=steps,
              verbose=verbose, shuffle=False, callbacks=own + list(callbacks), **fit_kwargs)
    for error in (guard.error, saver.error):
        if error is not None:
            raise error


def pretrain(recipe, output_dir, *, overrides=(), resume=True, verbose="auto", callbacks=(),
             epochs=None, save_teacher=True, compilation_cache="auto", allow_recipe_change=()):
    """Runs (or resumes) a recipe; returns a PretrainResult.

    Args:
        recipe: a shipped recipe name, a .py path or a dict (see the module docstring).
        output_dir: the run directory (checkpoints, log.csv, teacher/).
        overrides: "section.key=value" strings applied to the recipe.
        resume: continue from the latest checkpoint in output_dir if there is one (its recipe
            must equal this one, but for ``allow_recipe_change``); False refuses a directory
            that already holds checkpoints.
        verbose: Keras fit verbosity ("auto", 0, 1 = progress bar with every loss term, 2).
        callbacks: extra Keras callbacks.
        epochs: stop after this many epochs of the recipe (the schedules still follow the
            recipe's full length; a later call resumes).
        save_teacher: write the EMA teacher (SimSiam / SSQL: the trained backbone) as a
            preset into output_dir/teacher at the end.
        compilation_cache: JAX's persistent compilation cache ("auto", "user", "run", "off"
            or a directory: ``compilation_cache_dir``); a repeated or resumed run then
            compiles none of the programs it compiled before. Ignored on other backends.
        allow_recipe_change: recipe keys ("train.lr", ...; a list or a comma-separated
            string) that a resumed run may change: the schedules, ``train.epochs`` and the
            checkpoint settings (``resumable_keys()``), e.g. to resume a diverged run from its
            last good checkpoint with a lower learning rate. Any other change is refused.

    Raises:
        NonFiniteLoss: the loss became NaN/inf, or (``NonFiniteState``) the weights did; the
            run stopped and the last good checkpoint is kept (the message names it).
    """
    recipe = load_recipe(recipe, overrides)
    allowed = check_allowed_changes(allow_recipe_change)
    output_dir = os.fspath(output_dir)
    checkpointing = recipe.get("checkpoint") or {}
    manager, latest = open_checkpoints(output_dir, checkpointing, resume)
    changes = {}
    if latest is not None:   # checked before the data and the model are made
        saved = manager.read_state(latest)
        changes = _check_resume(output_dir, saved.get("recipe"), recipe, allowed,
                                int(saved.get("epoch", 0)))

    enable_compilation_cache(compilation_cache_dir(compilation_cache, output_dir))
    images, num_images = training_images(recipe["data"], int(recipe.get("seed", 0)),
                                         progress=verbose not in (0, "0"))
    steps = steps_per_epoch(recipe, num_images)
    teacher = distillation_teacher(recipe, output_dir, verbose)
    trainer = build_trainer(recipe, steps, teacher=teacher)
    total_epochs = int(recipe["train"]["epochs"])

    history, start_epoch = [], 0
    if latest is not None:
        state = manager.restore(trainer, latest)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    # Created only now: a recipe whose data or backbone fails leaves no empty run directory.
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, "recipe.json"), recipe, indent=1, default=list)

    stop_epoch = total_epochs if epochs is None else min(total_epochs, start_epoch + int(epochs))
    advice = ("Lower the learning rate or raise the warmup, and resume from the last good "
              "checkpoint with the change allowed: pretrain(..., overrides=['train.lr=...'], "
              "allow_recipe_change=['train.lr']) (the CLI's --override=train.lr=... "
              "--allow_recipe_change=train.lr); or check the data for NaN values.")
    if start_epoch < stop_epoch:
        data = epoch_datasets(recipe, images, steps, start_epoch, stop_epoch)
        fit_epochs(trainer, data, output_dir=output_dir, manager=manager, steps=steps,
                   start_epoch=start_epoch, stop_epoch=stop_epoch, history=history,
                   state={"recipe": recipe}, every_epochs=checkpointing.get("every_epochs", 1),
                   advice=advice, verbose=verbose, callbacks=callbacks)
    if save_teacher and stop_epoch == total_epochs:
        trained_backbone(trainer).save_to_preset(os.path.join(output_dir, "teacher"))
    return PretrainResult(trainer=trainer, history=history, output_dir=output_dir,
                          resumed_from=latest, recipe_changes=changes)

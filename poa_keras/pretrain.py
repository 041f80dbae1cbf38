"""Running a pretraining recipe end to end: data, trainer, checkpoints, resume, the teacher.

    from poa_keras.pretrain import load_recipe, pretrain
    result = pretrain("demo", "runs/demo")        # a recipe name, a .py file or a dict
    result.teacher                                # the EMA teacher backbone (an ElasticViT)

A recipe is a Python file in recipes/ (shipped as ``poa_keras.recipes``) defining ``RECIPE``, a
dict with these sections (see recipes/demo.py for a commented example):

* ``method``: "poa" or "dino";
* ``backbone``: ``config`` (a named backbone configuration of any family, see
  ``poa_keras.backbones.config_names()``) plus overrides of it;
* ``head``: arguments of the projection head(s) (``out_dims`` for POA's several heads,
  ``out_dim`` for one DINOHead);
* ``data``: ``source`` = "shapes" (the embedded data set: ``num_images``, ``image_size``,
  ``seed``, ``palette``), "folder" (``path``), or "tfds" (``name``, ``split``, ``data_dir``), and the
  multi-crop settings of ``multicrop_dataset`` (``global_size``, ``local_size``,
  ``num_local``, ``global_scale``, ``local_scale``, ...); ``steps_per_epoch`` when the data
  set size is unknown; ``threads`` (a private tf.data thread pool of that size; default: tf.data's
  own pools);
* ``optimizer``: AdamW ``beta_1``, ``beta_2``;
* ``train``: the trainer's recipe (schedules and method keys: ``epochs``, ``batch_size``,
  ``lr``, ..., see ``Schedules.from_recipe``, ``POA_RECIPE``, ``DINO_RECIPE``);
* ``checkpoint``: ``every_epochs``, ``keep``;
* ``seed``.

One Keras epoch of ``fit`` is one recipe epoch (``steps_per_epoch`` = images // batch size).
The data of epoch e is the multi-crop pipeline seeded with (seed, e), so a resumed run sees
exactly the batches the uninterrupted run would have seen. A run directory holds
``checkpoints/`` (see methods/checkpoint.py), ``log.csv`` (Keras' CSVLogger, one row per
epoch), ``recipe.json`` and, at the end, ``teacher/`` (the EMA teacher as a preset, ready for
``Backbone.from_preset(dir, width=..., depth=...)``). Running ``pretrain`` again on the same
directory resumes from the latest checkpoint (``resume=True``) with the same step count.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
import os
import pkgutil

import numpy as np

from poa_keras.files import atomic_write_json

RECIPE_SECTIONS = ("name", "description", "method", "backbone", "head", "data", "optimizer",
                   "train", "checkpoint", "seed")
METHODS = ("poa", "dino")
DATA_SOURCES = ("shapes", "folder", "tfds")
_MULTICROP_KEYS = ("global_size", "local_size", "num_local", "global_scale", "local_scale",
                   "normalize", "shuffle_buffer", "ratio", "supersample", "flip_prob",
                   "color_jitter", "jitter_prob", "grayscale_prob", "blur_prob", "blur_sigma",
                   "solarize_prob", "masks", "mask_patch_size", "mask_probability", "mask_ratio")


# ------------------------------------------------------------------------------------ recipes

def _recipes_dir():
    """The shipped recipes: the installed ``poa_keras.recipes`` package, or the top-level
    recipes/ folder of a source checkout (where ``python -m poa_keras.cli`` imports the package
    from the checkout, which has no poa_keras/recipes)."""
    try:
        import poa_keras.recipes as package

        return list(package.__path__)[0]
    except ModuleNotFoundError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "recipes")


def recipe_names():
    """Names of the recipes shipped in ``poa_keras.recipes``."""
    return sorted(m.name for m in pkgutil.iter_modules([_recipes_dir()])
                  if not m.name.startswith("_"))


def _recipe_from_file(path):
    spec = importlib.util.spec_from_file_location(
        f"_poa_keras_recipe_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "RECIPE", None), dict):
        raise ValueError(f"recipe file {path} must define a dict named RECIPE")
    return copy.deepcopy(module.RECIPE)


def load_recipe(recipe, overrides=()):
    """A recipe dict from a shipped recipe name, a path to a .py file defining RECIPE, or a
    dict; then ``overrides`` ("section.key=value" strings, values parsed as Python literals)
    are applied. Returns a deep copy."""
    if isinstance(recipe, dict):
        result = copy.deepcopy(recipe)
    elif isinstance(recipe, (str, os.PathLike)) and os.fspath(recipe).endswith(".py"):
        path = os.fspath(recipe)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file {path} does not exist")
        result = _recipe_from_file(path)
    elif isinstance(recipe, str):
        names = recipe_names()
        if recipe not in names:
            raise ValueError(f"unknown recipe {recipe!r}; shipped recipes: {names} "
                             "(or give a path to a .py file defining RECIPE)")
        result = _recipe_from_file(os.path.join(_recipes_dir(), f"{recipe}.py"))
        result.setdefault("name", recipe)
    else:
        raise TypeError(f"recipe must be a name, a .py path or a dict, got {type(recipe).__name__}")
    for item in overrides or ():
        apply_override(result, item)
    validate_recipe(result)
    return result


def apply_override(recipe, item):
    """Applies one "section.key=value" (or "key=value" for top-level keys) in place."""
    if "=" not in item:
        raise ValueError(f"an override must look like section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as a path
    parts = key.strip().split(".")
    if parts[0] not in RECIPE_SECTIONS:
        raise ValueError(f"override {item!r}: unknown recipe section {parts[0]!r}; "
                         f"sections: {list(RECIPE_SECTIONS)}")
    target = recipe
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    target[parts[-1]] = value


def validate_recipe(recipe):
    unknown = sorted(set(recipe) - set(RECIPE_SECTIONS))
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; valid keys: {list(RECIPE_SECTIONS)}")
    if recipe.get("method") not in METHODS:
        raise ValueError(f"recipe method must be one of {list(METHODS)}, "
                         f"got {recipe.get('method')!r}")
    for section in ("backbone", "head", "data", "train"):
        if not isinstance(recipe.get(section), dict):
            raise ValueError(f"recipe section {section!r} must be a dict")
    if "config" not in recipe["backbone"]:
        raise ValueError("recipe backbone needs 'config' (a named backbone configuration, see "
                         "poa_keras.backbones.config_names())")
    source = recipe["data"].get("source", "shapes")
    if source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {list(DATA_SOURCES)}, got {source!r}")
    for key in ("epochs", "batch_size"):
        value = recipe["train"].get(key)
        if value is None:
            raise ValueError(f"recipe train section needs {key!r}")
        # One Keras epoch is one recipe epoch, so epochs must be whole (warmups, freezes and
        # temperature ramps may be fractional; data.steps_per_epoch shortens an epoch).
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
    unknown = sorted(set(recipe["data"]) - set(_MULTICROP_KEYS) - {
        "source", "num_images", "num_val", "image_size", "seed", "path", "name", "split", "data_dir",
        "steps_per_epoch", "image_key", "threads", "palette"})
    if unknown:
        raise ValueError(f"unknown data keys {unknown}")
    return recipe


# --------------------------------------------------------------------------------------- data

def _epoch_seed(seed, epoch):
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


def training_images(data, seed):
    """(images or dataset/path for multicrop_dataset, number of images or None)."""
    source = data.get("source", "shapes")
    if source == "shapes":
        # The training part of load_shapes: its held-out part (num_val images, with labels)
        # is what evaluation uses (benchmarks/quality.py), never seen in training.
        (images, _), _, _ = shapes_split(data, seed)
        return images, len(images)
    if source == "folder":
        path = data.get("path")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"data path {path!r} is not a directory (recipe data.path, "
                                    "or --data on the command line)")
        from poa_keras.data.multicrop import images_from_directory

        ds = images_from_directory(path)
        n = int(ds.cardinality())
        return ds, (n if n > 0 else None)
    if not data.get("name"):
        raise ValueError('data.source="tfds" needs data.name, a TFDS data set name (e.g. '
                         'data.name=imagenette)')
    try:
        import tensorflow_datasets as tfds  # only for source="tfds"
    except ImportError as error:
        raise ImportError('data.source="tfds" needs the tensorflow-datasets package: pip '
                          'install "poa_keras[tfds]" (or tensorflow-datasets)') from error

    ds = tfds.load(data["name"], split=data.get("split", "train"), data_dir=data.get("data_dir"))
    n = int(ds.cardinality())
    return ds, (n if n > 0 else None)


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
    if not num_images:
        raise ValueError("the data set size is unknown: set data.steps_per_epoch in the recipe")
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
    if data.get("threads"):
        # A small private thread pool keeps the augmentations from competing with the train
        # step for the cores of a small CPU machine (measured on 2 cores with PyTorch: 10 s per
        # step of the demo with tf.data's default pools, 7 s with one thread).
        import tensorflow as tf

        options = tf.data.Options()
        options.threading.private_threadpool_size = int(data["threads"])
        options.threading.max_intra_op_parallelism = 1
        stream = stream.with_options(options)
    return stream


# ------------------------------------------------------------------------------------ trainer

def build_trainer(recipe, steps):
    """The compiled trainer of a recipe (student built from its config, teacher = copy)."""
    import keras

    from poa_keras.backbones import from_config_name
    from poa_keras.methods.dino import DINO
    from poa_keras.methods.poa import POA

    keras.utils.set_random_seed(int(recipe.get("seed", 0)))
    bcfg = dict(recipe["backbone"])
    config = bcfg.pop("config")
    # named after its configuration, so the saved teacher preset says what it is
    # ("teacher_vit_elastic_demo"; sweeps and plots show that name)
    backbone = from_config_name(config, name=bcfg.pop("name", config), **bcfg)
    train = dict(recipe["train"], steps_per_epoch=int(steps))
    cls = POA if recipe["method"] == "poa" else DINO
    trainer = cls(backbone, dict(recipe["head"]), recipe=train)
    opt = dict(recipe.get("optimizer") or {})
    optimizer = keras.optimizers.AdamW(
        learning_rate=float(trainer.schedules.at(0)["lr"]),
        weight_decay=float(trainer.schedules.at(0)["weight_decay"]),
        beta_1=float(opt.get("beta_1", 0.9)), beta_2=float(opt.get("beta_2", 0.999)),
        epsilon=float(opt.get("epsilon", 1e-8)))
    trainer.compile(optimizer=optimizer)
    return trainer


@dataclasses.dataclass
class PretrainResult:
    trainer: object
    history: list            # one dict of logs per finished epoch (all epochs of the run)
    output_dir: str
    resumed_from: str | None

    @property
    def teacher(self):
        return self.trainer.teacher_backbone


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

        return os.path.join(presets.cache_dir(), "jax_compilation_cache")
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


def pretrain(recipe, output_dir, *, overrides=(), resume=True, verbose="auto", callbacks=(),
             epochs=None, save_teacher=True, compilation_cache="auto"):
    """Runs (or resumes) a recipe; returns a PretrainResult.

    Args:
        recipe: a shipped recipe name, a .py path or a dict (see the module docstring).
        output_dir: the run directory (checkpoints, log.csv, teacher/).
        overrides: "section.key=value" strings applied to the recipe.
        resume: continue from the latest checkpoint in output_dir if there is one (its recipe
            must equal this one); False refuses a directory that already holds checkpoints.
        verbose: Keras fit verbosity ("auto", 0, 1 = progress bar with every loss term, 2).
        callbacks: extra Keras callbacks.
        epochs: stop after this many epochs of the recipe (the schedules still follow the
            recipe's full length; a later call resumes).
        save_teacher: write the EMA teacher as a preset into output_dir/teacher at the end.
        compilation_cache: JAX's persistent compilation cache ("auto", "user", "run", "off"
            or a directory: ``compilation_cache_dir``); a repeated or resumed run then
            compiles none of the programs it compiled before. Ignored on other backends.

    Raises:
        NonFiniteLoss: the loss became NaN/inf; the run stopped and the last good checkpoint is
            kept (the message names it).
    """
    import keras

    from poa_keras.methods.checkpoint import CheckpointManager, PretrainCheckpoint
    from poa_keras.methods.nan_guard import StopOnNonFiniteLoss

    recipe = load_recipe(recipe, overrides)
    output_dir = os.fspath(output_dir)
    manager = CheckpointManager(os.path.join(output_dir, "checkpoints"),
                                keep=int((recipe.get("checkpoint") or {}).get("keep", 2)))
    latest = manager.latest()
    if latest is not None and not resume:
        raise FileExistsError(f"{output_dir} already holds checkpoints ({latest}); pass "
                              "resume=True (the CLI's --resume) or use another directory")

    enable_compilation_cache(compilation_cache_dir(compilation_cache, output_dir))
    images, num_images = training_images(recipe["data"], int(recipe.get("seed", 0)))
    steps = steps_per_epoch(recipe, num_images)
    trainer = build_trainer(recipe, steps)
    total_epochs = int(recipe["train"]["epochs"])

    history, start_epoch = [], 0
    if latest is not None:
        saved = manager.read_state(latest)
        if _comparable(saved.get("recipe")) != _comparable(recipe):
            old, new = _comparable(saved.get("recipe")) or {}, _comparable(recipe)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{output_dir} holds a run of another recipe (sections that differ: "
                             f"{diff}); use a new output directory")
        state = manager.restore(trainer, latest)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    # Created only now: a recipe whose data or backbone fails leaves no empty run directory.
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, "recipe.json"), recipe, indent=1, default=list)

    stop_epoch = total_epochs if epochs is None else min(total_epochs, start_epoch + int(epochs))

    def record(epoch, logs):
        history.append(dict({k: float(v) for k, v in (logs or {}).items()}, epoch=epoch + 1))

    def extra(finished, logs):
        return {"recipe": recipe, "history": history}

    saver = PretrainCheckpoint(manager, total_epochs=stop_epoch,
                               every_epochs=int((recipe.get("checkpoint") or {}).get(
                                   "every_epochs", 1)), extra=extra)
    guard = StopOnNonFiniteLoss(last_checkpoint=manager.latest)
    if start_epoch < stop_epoch:
        data = epoch_datasets(recipe, images, steps, start_epoch, stop_epoch)
        all_callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=record), guard, saver,
                         keras.callbacks.CSVLogger(os.path.join(output_dir, "log.csv"),
                                                   append=start_epoch > 0)]
        trainer.fit(data, epochs=stop_epoch, initial_epoch=start_epoch, steps_per_epoch=steps,
                    verbose=verbose, callbacks=all_callbacks + list(callbacks))
        if guard.error is not None:
            raise guard.error
    if save_teacher and stop_epoch == total_epochs:
        trainer.teacher_backbone.save_to_preset(os.path.join(output_dir, "teacher"))
    return PretrainResult(trainer=trainer, history=history, output_dir=output_dir,
                          resumed_from=latest)

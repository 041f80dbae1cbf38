"""Training schedules as functions of the step count (REFERENCE.md §1 "Schedules and recipe",
§2 DINO).

Everything here is plain Python/numpy, evaluated on the host once per step and handed to the
train step as numbers (so no schedule ever enters a compiled program).

Convention: a ``*_schedule`` function returns a float64 numpy array with ONE VALUE PER STEP
(length ``total_steps``, index = 0-based step count), as the reference builds them;
``cosine_value`` gives one entry of it in closed form. `Schedules.at(step)` reads every schedule
at a step, holding the last value for steps past the end.

Warmups follow the reference's ``np.linspace(start, base, warmup_steps)``: the first warmup step
has ``start``, the LAST warmup step already has ``base``, and the cosine then starts from
``base`` again.

Gradient clipping is a plain recipe number (the global-norm bound: POA 1.5, DINO 3.0), carried
by `Schedules.clip_grad`; no schedule. Layer-wise lr decay is a property of the model (its layer
ids): ``Backbone.lr_multiplier``; the recipe carries the decay (`Schedules.layer_decay`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# POA's ViT recipe (REFERENCE.md §1 "Schedules and recipe"); `Schedules.from_recipe` falls back
# on these for keys a recipe leaves out.
POA_DEFAULTS = dict(
    lr=0.004,                       # at reference_batch (1024 for the sqrt rule)
    lr_scaling="sqrt",              # lr = 0.004 * sqrt(batch / 1024)
    reference_batch=None,           # None: 1024 for "sqrt", 256 for "linear"
    min_lr=2e-5,
    warmup_epochs=10,
    truncate=0.78,                  # "iter_num_scale": 0.78 ViT, 0.9 Swin, 1.0 ResNet
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum_teacher=0.992,
    final_momentum_teacher=0.9999,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=30,
    freeze_last_layer_epochs=1,
    layer_decay=0.9,                # ResNet 0.95; 1.0 switches it off
    patch_embed_lr_mult=0.2,
    clip_grad=1.5,                  # DINO 3.0; None: no clipping
)

# DINO's recipe (REFERENCE.md §2) in the same keys, for `Schedules.from_recipe`.
DINO_DEFAULTS = dict(
    POA_DEFAULTS, lr=5e-4, lr_scaling="linear", reference_batch=256, min_lr=1e-6, truncate=1.0,
    momentum_teacher=0.996, final_momentum_teacher=1.0, layer_decay=1.0,
    patch_embed_lr_mult=1.0, clip_grad=3.0)

# What `Schedules.from_recipe` reads beside the keys of POA_DEFAULTS: the run's length (no
# default; epochs may be given as steps_per_epoch x epochs) and the reference's name of
# `truncate`.
RUN_KEYS = ("epochs", "steps_per_epoch", "batch_size")
ALIASES = {"iter_num_scale": "truncate"}

_ROUND_GUARD = 1e-9  # total / truncate that is an integer up to float error counts as one


def _check_steps(total_steps, warmup_steps):
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
    if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], "
                         f"got {warmup_steps}")
    return int(total_steps), int(warmup_steps)


def cosine_span(total_steps, warmup_steps=0, truncate=1.0):
    """Length of the full cosine (base -> final) that the truncated schedule cuts at
    total_steps: ``floor(total_steps / truncate) - warmup_steps`` (the reference's
    ``int(total_iters / iter_num_scale) - warmup_iters``)."""
    total_steps, warmup_steps = _check_steps(total_steps, warmup_steps)
    if not 0.0 < truncate <= 1.0:
        raise ValueError(f"truncate (iter_num_scale) must lie in (0, 1], got {truncate}")
    return int(math.floor(total_steps / truncate + _ROUND_GUARD)) - warmup_steps


def _cosine_at(steps, base, final, total_steps, warmup_steps, warmup_start, truncate):
    steps = np.asarray(steps, dtype=np.int64)
    span = cosine_span(total_steps, warmup_steps, truncate)
    if warmup_steps > 1:
        warm = warmup_start + (base - warmup_start) * steps / (warmup_steps - 1)
    else:  # np.linspace(start, base, 1) == [start]
        warm = np.full(steps.shape, float(warmup_start))
    i = steps - warmup_steps
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(span, 1)))
    return np.where(steps < warmup_steps, warm, cos).astype(np.float64)


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0, truncate=1.0):
    """Linear warmup, then (truncated) cosine decay: a float64 array of length total_steps.

    * steps ``s < W`` (W = warmup_steps): ``warmup_start + (base - warmup_start) * s / (W - 1)``
      (np.linspace: step W-1 has ``base``);
    * steps ``s >= W``: ``final + (base - final) / 2 * (1 + cos(pi * (s - W) / n))`` with
      ``n = floor(total_steps / truncate) - W``.

    ``truncate`` is POA's ``iter_num_scale``: the cosine is laid out over ``total / truncate``
    steps and cut at ``total``, so with ``truncate < 1`` the last value stays well above
    ``final`` (0.78 ViT, 0.9 Swin, 1.0 ResNet/DINO). Even at ``truncate=1`` the last value is
    one step short of ``final``, as in DINO.
    """
    total_steps, warmup_steps = _check_steps(total_steps, warmup_steps)
    return _cosine_at(np.arange(total_steps), base, final, total_steps, warmup_steps,
                      warmup_start, truncate)


def cosine_value(step, base, final, total_steps, warmup_steps=0, warmup_start=0.0,
                 truncate=1.0):
    """``cosine_schedule(...)[step]`` in closed form, without building the array; steps past
    the end give the last value."""
    total_steps, warmup_steps = _check_steps(total_steps, warmup_steps)
    step = _check_step(step, total_steps)
    return float(_cosine_at(step, base, final, total_steps, warmup_steps, warmup_start,
                            truncate))


def linear_warmup_schedule(start, end, warmup_steps, total_steps):
    """``start`` -> ``end`` linearly over the first warmup_steps (np.linspace, so step
    warmup_steps-1 has ``end``), then ``end``: float64 array of length total_steps. A warmup
    longer than the run is cut at total_steps."""
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps}")
    values = np.full(int(total_steps), float(end))
    warm = np.linspace(float(start), float(end), int(warmup_steps))[:int(total_steps)]
    values[:len(warm)] = warm
    return values


def teacher_temp_schedule(total_steps, warmup_steps, start=0.04, end=0.07):
    """Teacher temperature: linear warmup 0.04 -> 0.07 (over 30 epochs in the reference), then
    constant. Per step, as POA does (DINO steps it per epoch)."""
    return linear_warmup_schedule(start, end, warmup_steps, total_steps)


def weight_decay_schedule(total_steps, start=0.04, end=0.4, truncate=1.0):
    """Weight decay rising 0.04 -> 0.4 along a cosine, no warmup (POA truncates it too)."""
    return cosine_schedule(start, end, total_steps, truncate=truncate)


def momentum_schedule(total_steps, start=0.992, end=0.9999, truncate=1.0):
    """Teacher EMA momentum 0.992 -> 0.9999 (POA; DINO 0.996 -> 1) along a cosine, no warmup."""
    return cosine_schedule(start, end, total_steps, truncate=truncate)


def last_layer_lr_schedule(lr, freeze_steps):
    """The lr of the heads' weight-normalised last layers: ``lr`` with the first freeze_steps
    set to 0 (the last layer is frozen during the first epoch). Returns a new array."""
    if int(freeze_steps) != freeze_steps or freeze_steps < 0:
        raise ValueError(f"freeze_steps must be a non-negative integer, got {freeze_steps}")
    out = np.array(lr, dtype=np.float64, copy=True)
    out[:int(freeze_steps)] = 0.0
    return out


def scaled_lr(base_lr, batch_size, rule="sqrt", reference_batch=None):
    """Learning rate for a batch size from the rate at a reference batch.

    rule "sqrt" (POA, DINOv2): ``base_lr * sqrt(batch / reference)``, reference 1024 by default
    (0.004 -> 0.004 * sqrt(batch / 1024)); "linear" (DINO, MAE): ``base_lr * batch / reference``,
    reference 256 by default (5e-4 * batch / 256); "none": base_lr unchanged.
    """
    rules = ("sqrt", "linear", "none")
    if rule not in rules:
        raise ValueError(f"unknown lr scaling rule {rule!r}; valid: {rules}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if reference_batch is None:
        reference_batch = 1024 if rule == "sqrt" else 256
    if reference_batch <= 0:
        raise ValueError(f"reference_batch must be positive, got {reference_batch}")
    ratio = batch_size / reference_batch
    if rule == "sqrt":
        return float(base_lr * math.sqrt(ratio))
    if rule == "linear":
        return float(base_lr * ratio)
    return float(base_lr)


# -- per-variable weight decay -------------------------------------------------------------------
def warmup_cosine_lr(recipe, steps_per_epoch=None):
    """The per-step learning rate of a recipe in epochs (SimSiam, SSQL, MAE): a float64 array
    of length epochs x steps_per_epoch, a linear warmup from 0 over ``warmup_epochs`` (at most
    the run), then a cosine from ``scaled_lr(lr, batch_size, lr_scaling, reference_batch)`` to
    ``min_lr`` (``cosine_schedule``). ``recipe`` holds every key (defaults merged in);
    ``steps_per_epoch`` defaults to the recipe's."""
    steps_per_epoch = recipe.get("steps_per_epoch") if steps_per_epoch is None \
        else steps_per_epoch
    for what, value in (("epochs", recipe.get("epochs")), ("steps_per_epoch", steps_per_epoch),
                        ("batch_size", recipe.get("batch_size"))):
        if value is None:
            raise ValueError(f"the recipe needs {what!r}")
    steps_per_epoch = int(steps_per_epoch)
    total = int(round(float(recipe["epochs"]) * steps_per_epoch))
    warmup = int(round(float(recipe["warmup_epochs"]) * steps_per_epoch))
    if warmup < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {recipe['warmup_epochs']}")
    base = scaled_lr(float(recipe["lr"]), int(recipe["batch_size"]), recipe["lr_scaling"],
                     recipe["reference_batch"])
    return cosine_schedule(base, float(recipe["min_lr"]), total, min(warmup, total))


class PerStepLearningRate:
    """For trainers with a precomputed ``self.lr_schedule`` (one value per step)."""

    @property
    def total_steps(self):
        return len(self.lr_schedule)

    def learning_rate_at(self, step):
        """The learning rate of the 0-based step (the last value past the end)."""
        return float(self.lr_schedule[min(int(step), self.total_steps - 1)])


def weight_decay_multiplier(shape):
    """1.0 for weights with more than one dimension, 0.0 for biases, norm/LayerScale gains and
    other vectors (DINO's rule: no decay on parameters with ndim <= 1)."""
    return 1.0 if len(tuple(shape)) > 1 else 0.0


# Variables without weight decay besides every variable of at most one dimension (biases, norm
# gains and biases, LayerScale): timm's VisionTransformer.no_weight_decay(), and TinyViT's
# attention-bias tables (its official no_weight_decay_keywords).
NO_WEIGHT_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "dist_token",
                         "attention_biases")


def no_weight_decay(variable):
    """Whether AdamW leaves ``variable`` alone in supervised training (fine-tuning, TinyViT's
    distillation; MAE-Lite / timm / TinyViT): vectors (``weight_decay_multiplier`` 0), the cls /
    distillation / mask tokens, the position embeddings and TinyViT's attention-bias tables."""
    return (weight_decay_multiplier(variable.shape) == 0.0
            or variable.name in NO_WEIGHT_DECAY_NAMES)


# -- the bundle ----------------------------------------------------------------------------------
def _check_step(step, total_steps):
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    return min(int(step), total_steps - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedules:
    """Every per-step schedule of a run (arrays of length total_steps) and the recipe numbers
    that go with them. ``at(step)`` reads them all at one step."""

    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    clip_grad: float | None = None
    layer_decay: float = 1.0
    patch_embed_lr_mult: float = 1.0

    @property
    def total_steps(self):
        return len(self.lr)

    def at(self, step):
        """{"lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp"} as Python floats
        at a 0-based step; steps past the end hold the last value."""
        i = _check_step(step, self.total_steps)
        return {name: float(getattr(self, name)[i])
                for name in ("lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp")}

    @classmethod
    def from_recipe(cls, recipe, steps_per_epoch=None, batch_size=None, defaults=None):
        """Builds the schedules of a recipe dict.

        Keys (missing ones come from `defaults`, POA_DEFAULTS unless given; keys not listed here
        are ignored, so a recipe may carry its other settings too):
        epochs, steps_per_epoch, batch_size (global), lr (at reference_batch), lr_scaling
        ("sqrt" | "linear" | "none"), reference_batch, min_lr, warmup_epochs, truncate (alias
        iter_num_scale), weight_decay, weight_decay_end, momentum_teacher,
        final_momentum_teacher, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
        freeze_last_layer_epochs, layer_decay, patch_embed_lr_mult, clip_grad.
        Epoch counts may be fractional; they are rounded to whole steps.

        As in POA, lr, weight decay and momentum are truncated by the same `truncate`.
        """
        r = dict(POA_DEFAULTS if defaults is None else defaults)
        r.update(recipe)
        if "iter_num_scale" in recipe and "truncate" not in recipe:
            r["truncate"] = recipe["iter_num_scale"]
        steps_per_epoch = steps_per_epoch if steps_per_epoch is not None \
            else r.get("steps_per_epoch")
        batch_size = batch_size if batch_size is not None else r.get("batch_size")
        for what, value in (("epochs", r.get("epochs")), ("steps_per_epoch", steps_per_epoch),
                            ("batch_size", batch_size)):
            if value is None:
                raise ValueError(f"the recipe needs {what!r} (or pass it to from_recipe)")
        steps_per_epoch = int(steps_per_epoch)
        epoch_steps = lambda epochs: int(round(float(epochs) * steps_per_epoch))  # noqa: E731
        total = epoch_steps(r["epochs"])
        truncate = float(r["truncate"])
        base_lr = scaled_lr(r["lr"], batch_size, r["lr_scaling"], r["reference_batch"])
        lr = cosine_schedule(base_lr, r["min_lr"], total, epoch_steps(r["warmup_epochs"]),
                             0.0, truncate)
        return cls(
            lr=lr,
            last_layer_lr=last_layer_lr_schedule(
                lr, min(total, epoch_steps(r["freeze_last_layer_epochs"]))),
            weight_decay=weight_decay_schedule(total, r["weight_decay"], r["weight_decay_end"],
                                               truncate),
            momentum=momentum_schedule(total, r["momentum_teacher"],
                                       r["final_momentum_teacher"], truncate),
            teacher_temp=teacher_temp_schedule(total, epoch_steps(r["warmup_teacher_temp_epochs"]),
                                               r["warmup_teacher_temp"], r["teacher_temp"]),
            clip_grad=None if r["clip_grad"] is None else float(r["clip_grad"]),
            layer_decay=float(r["layer_decay"]),
            patch_embed_lr_mult=float(r["patch_embed_lr_mult"]),
        )

"""Compiled inference forwards of a backbone, one per (subnet, training, call options) plan.

Backend-specific on purpose: eager JAX compiles every op of every new shape separately, which
makes an eager ViT forward seconds slow; a jitted stateless call compiles the whole graph once
per plan. TensorFlow gets a tf.function, PyTorch runs eagerly without autograd.
"""
from __future__ import annotations

import inspect
import weakref

import keras

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model, subnet=None, training=False, **options):
    """A callable images -> outputs of ``model(images, subnet=subnet, training=training,
    **options)``; ``options`` are boolean flags of the model's call (``return_blocks`` of the
    ViT, ``return_feature_maps`` of Swin and ResNet), fixed when the program is built.

    The model's current weights are read at every call, so the callable stays valid while the
    weights change (e.g. during training)."""
    spec = model.resolve_subnet(subnet)
    options = _check_options(model, options)
    cache = _CACHE.setdefault(model, {})
    key = (spec, bool(training), tuple(sorted(options.items())))
    if key not in cache:
        cache[key] = _build(model, spec, bool(training), options)
    return cache[key]


def _check_options(model, options):
    valid = sorted(name for name, p in inspect.signature(model.call).parameters.items()
                   if isinstance(p.default, bool) and name != "training")
    for name, value in options.items():
        if name not in valid:
            raise TypeError(f"{type(model).__name__}.compiled_forward got an unknown option "
                            f"{name!r}; its call options: {valid}")
        if not isinstance(value, bool):
            raise TypeError(f"option {name}={value!r} must be True or False")
    return {name: value for name, value in options.items() if value}  # False: the default


def _build(model, spec, training, options):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def stateless(trainable, non_trainable, images):
            out, _ = model.stateless_call(trainable, non_trainable, images, subnet=spec,
                                          training=training, **options)
            return out

        def forward(images):
            return stateless([v.value for v in model.trainable_variables],
                             [v.value for v in model.non_trainable_variables], images)
        return forward
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.function(lambda images: model(images, subnet=spec, training=training,
                                                **options), reduce_retracing=True)
    if backend == "torch":
        import torch

        def forward(images):
            with torch.no_grad():
                return model(images, subnet=spec, training=training, **options)
        return forward
    return lambda images: model(images, subnet=spec, training=training, **options)

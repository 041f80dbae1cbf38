"""Compiled inference forwards of a backbone, one per (subnet, training) plan.

Backend-specific on purpose: eager JAX compiles every op of every new shape separately, which
makes an eager ViT forward seconds slow; a jitted stateless call compiles the whole graph once
per plan. TensorFlow gets a tf.function, PyTorch runs eagerly without autograd.
"""
from __future__ import annotations

import weakref

import keras

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model, subnet=None, training=False):
    """A callable images -> outputs of ``model(images, subnet=subnet, training=training)``.

    The model's current weights are read at every call, so the callable stays valid while the
    weights change (e.g. during training)."""
    spec = model.resolve_subnet(subnet)
    cache = _CACHE.setdefault(model, {})
    key = (spec, bool(training))
    if key not in cache:
        cache[key] = _build(model, spec, bool(training))
    return cache[key]


def _build(model, spec, training):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def stateless(trainable, non_trainable, images):
            out, _ = model.stateless_call(trainable, non_trainable, images, subnet=spec,
                                          training=training)
            return out

        def forward(images):
            return stateless([v.value for v in model.trainable_variables],
                             [v.value for v in model.non_trainable_variables], images)
        return forward
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.function(lambda images: model(images, subnet=spec, training=training),
                           reduce_retracing=True)
    if backend == "torch":
        import torch

        def forward(images):
            with torch.no_grad():
                return model(images, subnet=spec, training=training)
        return forward
    return lambda images: model(images, subnet=spec, training=training)

"""Compiled inference forwards of a backbone, one per (subnet, training, call options) plan: the
one place for per-backend inference code (evaluation, the sweep, export and the CLI all call
``model.compiled_forward(...)``).

Backend-specific on purpose: eager JAX compiles every op of every new shape separately, which
makes an eager ViT forward seconds slow; a jitted stateless call compiles the whole graph once
per plan. TensorFlow gets a tf.function, PyTorch runs eagerly without autograd.

On JAX a program is shared by every model of the same architecture (class, configuration but
its name, and variable structure: paths, shapes, dtypes): it is a function of the variables'
values, so an extracted subnet, its reloaded preset and an exported copy run the program
compiled for the first of them instead of compiling the same graph again (seconds for a Swin on
a small CPU).
"""
from __future__ import annotations

import inspect
import json
import weakref

import keras

_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {plan: fn}
_JAX_PROGRAMS: dict = {}   # (architecture, plan) -> (weakref to the tracing model, program)


def compiled_forward(model, subnet=None, training=False, **options):
    """A callable images -> outputs of ``model(images, subnet=subnet, training=training,
    **options)``; ``options`` are boolean flags of the model's call (``return_blocks`` of the
    ViT, ``return_feature_maps`` of Swin and ResNet), fixed when the program is built.

    The model's current weights are read at every call, so the callable stays valid while the
    weights change (e.g. during training)."""
    spec = model.resolve_subnet(subnet)
    options = _check_options(model, options)
    cache = _FORWARDS.setdefault(model, {})
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


def architecture_key(model):
    """What a compiled program of ``model`` depends on: its class, its configuration (without
    the names, which only label it) and its variables' paths (below the model's own name),
    shapes and dtypes (an int8-quantized model differs from its float self). None for a model
    whose configuration cannot be written (its programs are then its own)."""
    try:
        config = dict(model.get_config())
    except (NotImplementedError, TypeError):
        return None
    for name in ("name", "named_subnets", "preprocessing"):   # labels: the forward is the same
        config.pop(name, None)
    variables = tuple((v.path.split("/", 1)[-1], tuple(v.shape), str(v.dtype))
                      for v in model.variables)
    return (type(model).__module__, type(model).__qualname__,
            json.dumps(config, sort_keys=True, default=repr), variables)


def _jax_program(model, spec, training, options):
    """The jitted stateless forward of this architecture and plan (built, or shared)."""
    import jax

    arch = architecture_key(model)
    key = (("model", id(model)) if arch is None else arch, spec, training,
           tuple(sorted(options.items())))
    entry = _JAX_PROGRAMS.get(key)
    if entry is not None and entry[0]() is not None:
        return entry[1]
    ref = weakref.ref(model)

    @jax.jit
    def program(trainable, non_trainable, images):
        out, _ = ref().stateless_call(trainable, non_trainable, images, subnet=spec,
                                      training=training, **options)
        return out

    _JAX_PROGRAMS[key] = (ref, program)
    # The entry goes with the model that traces it (a later model of the same architecture
    # builds it anew), so no program outlives every model that can run it.
    weakref.finalize(model, _drop_program, key, ref)
    return program


def _drop_program(key, ref):
    entry = _JAX_PROGRAMS.get(key)
    if entry is not None and entry[0] is ref:
        del _JAX_PROGRAMS[key]


def _build(model, spec, training, options):
    backend = keras.backend.backend()
    if backend == "jax":
        def forward(images):
            program = _jax_program(model, spec, training, options)
            return program([v.value for v in model.trainable_variables],
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

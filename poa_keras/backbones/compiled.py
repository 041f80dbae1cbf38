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

Two more kinds of forward serve post-training quantization (``eval/ptq.py``):

* ``compiled_forward(model, subnet, quantized=True)``: ``forward(images, weight_bits,
  activation_bits)``, fake-quantized with the activation ranges stored in the model
  (``QuantConfig(weight_bits, activation_bits, ranges="calibrated")``). The bit-widths are
  run-time scalars (JAX: arguments of the jitted stateless call; TensorFlow: tf.function
  arguments; PyTorch: eager), so ONE program serves every bit pair, float (32) included
  (DESIGN contract 6). ``forward.traces()`` counts the traces of its program.
* ``calibration_forward(model, subnet)``: ``observe(images)``, a float forward in the
  "observe" range mode that widens every activation quantizer's stored [low, high] to the
  batch's min / max. On JAX a jitted program returns the new ranges (its stateless call
  collects the assignments), which are written back into the model; TensorFlow and PyTorch
  run it eagerly (PyTorch without autograd).
"""
from __future__ import annotations

import inspect
import json
import weakref

import keras

from poa_keras.quantization.fake import FLOAT_BITS
from poa_keras.quantization.observer import QuantConfig, activation_quantizers

_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {plan: fn}
_JAX_PROGRAMS: dict = {}   # (architecture, plan) -> (weakref to the tracing model, program)
_TRACES: dict = {}         # a quantized / calibration program's key -> times it was traced


def compiled_forward(model, subnet=None, training=False, quantized=False, **options):
    """A callable images -> outputs of ``model(images, subnet=subnet, training=training,
    **options)``; ``options`` are boolean flags of the model's call (``return_blocks`` of the
    ViT, ``return_feature_maps`` of Swin and ResNet), fixed when the program is built.

    ``quantized=True`` gives ``forward(images, weight_bits, activation_bits)`` instead: the
    fake-quantized forward ``model(images, subnet=subnet, training=training,
    quant=QuantConfig(weight_bits, activation_bits, ranges="calibrated"))`` with the bit-widths
    (2..8, or 32: float) as run-time values, one program for every pair; ``forward.traces()``
    is the number of times its program was traced (JAX, TensorFlow; 0 on eager PyTorch).

    The model's current weights are read at every call, so the callable stays valid while the
    weights change (e.g. during training, or a calibration)."""
    spec = model.resolve_subnet(subnet)
    options = _check_options(model, options)
    if not isinstance(quantized, bool):
        raise TypeError(f"quantized={quantized!r} must be True or False")
    cache = _FORWARDS.setdefault(model, {})
    key = (spec, bool(training), tuple(sorted(options.items())))
    if quantized:
        key = ("quantized",) + key
    if key not in cache:
        build = _build_quantized if quantized else _build
        cache[key] = build(model, spec, bool(training), options)
    return cache[key]


def calibration_forward(model, subnet=None):
    """A callable ``observe(images)``: the float forward of ``model(images, subnet=subnet,
    training=False)`` in the "observe" range mode, which widens the stored range of every
    activation quantizer it runs to include the batch's min / max (``reset_range`` them
    first; ``eval.ptq.calibrate`` does both). Returns nothing; ``observe.traces()`` as
    ``compiled_forward``'s."""
    spec = model.resolve_subnet(subnet)
    cache = _FORWARDS.setdefault(model, {})
    key = ("observe", spec)
    if key not in cache:
        cache[key] = _build_observer(model, spec)
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
    shapes, dtypes (an int8-quantized model differs from its float self) and trainability
    (a partly frozen model passes its variables split otherwise). None for a model
    whose configuration cannot be written (its programs are then its own)."""
    try:
        config = dict(model.get_config())
    except (NotImplementedError, TypeError):
        return None
    for name in ("name", "named_subnets", "preprocessing"):   # labels: the forward is the same
        config.pop(name, None)
    # trainability too: a program maps the trainable and the non-trainable variables apart
    variables = tuple((v.path.split("/", 1)[-1], tuple(v.shape), str(v.dtype), v.trainable)
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
    if entry is not None and _owner_unchanged(entry[0], arch):
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


def _owner_unchanged(ref, arch):
    """Whether a cached program's model still exists and still has the architecture it was
    cached under: a new input shape retraces the program with that model, so one changed since
    (e.g. int8-quantized, or partly frozen) must not serve the models of the old key."""
    owner = ref()
    return owner is not None and (arch is None or architecture_key(owner) == arch)


def _drop_program(key, ref):
    entry = _JAX_PROGRAMS.get(key)
    if entry is not None and entry[0] is ref:
        del _JAX_PROGRAMS[key]


def _counted(key):
    """(count, tick): ``tick()`` inside a traced function counts its traces under ``key``."""
    _TRACES.setdefault(key, 0)

    def tick():
        _TRACES[key] = _TRACES.get(key, 0) + 1

    return (lambda: _TRACES.get(key, 0)), tick


def _quant(weight_bits, activation_bits):
    return QuantConfig(weight_bits, activation_bits, ranges="calibrated")


def _build_quantized(model, spec, training, options):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import numpy as np

        arch = architecture_key(model)
        key = (("model", id(model)) if arch is None else arch, "quantized", spec, training,
               tuple(sorted(options.items())))
        traces, tick = _counted(key)
        ref = weakref.ref(model)

        def build():
            @jax.jit
            def program(trainable, non_trainable, images, weight_bits, activation_bits):
                tick()
                out, _ = ref().stateless_call(trainable, non_trainable, images, subnet=spec,
                                              training=training,
                                              quant=_quant(weight_bits, activation_bits),
                                              **options)
                return out
            return program

        def forward(images, weight_bits, activation_bits):
            program = _shared_program(model, key, ref, build)
            # float32 scalars: one abstract signature for every pair (no retrace per value)
            return program([v.value for v in model.trainable_variables],
                           [v.value for v in model.non_trainable_variables], images,
                           np.float32(weight_bits), np.float32(activation_bits))
        forward.traces = traces
        return forward
    if backend == "tensorflow":
        import tensorflow as tf

        traces, tick = _counted(("model", id(model), "quantized", spec, training,
                                 tuple(sorted(options.items()))))

        @tf.function(reduce_retracing=True)
        def program(images, weight_bits, activation_bits):
            tick()
            return model(images, subnet=spec, training=training,
                         quant=_quant(weight_bits, activation_bits), **options)

        def forward(images, weight_bits, activation_bits):
            return program(images, tf.constant(weight_bits, tf.float32),
                           tf.constant(activation_bits, tf.float32))
        forward.traces = traces
        return forward

    def forward(images, weight_bits, activation_bits):
        # eager: Python ints (a float pair skips the quantizers' ops altogether)
        with _no_grad():
            return model(images, subnet=spec, training=training,
                         quant=_quant(int(weight_bits), int(activation_bits)), **options)
    forward.traces = lambda: 0
    return forward


def _build_observer(model, spec):
    observe_quant = QuantConfig(FLOAT_BITS, FLOAT_BITS, ranges="observe")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        arch = architecture_key(model)
        key = (("model", id(model)) if arch is None else arch, "observe", spec)
        traces, tick = _counted(key)
        ref = weakref.ref(model)

        def build():
            @jax.jit
            def program(trainable, non_trainable, images):
                tick()
                _, non_trainable = ref().stateless_call(trainable, non_trainable, images,
                                                        subnet=spec, training=False,
                                                        quant=observe_quant)
                return non_trainable
            return program

        def observe(images):
            program = _shared_program(model, key, ref, build)
            variables = model.non_trainable_variables
            new = program([v.value for v in model.trainable_variables],
                          [v.value for v in variables], images)
            # write back the ranges only: nothing else changes in an inference forward
            ranges = {id(q.range) for q in activation_quantizers(model)}
            for variable, value in zip(variables, new):
                if id(variable) in ranges:
                    variable.assign(value)
        observe.traces = traces
        return observe

    def observe(images):
        with _no_grad():
            model(images, subnet=spec, training=False, quant=observe_quant)
    observe.traces = lambda: 0
    return observe


def _shared_program(model, key, ref, build):
    """The jitted program under ``key`` (shared by models of one architecture, as
    ``_jax_program``), built by ``build()`` for ``model`` when there is none."""
    entry = _JAX_PROGRAMS.get(key)
    if entry is not None and _owner_unchanged(entry[0], None if key[0][0] == "model" else key[0]):
        return entry[1]
    program = build()
    _JAX_PROGRAMS[key] = (ref, program)
    weakref.finalize(model, _drop_program, key, ref)
    return program


def _no_grad():
    if keras.backend.backend() == "torch":
        import torch
        return torch.no_grad()
    import contextlib
    return contextlib.nullcontext()


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

"""The training step every trainer in methods/ shares, one per backend (DESIGN contracts 5, 6).

A trainer subclasses `PlannedTrainer` and writes only backend-agnostic code (keras.ops):

* ``next_plan()`` -- on the host, before every step: a hashable value that fixes the step's
  shape-changing choices (which subnet the elastic student runs, which bit-widths, whether the
  last layer is frozen). It is a Python value inside the step, never a tensor.
* ``compute_loss_and_logs(data, plan, training=True)`` -> ``(loss, logs)``: the forward and the
  loss (a scalar) plus a dict of scalar logs.
* ``after_optimizer_step(plan)`` -- inside the step, after the optimizer update: updates of
  non-trainable state (EMA teacher, centers) written with ``variable.assign``.
* ``step_hyperparameters(step)`` -> dict of floats, on the host, from the 0-based step count:
  ``learning_rate`` and ``weight_decay`` are given to the optimizer; every entry (those two
  included) is readable inside the step as ``self.step_values[name]``, a float32 scalar tensor
  that is an ARGUMENT of the compiled program, so a schedule never causes a recompilation.
* ``step_choices()`` -> dict of fixed-shape float arrays, on the host right after
  ``next_plan``: the step's run-time choices that do not change shapes (a block keep mask for
  the elastic depth, bit-widths), readable inside the step as ``self.step_values[name]`` like
  the hyperparameters: ARGUMENTS of the program, so they never cause a recompilation (DESIGN
  contract 6: only shape-changing choices belong in the plan).
* ``host_logs()`` -> dict of numbers known on the host (e.g. the drawn subnet's size), merged
  into the step's logs.
* ``frozen_variables(plan)`` -> trainable variables that this step leaves untouched (no gradient
  update, no weight decay, no optimizer-moment update), like a PyTorch parameter whose ``.grad``
  is None (DINO's last-layer freeze).
* ``lr_multipliers()`` -> None, or one entry per trainable variable (``trainable_variables``
  order): a float, or a pair ``(factor, name)`` meaning ``factor * self.step_values[name]`` (a
  per-step value, e.g. 0 while a layer is frozen). Each variable whose multiplier is not the
  constant 1 gets its optimizer update scaled by ``poa_keras.optimizers.scaled_update``:
  ``new = old + m * (optimizer_new - old)``, a PyTorch parameter group with lr ``m * lr`` for
  AdamW, Adam, Lion and plain SGD (that module says when exactly). The gradient, its clipping
  norm and the optimizer moments are those of the unscaled step, as with param groups.
* ``no_weight_decay_variables()`` -> trainable variables the optimizer must not decay (biases,
  norms: DINO's ndim <= 1 rule). Registered in the optimizer's exclusion set (the one Keras'
  ``optimizer.exclude_from_weight_decay`` fills) whenever a train function is made, i.e. before
  the first step and again after every ``compile``.

Both hooks are read once per train function (made at the first ``fit``/``train_on_batch``
after ``compile``): the constant multipliers are constants of every compiled program, the
``(factor, name)`` ones read their step value, so neither causes a recompilation.

How the step runs per backend:

* JAX: one ``jax.jit`` of a stateless step per plan. The state (trainable, non-trainable,
  optimizer and metrics values) is threaded as Keras' own JAX trainer does: the forward runs in a
  ``StatelessScope`` mapping every variable to its current value inside ``jax.value_and_grad``,
  non-trainable/metric values it assigns are collected from the scope, the optimizer runs
  ``stateless_apply``, and ``after_optimizer_step`` runs in a second ``StatelessScope`` over the
  updated values whose assignments become the new state. The scheduled learning rate is written
  into the optimizer's ``learning_rate`` entry of the state (a host-side assign would be lost:
  during ``fit`` JAX keeps the state outside the variables).
* TensorFlow: one ``tf.function`` per plan around a ``GradientTape`` step.
* PyTorch: eager autograd; the plan is a Python value, nothing is compiled.

Every trace of a step program is counted (a Python side effect that runs only while tracing),
so ``num_compilations`` is what was really compiled -- a plan traced twice (e.g. a new batch
shape) counts twice. ``compilation_report()`` summarises; the count is also in the logs
(``compilations``). ``max_plans`` bounds the number of distinct compiled plans.

Precision: float32, or ``mixed_bfloat16`` (build the models under that policy: variables, the
EMA teacher's and the optimizer's state stay float32, the losses compute in float32); float16
computation (``mixed_float16``) is refused, since it needs loss scaling.

Several devices (JAX): under a ``keras.distribution.DataParallel`` distribution (built, with the
trainer, its teacher and its optimizer, inside ``distribution.scope()``), ``fit`` and
``train_on_batch`` shard every batch over the devices and keep the weights replicated; the
steps equal the single-device ones (batch statistics become global-batch statistics, as
SPMD computes them). Multi-crop batches hold their views first, ``(views, B, ...)`` (the
``VIEW_MAJOR_KEYS`` of a dict batch), and Keras shards the first axis of every leaf: the
views are moved behind the batch axis on the host and back at the start of the step. Each
plan's program is compiled with the state's shardings as its output shardings (as Keras' own
JAX trainer does), so the state never moves. The per-step scalars are a separate argument,
never part of the sharded batch. A batch that does not divide the data axis is refused
before any step. ModelParallel layouts (sharded weights) are not set up yet (issue 18).

Not supported: loss scaling (LossScaleOptimizer / ``loss_scale_factor``), gradient accumulation,
multi-replica tf.distribute strategies, ``torch.compile``; ``keras.distribution`` on the
TensorFlow and PyTorch backends (refused: Keras distributes through JAX's partitioner only).
"""
from __future__ import annotations

import collections
import contextlib
import warnings

import keras
import numpy as np
from keras import ops

from poa_keras.methods import torch_fused
from poa_keras.optimizers import scaled_update

# PyTorch's clip_grad_norm_ divides by (norm + 1e-6); the reference recipes clip with it.
_CLIP_EPS = 1e-6


#: Leaves of a multi-crop batch (data/multicrop.py) whose first axis is the view, (V, B, ...).
VIEW_MAJOR_KEYS = ("global", "local", "masks")


def swap_views(data, swap):
    """``data`` with axes 0 and 1 of its ``VIEW_MAJOR_KEYS`` leaves exchanged by ``swap(leaf)``
    (view-major <-> batch-major); anything but a dict is returned as it is."""
    if not isinstance(data, dict):
        return data
    return {k: swap(v) if k in VIEW_MAJOR_KEYS and v is not None else v
            for k, v in data.items()}


def batch_sizes(data, shape_of):
    """{leaf name: batch size} of a batch (``shape_of(leaf)`` -> its shape): axis 1 of the
    view-major leaves, axis 0 of the others; None where unknown."""
    leaves = data.items() if isinstance(data, dict) else enumerate(
        data if isinstance(data, (tuple, list)) else [data])
    sizes = {}
    for name, leaf in leaves:
        if leaf is None:
            continue
        shape = tuple(shape_of(leaf))
        axis = 1 if isinstance(data, dict) and name in VIEW_MAJOR_KEYS else 0
        sizes[str(name)] = shape[axis] if len(shape) > axis else None
    return sizes


def _strip_trailing_none(data):
    """``train_on_batch`` passes ``(x, y, None)``; fit passes what the dataset yields. Trailing
    None entries are dropped so that a trainer sees the same structure from both."""
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        while len(data) > 1 and data[-1] is None:
            data = data[:-1]
        if len(data) == 1:
            data = data[0]
    return data


class _PlanState:
    """Host-side bookkeeping of a PlannedTrainer (a plain object so Keras does not track it)."""

    def __init__(self):
        self.programs = {}                        # plan -> compiled step (jax / tensorflow)
        self.traces = collections.Counter()       # plan -> number of traces of its program
        self.plans_seen = set()
        self.host_step = None                     # 0-based step count of the next step
        self.step_values = None                   # dict of scalars while a step runs/traces
        self.last_plan = None
        self.update_scales = ()                   # (index, factor, step value name or None)
        self.batch_major = False                  # views moved behind the batch (distributed)


class PlannedTrainer(keras.Model):
    """Base class of trainers whose steps depend on a host-drawn, hashable plan.

    Args:
        clip_grad: bound on the global gradient norm (PyTorch ``clip_grad_norm_`` semantics:
            gradients are scaled by ``min(1, clip_grad / (norm + 1e-6))``); None: no clipping.
            Also settable later as the ``clip_grad`` attribute (before the first step).
        max_plans: if set, a step with a new plan once this many plans have been compiled raises
            RuntimeError (a guard against an unbounded plan space).
        **kwargs: passed to ``keras.Model``.

    Use with ``compile(optimizer=...)`` (no ``loss``/``metrics``) and ``fit(...)``. The layers
    and variables must be built before ``fit`` (build them in ``__init__``): the model has no
    ``call`` that Keras could trace to build them.
    """

    # PyTorch: the per-variable loops of a step (gradient norm, clipping, lr-multiplier
    # scaling, the EMA teacher) run as multi-tensor calls (methods/torch_fused.py); False: the
    # generic keras.ops loops (the same arithmetic; tests pin one to the other).
    fused_updates = True

    def __init__(self, clip_grad=None, max_plans=None, **kwargs):
        super().__init__(**kwargs)
        self.clip_grad = clip_grad
        self.max_plans = max_plans
        self._plan_state = _PlanState()

    # ----------------------------------------------------------------- what subclasses write
    def next_plan(self):
        """The plan of the next step (hashable). Runs on the host once per step."""
        return None

    def compute_loss_and_logs(self, data, plan, training=True):
        """Returns ``(loss, logs)``: a scalar loss and a dict of scalar logs (keras.ops)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute_loss_and_logs(data, plan, training)")

    def after_optimizer_step(self, plan):
        """Updates non-trainable state after the optimizer step (``variable.assign``)."""

    def step_hyperparameters(self, step):
        """Per-step values from the 0-based step count (host, numbers): see the module doc."""
        return {}

    def step_choices(self):
        """Run-time per-step choices (see the module doc): {name: fixed-shape float array}.
        Runs on the host after ``next_plan``, once per step."""
        return {}

    def host_logs(self):
        """{name: number} known on the host, added to the logs of the last step."""
        return {}

    def frozen_variables(self, plan):
        """Trainable variables that the step with this plan must leave untouched."""
        return ()

    def lr_multipliers(self):
        """Per-variable learning-rate multipliers (see the module doc), or None for all 1.

        One entry per ``self.trainable_variables``: a float, or ``(factor, name)`` for
        ``factor * self.step_values[name]``. Read when a train function is made."""
        return None

    def no_weight_decay_variables(self):
        """Trainable variables the optimizer must not decay. Read when a train function is
        made (before the first step, again after every ``compile``)."""
        return ()

    # ------------------------------------------------------------------------- what they get
    @property
    def step_values(self):
        """The current step's ``step_hyperparameters`` as float32 scalars (inside a step only)."""
        values = self._plans.step_values
        if values is None:
            raise RuntimeError("step_values is only available inside a training step")
        return values

    @property
    def compiled_plans(self):
        """The plans for which a step program has been compiled (empty on PyTorch)."""
        return set(self._plans.traces)

    @property
    def num_compilations(self):
        """How many times a step program was traced/compiled, over all plans."""
        return sum(self._plans.traces.values())

    @property
    def plans_seen(self):
        """Every plan a step has run with (every backend)."""
        return set(self._plans.plans_seen)

    @property
    def last_plan(self):
        return self._plans.last_plan

    @property
    def host_step(self):
        """The 0-based count of the next step, kept on the host (None before the first step
        or ``fit``); exact inside ``fit`` on every backend, where reading the optimizer's
        iteration variable would wait on the device (and, on JAX, read a stale value)."""
        return self._plans.host_step

    def compilation_report(self):
        """A JSON-friendly summary of the compiled step programs."""
        traces = self._plans.traces
        return {
            "backend": keras.backend.backend(),
            "plans_seen": len(self._plans.plans_seen),
            "compiled_plans": len(traces),
            "num_compilations": sum(traces.values()),
            "traces_per_plan": {repr(p): n for p, n in traces.items()},
        }

    # ------------------------------------------------------------------------ Keras plumbing
    @property
    def _plans(self):
        state = self.__dict__.get("_plan_state")
        if state is None:  # a subclass that did not call our __init__ first
            state = _PlanState()
            self._plan_state = state
        return state

    def fit(self, *args, **kwargs):
        self._prepare_fit()
        args, kwargs = self._distributed_input(args, kwargs)
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        self._prepare_fit()
        args, kwargs = self._distributed_input(args, kwargs)
        return super().train_on_batch(*args, **kwargs)

    # -------------------------------------------------------------- several devices (JAX)
    def _distributed_input(self, args, kwargs):
        """Under a ``keras.distribution`` distribution: checks the backend and the batch size
        against the data axis, and moves the views of multi-crop batches behind the batch axis
        (Keras shards axis 0). Without one: unchanged."""
        distribution = keras.distribution.distribution()
        self._plans.batch_major = distribution is not None
        if distribution is None:
            return args, kwargs
        backend = keras.backend.backend()
        if backend != "jax":
            raise ValueError(f"{type(self).__name__} trains under a keras.distribution "
                             f"distribution on the JAX backend only, not {backend!r} (Keras "
                             "distributes through JAX's SPMD partitioner); unset it with "
                             "keras.distribution.set_distribution(None)")
        mesh = distribution.device_mesh
        data_axis = mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)]
        if args:
            args = (self._batch_major(args[0], data_axis, mesh),) + tuple(args[1:])
        elif "x" in kwargs:
            kwargs = dict(kwargs, x=self._batch_major(kwargs["x"], data_axis, mesh))
        return args, kwargs

    def _batch_major(self, x, data_axis, mesh):
        if hasattr(x, "element_spec") and type(x).__module__.startswith("tensorflow"):
            import tensorflow as tf

            spec = x.element_spec
            self._check_batch(batch_sizes(spec, lambda s: s.shape), data_axis, mesh)
            return x.map(lambda *d: swap_views(d[0] if len(d) == 1 else d,
                                              lambda v: tf.experimental.numpy.swapaxes(v, 0,
                                                                                       1)))
        leaves = list(x.values()) if isinstance(x, dict) else (
            list(x) if isinstance(x, (tuple, list)) else [x])
        if not all(leaf is None or hasattr(leaf, "shape") for leaf in leaves):
            raise ValueError(f"under a keras.distribution distribution {type(self).__name__} "
                             "takes a tf.data.Dataset or arrays (a dict, tuple or array), "
                             f"not {type(x).__name__}: the views of its batches must be moved "
                             "behind the batch axis before Keras shards them")
        self._check_batch(batch_sizes(x, np.shape), data_axis, mesh)
        return swap_views(x, lambda v: np.swapaxes(np.asarray(v), 0, 1))

    @staticmethod
    def _check_batch(sizes, data_axis, mesh):
        for name, size in sizes.items():
            if size is not None and int(size) % data_axis:
                raise ValueError(f"a batch of {int(size)} (data leaf {name!r}) does not divide "
                                 f"the data axis of {data_axis} devices (device mesh "
                                 f"{tuple(mesh.shape)}); use a batch size that is a multiple "
                                 f"of {data_axis}")

    def _prepare_fit(self):
        # Keras builds an unbuilt model by tracing call() on a symbolic batch; a trainer has no
        # call(), so its layers must exist already and the trainer itself counts as built.
        if not self.built:
            unbuilt = [layer.name for layer in self._flatten_layers(include_self=False)
                       if not layer.built]
            if unbuilt:
                raise ValueError(f"{type(self).__name__}: build these layers before fit "
                                 f"(e.g. in __init__): {unbuilt}")
            self.built = True
        self.sync_host_step()

    def sync_host_step(self):
        """Sets ``host_step`` from the optimizer's iteration count (after a restore). The
        variables hold the true state between fit calls (JAX syncs at the end of fit); inside
        fit the step count is kept on the host so that no step waits on the device."""
        if self.optimizer is None:
            return
        if self.optimizer.gradient_accumulation_steps:
            raise NotImplementedError("PlannedTrainer does not support gradient accumulation")
        self._plans.host_step = int(ops.convert_to_numpy(self.optimizer.iterations))

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self._check_precision()
        # A new train function (after compile) may see a new optimizer: rebuild every program.
        self._plans.programs.clear()
        self._plans.update_scales = self._resolve_lr_multipliers()
        self._configure_weight_decay()
        backend = keras.backend.backend()
        if backend == "jax":
            self.train_function = self._make_jax_train_function()
        elif backend == "tensorflow":
            self.train_function = self._make_tf_train_function()
        elif backend == "torch":
            self.train_function = self._make_torch_train_function()
        else:
            raise NotImplementedError(f"PlannedTrainer does not support backend {backend!r}")
        return self.train_function

    def _check_precision(self):
        """float16 computation needs loss scaling, which these steps do not do: refused.
        ``mixed_bfloat16`` (bfloat16 has float32's exponent range) is supported."""
        half = sorted({layer.dtype_policy.name for layer in self._flatten_layers()
                       if keras.backend.standardize_dtype(layer.compute_dtype) == "float16"})
        if half:
            raise ValueError(
                f"{type(self).__name__} computes in float16 (dtype policies {half}), which "
                "needs loss scaling, and PlannedTrainer does not scale losses; build the "
                "models under 'mixed_bfloat16' (keras.config.set_dtype_policy) or 'float32'")

    def train_step(self, *args, **kwargs):
        raise RuntimeError("PlannedTrainer runs its steps through make_train_function; "
                           "implement compute_loss_and_logs instead of train_step")

    # ------------------------------------------------ per-variable lr and weight decay setup
    def _resolve_lr_multipliers(self):
        """``lr_multipliers()`` as a tuple of (variable index, factor, step value name or None),
        leaving out the variables whose multiplier is the constant 1."""
        multipliers = self.lr_multipliers()
        if multipliers is None:
            return ()
        multipliers = list(multipliers)
        variables = self.trainable_variables
        if len(multipliers) != len(variables):
            raise ValueError(f"lr_multipliers() returned {len(multipliers)} entries for "
                             f"{len(variables)} trainable variables")
        scales = []
        for index, (entry, variable) in enumerate(zip(multipliers, variables)):
            if isinstance(entry, (tuple, list)):
                if len(entry) != 2 or not isinstance(entry[1], str):
                    raise ValueError(f"lr_multipliers()[{index}] ({variable.path}) must be a "
                                     f"float or a (factor, step value name) pair, got {entry!r}")
                scales.append((index, float(entry[0]), entry[1]))
            elif float(entry) != 1.0:
                scales.append((index, float(entry), None))
        return tuple(scales)

    def _configure_weight_decay(self):
        """Adds ``no_weight_decay_variables()`` to the optimizer's weight-decay exclusions
        (keeping any the user set)."""
        excluded = list(self.no_weight_decay_variables() or ())
        optimizer = self.optimizer
        if not excluded or optimizer is None:
            return
        known = {id(v) for v in self.trainable_variables}
        if any(id(v) not in known for v in excluded):
            raise ValueError("no_weight_decay_variables() returned variables that are not "
                             "trainable variables of this trainer")
        existing = set(getattr(optimizer, "_exclude_from_weight_decay", None) or ())
        pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
        if not optimizer.built:
            kept = [v for v in self.trainable_variables
                    if optimizer._var_key(v) in existing]
            optimizer.exclude_from_weight_decay(
                var_list=kept + excluded,
                var_names=None if pattern is None else [pattern.pattern])
            missing = existing - set(optimizer._exclude_from_weight_decay)
            optimizer._exclude_from_weight_decay |= missing
        else:
            # Keras refuses exclude_from_weight_decay() once the optimizer is built (e.g. a
            # re-compile with the same optimizer); it only reads this set (through a cache that
            # is reset here) when it applies the decay, so filling it directly is equivalent.
            optimizer._exclude_from_weight_decay = existing | {optimizer._var_key(v)
                                                               for v in excluded}
            optimizer._exclude_from_weight_decay_cache = {}

    def _update_scales(self, values):
        """[(variable index, multiplier)] of this step: floats or float32 scalar tensors."""
        out = []
        for index, factor, name in self._plans.update_scales:
            if name is None:
                out.append((index, factor))
                continue
            self._check_step_value_names(values, (name,))
            out.append((index, factor * values[name]))
        return out

    def _update_groups(self, values):
        """The lr multipliers as [(variable indices, multiplier)], one entry per distinct
        multiplier (the fused PyTorch path scales each group with one call)."""
        groups = {}
        for index, factor, name in self._plans.update_scales:
            groups.setdefault((factor, name), []).append(index)
        self._check_step_value_names(values, {name for _, name in groups if name is not None})
        return [(indices, factor if name is None else factor * values[name])
                for (factor, name), indices in groups.items()]

    @staticmethod
    def _check_step_value_names(values, names):
        missing = sorted(set(names) - set(values))
        if missing:
            raise KeyError(f"lr_multipliers() refers to the step value {missing[0]!r}, which "
                           f"step_hyperparameters() does not return (it has {sorted(values)})")

    def fused_step(self):
        """Whether this step takes the multi-tensor PyTorch paths (``fused_updates`` on the
        PyTorch backend)."""
        return self.fused_updates and keras.backend.backend() == "torch"

    # ------------------------------------------------------------- host side of every step
    def _host_prepare(self):
        """Draws the plan and the step's hyperparameters; returns (plan, float32 values)."""
        plan = self.next_plan()
        try:
            hash(plan)
        except TypeError:
            raise TypeError(f"next_plan() must return a hashable value, got {plan!r} "
                            f"of type {type(plan).__name__}") from None
        state = self._plans
        if state.host_step is None:
            state.host_step = int(ops.convert_to_numpy(self.optimizer.iterations))
        raw = dict(self.step_hyperparameters(state.host_step) or {})
        values = {}
        for name, value in raw.items():
            value = np.asarray(value, dtype="float32")
            if value.shape != ():
                raise ValueError(f"step_hyperparameters()[{name!r}] must be a scalar, "
                                 f"got shape {value.shape}")
            values[name] = value
        for name, value in dict(self.step_choices() or {}).items():
            if name in values:
                raise ValueError(f"step_choices() and step_hyperparameters() both set {name!r}")
            values[name] = np.asarray(value, dtype="float32")
        if "learning_rate" in values and not isinstance(self.optimizer._learning_rate,
                                                        keras.Variable):
            raise ValueError(
                "step_hyperparameters() sets 'learning_rate', which needs an optimizer "
                "built with a float learning rate, not "
                f"{type(self.optimizer._learning_rate).__name__}")
        state.host_step += 1
        state.plans_seen.add(plan)
        state.last_plan = plan
        return plan, values

    def _check_new_plan(self, plan):
        state = self._plans
        if self.max_plans is not None and len(state.programs) >= self.max_plans:
            raise RuntimeError(
                f"plan {plan!r} would be compiled program number {len(state.programs) + 1}, "
                f"over max_plans={self.max_plans}; compiled plans: "
                f"{sorted(map(repr, state.programs))}")

    def _host_logs(self, logs):
        logs = dict(logs)
        logs.update(self.host_logs() or {})
        logs["compilations"] = self.num_compilations
        return logs

    # --------------------------------------------------------------- backend-agnostic pieces
    @contextlib.contextmanager
    def _step_scope(self, values):
        state = self._plans
        previous, state.step_values = state.step_values, values
        try:
            yield
        finally:
            state.step_values = previous

    @contextlib.contextmanager
    def _optimizer_weight_decay(self, weight_decay):
        """Puts the step's weight decay (a tensor or float) on the optimizer while it applies
        the gradients: Keras reads ``optimizer.weight_decay`` as a constant, which would be
        frozen into a compiled program."""
        if weight_decay is None:
            yield
            return
        optimizer = self.optimizer
        previous = optimizer.weight_decay
        optimizer.weight_decay = weight_decay
        try:
            yield
        finally:
            optimizer.weight_decay = previous

    def _process_gradients(self, grads, plan):
        """Clips by global norm, drops the frozen variables' gradients; returns (grads, norm).

        A gradient that is None (a variable the plan does not use, on TensorFlow/PyTorch)
        becomes zeros, as JAX computes it, so every backend updates the same variables."""
        variables = self.trainable_variables
        grads = [ops.zeros(v.shape, v.dtype) if g is None else g
                 for g, v in zip(grads, variables)]
        frozen = {id(v) for v in self.frozen_variables(plan)}
        unknown = frozen - {id(v) for v in variables}
        if unknown:
            raise ValueError("frozen_variables() returned variables that are not trainable "
                             "variables of this trainer")
        if self.fused_step():
            kept = [g for g, v in zip(grads, variables) if id(v) not in frozen]
            norm = torch_fused.global_norm(kept)
            if self.clip_grad is not None:
                import torch

                torch_fused.scale_(kept, torch.clamp(float(self.clip_grad) / (norm + _CLIP_EPS),
                                                     max=1.0))
            return [None if id(v) in frozen else g for g, v in zip(grads, variables)], norm
        kept = [g for g, v in zip(grads, variables) if id(v) not in frozen]
        norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in kept))
        if self.clip_grad is not None:
            scale = ops.minimum(1.0, float(self.clip_grad) / (norm + _CLIP_EPS))
            grads = [g * ops.cast(scale, g.dtype) for g in grads]
        grads = [None if id(v) in frozen else g for g, v in zip(grads, variables)]
        return grads, norm

    def _apply_gradients(self, grads, weight_decay, values):
        """The optimizer update (TensorFlow, PyTorch), then the lr multipliers' scaling."""
        variables = self.trainable_variables
        if self.fused_step():
            groups = self._update_groups(values)
            old = [torch_fused.copies([variables[i].value for i in idx]) for idx, _ in groups]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Gradients do not exist")
                with self._optimizer_weight_decay(weight_decay):
                    self.optimizer.apply(grads, variables)
            torch_fused.scaled_updates_(
                [([variables[i].value for i in idx], before, m)
                 for (idx, m), before in zip(groups, old)])
            return
        scales = self._update_scales(values)
        old = [ops.copy(variables[i].value) for i, _ in scales]
        with warnings.catch_warnings():
            # Frozen variables have None gradients on purpose.
            warnings.filterwarnings("ignore", message="Gradients do not exist")
            with self._optimizer_weight_decay(weight_decay):
                self.optimizer.apply(grads, variables)
        for (i, multiplier), before in zip(scales, old):
            variable = variables[i]
            variable.assign(scaled_update(before, variable.value, multiplier))

    def _finish_logs(self, loss, logs, grad_norm):
        """Updates the loss tracker and returns the step's logs (all float32 scalars)."""
        self._loss_tracker.update_state(loss)
        out = {"loss": self._loss_tracker.result()}
        for name, value in dict(logs or {}).items():
            if name != "loss":
                out[name] = ops.cast(ops.convert_to_tensor(value), "float32")
        out["grad_norm"] = grad_norm
        return out

    def _checked_loss(self, loss, logs):
        loss = ops.convert_to_tensor(loss)
        if len(loss.shape) != 0:
            raise ValueError(f"compute_loss_and_logs() must return a scalar loss, "
                             f"got shape {tuple(loss.shape)}")
        if logs is not None and not isinstance(logs, dict):
            raise TypeError(f"compute_loss_and_logs() must return (loss, dict), got logs "
                            f"of type {type(logs).__name__}")
        return loss

    def _multi_step(self, run_one, next_data):
        """Runs ``steps_per_execution`` steps on the host, each with its own plan."""
        logs = None
        for i in range(self.steps_per_execution):
            try:
                data = next_data()
            except StopIteration:
                if i == 0:
                    raise
                break
            logs = run_one(_strip_trailing_none(data))
        return logs

    # ----------------------------------------------------------------------------------- JAX
    def _make_jax_train_function(self):
        def train_function(state, iterator):
            box = [state]

            def run_one(data):
                plan, values = self._host_prepare()
                logs, box[0] = self._jax_program(plan)(box[0], data, values)
                return logs

            logs = self._multi_step(run_one, lambda: next(iterator))
            return self._host_logs(logs), box[0]

        return train_function

    def _jax_program(self, plan):
        programs = self._plans.programs
        if plan in programs:
            return programs[plan]
        self._check_new_plan(plan)
        import jax

        def step(state, data, values):
            self._plans.traces[plan] += 1  # runs only while jax traces
            return self._jax_stateless_step(plan, state, data, values)

        if self.run_eagerly or not self.jit_compile:
            program = step
        elif keras.distribution.distribution() is None:
            program = jax.jit(step, donate_argnums=0)
        else:
            program = self._sharded_program(step)
        programs[plan] = program
        return program

    @staticmethod
    def _sharded_program(step):
        """``step`` jitted with the state's shardings as its output shardings (Keras' JAX
        trainer does the same), taken from the first state it gets: Keras empties the
        variables during fit, so their values cannot be read when a plan first runs."""
        import jax

        compiled = []

        def program(state, data, values):
            if not compiled:
                shardings = jax.tree.map(lambda a: a.sharding, state)
                compiled.append(jax.jit(step, donate_argnums=0,
                                        out_shardings=(None, shardings)))
            return compiled[0](state, data, values)

        return program

    def _jax_stateless_step(self, plan, state, data, values):
        import jax

        if self._plans.batch_major:   # the views were moved behind the batch axis for sharding
            data = swap_views(data, lambda v: ops.swapaxes(v, 0, 1))

        trainable, non_trainable, optimizer_values, metrics_values = (list(s) for s in state)
        t_vars = self.trainable_variables
        nt_vars = self.non_trainable_variables
        opt_vars = self.optimizer.variables
        m_vars = self.metrics_variables
        if "learning_rate" in values:
            lr_var = self.optimizer._learning_rate
            index = next(i for i, v in enumerate(opt_vars) if v is lr_var)
            optimizer_values[index] = ops.cast(values["learning_rate"], lr_var.dtype)

        def current(scope, variables, old):
            out = []
            for v, o in zip(variables, old):
                new = scope.get_current_value(v)
                out.append(o if new is None else new)
            return out

        def loss_fn(trainable_values):
            mapping = (list(zip(t_vars, trainable_values)) + list(zip(nt_vars, non_trainable))
                       + list(zip(opt_vars, optimizer_values)) + list(zip(m_vars, metrics_values)))
            with keras.StatelessScope(state_mapping=mapping) as scope, self._step_scope(values):
                loss, logs = self.compute_loss_and_logs(data, plan, training=True)
                loss = self._checked_loss(loss, logs)
                logs = {k: ops.cast(ops.convert_to_tensor(v), "float32")
                        for k, v in dict(logs or {}).items()}
            return loss, (logs, current(scope, nt_vars, non_trainable),
                          current(scope, m_vars, metrics_values))

        (loss, (logs, non_trainable, metrics_values)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        grads, grad_norm = self._process_gradients(grads, plan)

        before = trainable
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Gradients do not exist")
            with self._optimizer_weight_decay(values.get("weight_decay")):
                trainable, optimizer_values = self.optimizer.stateless_apply(
                    optimizer_values, grads, trainable)
        trainable = list(trainable)
        for i, multiplier in self._update_scales(values):
            trainable[i] = scaled_update(before[i], trainable[i], multiplier)

        # The hook sees the updated weights and may assign any variable; what it assigns is the
        # new state (Keras' JAX trainer threads non-trainable updates the same way).
        mapping = (list(zip(t_vars, trainable)) + list(zip(nt_vars, non_trainable))
                   + list(zip(opt_vars, optimizer_values)) + list(zip(m_vars, metrics_values)))
        with keras.StatelessScope(state_mapping=mapping) as scope, self._step_scope(values):
            self.after_optimizer_step(plan)
            out_logs = self._finish_logs(loss, logs, grad_norm)
        new_state = (current(scope, t_vars, trainable), current(scope, nt_vars, non_trainable),
                     current(scope, opt_vars, optimizer_values),
                     current(scope, m_vars, metrics_values))
        return out_logs, new_state

    # ---------------------------------------------------------------------------- TensorFlow
    def _make_tf_train_function(self):
        import tensorflow as tf

        if tf.distribute.has_strategy() and self.distribute_strategy.num_replicas_in_sync > 1:
            raise NotImplementedError("PlannedTrainer does not support multi-replica "
                                      "tf.distribute strategies")

        def train_function(iterator):
            if not self.optimizer.built:
                # Build eagerly: variables created inside one plan's tf.function would be
                # unavailable to the others.
                self.optimizer.build(self.trainable_variables)

            def run_one(data):
                plan, values = self._host_prepare()
                if "learning_rate" in values:
                    self.optimizer.learning_rate.assign(values["learning_rate"])
                tensors = {k: tf.constant(v) for k, v in values.items()}
                return self._tf_program(plan)(data, tensors)

            return self._host_logs(self._multi_step(run_one, lambda: next(iterator)))

        return train_function

    def _tf_program(self, plan):
        programs = self._plans.programs
        if plan in programs:
            return programs[plan]
        self._check_new_plan(plan)
        import tensorflow as tf

        def step(data, values):
            self._plans.traces[plan] += 1  # runs only while tf.function traces
            with self._step_scope(values):
                with tf.GradientTape() as tape:
                    loss, logs = self.compute_loss_and_logs(data, plan, training=True)
                    loss = self._checked_loss(loss, logs)
                grads = tape.gradient(loss, self.trainable_variables)
                grads, grad_norm = self._process_gradients(grads, plan)
                self._apply_gradients(grads, values.get("weight_decay"), values)
                self.after_optimizer_step(plan)
                return self._finish_logs(loss, logs, grad_norm)

        if self.run_eagerly:
            program = step
        else:
            # autograph=False: the plan makes Python control flow static already, and a
            # trainer's Python code must not be rewritten behind its back.
            program = tf.function(step, jit_compile=bool(self.jit_compile),
                                  reduce_retracing=True, autograph=False)
        programs[plan] = program
        return program

    # ------------------------------------------------------------------------------- PyTorch
    def _make_torch_train_function(self):
        import torch

        if self.steps_per_execution > 1:
            raise ValueError("steps_per_execution must be 1 with the PyTorch backend, got "
                             f"{self.steps_per_execution}")

        def train_function(batches):
            logs = None
            for data in batches:
                data = _strip_trailing_none(data)
                plan, values = self._host_prepare()
                if "learning_rate" in values:
                    self.optimizer.learning_rate.assign(values["learning_rate"])
                tensors = {k: ops.convert_to_tensor(v) for k, v in values.items()}
                weight_decay = values.get("weight_decay")
                logs = self._torch_step(plan, data, tensors,
                                        None if weight_decay is None else float(weight_decay),
                                        torch)
            return self._host_logs(logs)

        return train_function

    def _torch_step(self, plan, data, values, weight_decay, torch):
        with self._step_scope(values):
            self.zero_grad()
            loss, logs = self.compute_loss_and_logs(data, plan, training=True)
            loss = self._checked_loss(loss, logs)
            loss.backward()
            variables = self.trainable_variables
            grads = [v.value.grad for v in variables]
            with torch.no_grad():
                grads, grad_norm = self._process_gradients(grads, plan)
                self._apply_gradients(grads, weight_decay, values)
                self.after_optimizer_step(plan)
                logs = {k: ops.convert_to_tensor(v).detach() if hasattr(v, "detach") else v
                        for k, v in dict(logs or {}).items()}
                return self._finish_logs(loss.detach(), logs, grad_norm)

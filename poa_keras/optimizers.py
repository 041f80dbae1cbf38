"""Per-variable learning-rate multipliers (PyTorch parameter groups) for Keras optimizers.

Keras 3 optimizers have no parameter groups. The rule used everywhere in poa_keras (the
trainers' ``PlannedTrainer.lr_multipliers`` and ``LRMultiplierOptimizer`` for ``model.fit``) is
``scaled_update``: after the optimizer's update of a variable, ``new = old + m * (new - old)``.
That equals a PyTorch parameter group whose lr is ``m * lr`` exactly whenever the update is
linear in the learning rate and the optimizer state does not hold the learning rate: SGD
without momentum, Adam, AdamW (its decoupled weight decay ``lr * wd * w`` is linear in lr too,
so it is scaled like a param group's), Lion. Keras' SGD with momentum accumulates ``lr * g`` in
its velocity: exact there for constant multipliers only. The gradient, its clipping norm and the
optimizer moments are those of the unscaled step, as with param groups.
"""
from __future__ import annotations

import keras
from keras import ops

from poa_keras.validation import check_multiplier


def scaled_update(old, new, multiplier):
    """``old + multiplier * (new - old)`` in the variable's dtype: the update of an optimizer
    step scaled by a learning-rate multiplier (a float or a scalar tensor)."""
    if not isinstance(multiplier, float):
        multiplier = ops.cast(multiplier, new.dtype)
    return old + multiplier * (new - old)


@keras.saving.register_keras_serializable(package="poa_keras")
class LRMultiplierOptimizer(keras.optimizers.Optimizer):
    """Per-variable learning-rate multipliers for any Keras optimizer (parameter groups).

    Args:
        inner_optimizer: the optimizer that computes the update (unbuilt).
        multipliers: {variable path: multiplier >= 0}; variables not listed get 1. When the
            optimizer is built, every listed path must name exactly one of the variables it
            updates (ValueError otherwise), so a renamed or missing variable cannot silently
            lose its multiplier.
        name: the optimizer's name.

    Each step the inner optimizer updates every variable, then each variable with a multiplier
    ``m != 1`` is set to ``old + m * (new - old)`` (see the module doc for when this equals a
    PyTorch param group with lr ``m * lr``; ``m = 0`` freezes a variable). Learning rate,
    iterations and loss scaling are the inner optimizer's (``learning_rate`` reads and sets it,
    so lr callbacks work). Works in ``fit`` on every backend (JAX: through ``stateless_apply``).
    """

    def __init__(self, inner_optimizer, multipliers, name=None, **kwargs):
        if kwargs:
            raise ValueError(f"LRMultiplierOptimizer takes no optimizer arguments (set them on "
                             f"the inner optimizer), got {sorted(kwargs)}")
        super().__init__(learning_rate=0.0, name=name)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got "
                            f"{type(inner_optimizer).__name__}")
        if inner_optimizer.built:
            raise ValueError(f"inner_optimizer {inner_optimizer.name!r} is already built (it "
                             "holds state for other variables); pass a new optimizer")
        if inner_optimizer.use_ema:
            raise ValueError("inner_optimizer has use_ema=True: its moving averages would "
                             "follow the unscaled updates; keep the EMA outside (e.g. a "
                             "callback) or use ema-free optimizers")
        clean = {}
        for path, m in dict(multipliers).items():
            clean[str(path)] = check_multiplier(m, f"multipliers[{path!r}]")
        self.inner_optimizer = inner_optimizer
        self.multipliers = clean
        self._scale_by_key = {}

    def build(self, var_list):
        var_list = list(var_list)
        by_path = {}
        for variable in var_list:
            by_path.setdefault(variable.path, []).append(variable)
        missing = sorted(p for p in self.multipliers if p not in by_path)
        if missing:
            known = sorted(by_path)
            raise ValueError(
                f"{self.name}: {len(missing)} multiplier path(s) name no variable this optimizer "
                f"updates, e.g. {missing[:3]}; its variables are e.g. {known[:3]} "
                f"({len(known)} in all)")
        shared = sorted(p for p in self.multipliers if len(by_path[p]) > 1)
        if shared:
            raise ValueError(f"{self.name}: the paths {shared[:3]} name several variables; "
                             "give the layers unique names")
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._scale_by_key = {self._var_key(v): self.multipliers[v.path] for v in var_list
                              if self.multipliers.get(v.path, 1.0) != 1.0}

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError("When passing grads without variables, the optimizer must be "
                                 "built: call optimizer.build(trainable_variables) first")
            variables = self._trainable_variables
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
        scaled = [(v, self._scale_by_key[self._var_key(v)]) for v in variables
                  if self._var_key(v) in self._scale_by_key]
        before = [ops.copy(v.value) for v, _ in scaled]   # a copy: torch updates in place
        self.inner_optimizer.apply(grads, trainable_variables)
        for (variable, m), old in zip(scaled, before):
            variable.assign(scaled_update(old, variable.value, m))

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def get_config(self):
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "multipliers": dict(self.multipliers)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


__all__ = ["LRMultiplierOptimizer", "scaled_update"]

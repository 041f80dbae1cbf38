"""Checkpoints of a training run and the callback that writes them (DESIGN.md contracts 5, 8).

A checkpoint is a directory ``<run>/checkpoints/epoch_0003/`` holding

* ``state.weights.h5`` -- every variable of the trainer (student backbone and heads, the EMA
  teacher, centers, random-seed states, the loss tracker) and of its optimizer (moments,
  iteration count, learning rate), as HDF5 datasets in a fixed order, each with its variable
  path and shape as attributes;
* ``state.json`` -- the step count, the number of finished epochs, the recipe, the trainer's
  host-side state (POA's subnet sampler) and the logs of the epochs so far.

Everything a run needs to continue is there: the schedules are functions of the step count and
the recipe, and the data of epoch e is a function of (seed, e) (see poa_keras/pretrain.py).

Writes are atomic: a checkpoint is written into a temporary sibling directory and renamed into
place, and ``latest`` (a one-line file naming the newest checkpoint) is replaced with
``os.replace``. A run killed at any moment (even SIGKILL) leaves either the previous or the new
checkpoint, never a half-written one. Only ``keep`` checkpoints are kept.

Loading reads only arrays and JSON (no pickled code) and checks the number, order and shapes of
the variables: a checkpoint of another architecture or method fails with a message that names
the first variable that does not match.

Only a sound state is written: every float variable finite, and every model variable (not the
loss trackers) within ``max_abs`` (1e12) in absolute value; otherwise ``save`` raises
``NonFiniteState`` naming the variable, and the previous checkpoint stays the latest. (A
diverging update can leave weights near 1e30 while the loss is still finite.)
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import keras
import numpy as np

from poa_keras.files import atomic_write_text, staged_directory
from poa_keras.methods.nan_guard import DEFAULT_ADVICE, NonFiniteState

_NAME = re.compile(r"^epoch_(\d{4,})$")
_WEIGHTS = "state.weights.h5"
_STATE = "state.json"
_LATEST = "latest"
_GROUPS = ("trainer", "optimizer")
MAX_ABS = 1e12   # larger model weights are a diverged run, not a state to resume from


def _variable_groups(trainer):
    """{"trainer": [...], "optimizer": [...]}: the variables a checkpoint holds, in order."""
    if trainer.optimizer is None:
        raise ValueError("compile() the trainer before saving or restoring a checkpoint")
    if not trainer.optimizer.built:
        trainer.optimizer.build(trainer.trainable_variables)
    seen, trainer_vars = set(), []
    for v in (list(trainer.trainable_variables) + list(trainer.non_trainable_variables)
              + list(trainer.metrics_variables)):
        if id(v) not in seen:
            seen.add(id(v))
            trainer_vars.append(v)
    return {"trainer": trainer_vars, "optimizer": list(trainer.optimizer.variables)}


def _host_state(trainer):
    get = getattr(trainer, "get_sampler_state", None)
    return {"sampler": get()} if get is not None else {}


def _set_host_state(trainer, state):
    if "sampler" in state:
        setter = getattr(trainer, "set_sampler_state", None)
        if setter is None:
            raise ValueError("the checkpoint holds a subnet sampler state, but "
                             f"{type(trainer).__name__} has no sampler (another method?)")
        setter(state["sampler"])


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


class CheckpointManager:
    """Writes, lists and restores the checkpoints of one run directory.

    Args:
        directory: where the checkpoints live (created when the first one is written).
        keep: how many of the newest checkpoints to keep (>= 1).
        max_abs: the largest absolute value a model variable may hold in a checkpoint.
    """

    def __init__(self, directory, keep=2, max_abs=MAX_ABS):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if not float(max_abs) > 0:
            raise ValueError(f"max_abs must be > 0, got {max_abs}")
        self.directory = os.fspath(directory)
        self.keep = int(keep)
        self.max_abs = float(max_abs)

    # --------------------------------------------------------------------------- listing
    def checkpoints(self):
        """Complete checkpoints, oldest first (directories with both files)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            path = os.path.join(self.directory, name)
            if match and os.path.isfile(os.path.join(path, _STATE)) and os.path.isfile(
                    os.path.join(path, _WEIGHTS)):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self):
        """The newest complete checkpoint, or None."""
        pointer = os.path.join(self.directory, _LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                path = os.path.join(self.directory, f.read().strip())
            if os.path.isfile(os.path.join(path, _STATE)):
                return path
        found = self.checkpoints()
        return found[-1] if found else None

    # ----------------------------------------------------------------------------- saving
    def save(self, trainer, epoch, extra=None):
        """Writes the checkpoint after `epoch` finished epochs; returns its path.

        `extra` (a JSON-friendly dict: recipe, history, ...) is stored in state.json.

        Raises:
            NonFiniteState: a variable holds NaN/inf, or a model variable exceeds
                ``max_abs``; nothing is written.
        """
        os.makedirs(self.directory, exist_ok=True)
        import h5py

        name = f"epoch_{int(epoch):04d}"
        final = os.path.join(self.directory, name)
        groups = _variable_groups(trainer)
        trackers = {id(v) for v in trainer.metrics_variables}
        with staged_directory(final) as tmp:   # a state found unsound is never put in place
            with h5py.File(os.path.join(tmp, _WEIGHTS), "w") as f:
                for group, variables in groups.items():
                    g = f.create_group(group)
                    for i, v in enumerate(variables):
                        value = np.asarray(keras.ops.convert_to_numpy(v.value))
                        self._check_value(value, v, group, epoch,
                                          bounded=group == "trainer" and id(v) not in trackers)
                        ds = g.create_dataset(f"{i:05d}", data=value)
                        ds.attrs["path"] = v.path
                        ds.attrs["dtype"] = str(v.dtype)
            state = dict(extra or {})
            state.update(epoch=int(epoch),
                         step=int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)),
                         host=_host_state(trainer), backend=keras.backend.backend(),
                         trainer=type(trainer).__name__)
            with open(os.path.join(tmp, _STATE), "w") as f:
                json.dump(state, f, indent=1, default=_json_default)
        atomic_write_text(os.path.join(self.directory, _LATEST), name + "\n")
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _check_value(self, value, variable, group, epoch, bounded):
        if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
            return
        finite = np.isfinite(value)
        if finite.all():
            largest = float(np.max(np.abs(value)))
            if not bounded or largest <= self.max_abs:
                return
            problem = f"reaches |value| = {largest:.3g}, above max_abs={self.max_abs:g}"
        else:
            problem = f"holds {int(value.size - finite.sum())} NaN/inf values"
        kept = self.latest()
        raise NonFiniteState(
            f"the training state after epoch {int(epoch)} is not sound: {group} variable "
            f"{variable.path} {problem}, so the run diverged; checkpoint epoch_{int(epoch):04d} "
            "was not written. "
            + (f"The last good checkpoint is {kept}." if kept else
               "No checkpoint was written before it."))

    # -------------------------------------------------------------------------- restoring
    @staticmethod
    def read_state(path):
        with open(os.path.join(path, _STATE)) as f:
            return json.load(f)

    def restore(self, trainer, path=None):
        """Loads a checkpoint (default: the latest) into a compiled trainer; returns its
        state.json dict, or None when there is no checkpoint."""
        path = path or self.latest()
        if path is None:
            return None
        import h5py

        state = self.read_state(path)
        if state.get("trainer") not in (None, type(trainer).__name__):
            raise ValueError(f"checkpoint {path} was written by a {state['trainer']} trainer, "
                             f"not {type(trainer).__name__}")
        groups = _variable_groups(trainer)
        try:
            with h5py.File(os.path.join(path, _WEIGHTS), "r") as f:
                values = {}
                for group, variables in groups.items():
                    stored = f[group]
                    if len(stored) != len(variables):
                        raise ValueError(
                            f"checkpoint {path} holds {len(stored)} {group} variables, this "
                            f"{type(trainer).__name__} has {len(variables)}: a checkpoint of "
                            "another architecture or recipe")
                    for i, v in enumerate(variables):
                        ds = stored[f"{i:05d}"]
                        if tuple(ds.shape) != tuple(v.shape):
                            raise ValueError(
                                f"checkpoint {path}: {group} variable #{i} "
                                f"({ds.attrs.get('path', '?')}) has shape {tuple(ds.shape)}, "
                                f"but {v.path} here has shape {tuple(v.shape)}: a checkpoint "
                                "of another architecture or recipe")
                        values[id(v)] = ds[()]
        except OSError as err:
            raise ValueError(f"cannot read checkpoint {path}: {err}") from err
        for variables in groups.values():
            for v in variables:
                v.assign(values[id(v)])
        _set_host_state(trainer, state.get("host", {}))
        # The host-side step counter of a PlannedTrainer follows the restored optimizer.
        sync = getattr(trainer, "sync_host_step", None)
        if sync is not None:
            sync()
        return state


class PretrainCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint every `every_epochs` epochs (and after the last one), never the state
    of an epoch whose loss is not finite (a diverged run keeps its last good checkpoint; see
    ``nan_guard.StopOnNonFiniteLoss``, which stops such a run).

    A state that ``CheckpointManager.save`` refuses (``NonFiniteState``: a weight is NaN, inf
    or absurdly large) stops training; ``error`` then holds it, for the caller to raise.

    Args:
        manager: a CheckpointManager.
        total_epochs: the run's number of epochs (the last one is always saved).
        every_epochs: checkpoint period in epochs.
        extra: a callable (epoch, logs) -> dict stored in state.json (recipe, history).
        advice: appended to the message of ``error`` (what to do).
    """

    def __init__(self, manager, total_epochs, every_epochs=1, extra=None,
                 advice=DEFAULT_ADVICE):
        super().__init__()
        if int(every_epochs) < 1:
            raise ValueError(f"every_epochs must be >= 1, got {every_epochs}")
        self.manager = manager
        self.total_epochs = int(total_epochs)
        self.every_epochs = int(every_epochs)
        self.extra = extra
        self.advice = advice
        self.last_saved = None
        self.error = None

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return  # never save the state of a diverged run
        finished = epoch + 1
        if self.error is None and (finished % self.every_epochs == 0
                                   or finished == self.total_epochs):
            extra = self.extra(finished, logs) if self.extra is not None else None
            try:
                self.last_saved = self.manager.save(self.model, finished, extra)
            except NonFiniteState as error:
                self.error = NonFiniteState(f"{error} {self.advice}" if self.advice else
                                            str(error))
                self.model.stop_training = True

"""Stopping a run whose loss is no longer finite (DESIGN contract 9: "NaN loss: training stops,
last good checkpoint kept").

``StopOnNonFiniteLoss`` watches the loss after every batch; at the first NaN or inf it stops
``fit`` and keeps a ``NonFiniteLoss`` (``error``) whose message names the step, the epoch and the
last good checkpoint, for the caller to raise (``poa_keras.pretrain`` does). Checkpoints are not
its business: ``checkpoint.PretrainCheckpoint`` never saves an epoch whose loss is not finite,
and ``CheckpointManager.save`` refuses a state whose variables are not finite or absurdly large
(a diverging update can leave weights near 1e30 with a finite loss): ``NonFiniteState``.
"""
from __future__ import annotations

import math

import keras


class NonFiniteLoss(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


class NonFiniteState(NonFiniteLoss):
    """The trainer's state (weights, optimizer moments) holds NaN, inf or absurdly large
    values: it is not written as a checkpoint, and training stops."""


DEFAULT_ADVICE = "Lower the learning rate, raise warmup, or check the data for NaN values."


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite.

    Args:
        last_checkpoint: a callable returning the newest good checkpoint (a path) or None, for
            the message (e.g. ``CheckpointManager.latest``).
        advice: the message's last sentence: what to do (``pretrain`` says how to resume
            from the last good checkpoint with a lower learning rate).

    After ``fit``, ``error`` is None or the ``NonFiniteLoss`` to raise.
    """

    def __init__(self, last_checkpoint=None, advice=DEFAULT_ADVICE):
        super().__init__()
        self.last_checkpoint = last_checkpoint
        self.advice = advice
        self.error = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.error is not None or not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if math.isfinite(loss):
            return
        # The host-side step count of a PlannedTrainer (on JAX the variables are not synced
        # inside fit); None for other models.
        step = getattr(self.model, "host_step", None)
        kept = self.last_checkpoint() if self.last_checkpoint is not None else None
        self.error = NonFiniteLoss(
            f"the loss became {loss} at step {step} (epoch {self._epoch + 1}, batch "
            f"{batch + 1}); training stopped. "
            + (f"The last good checkpoint is {kept}." if kept else
               "No checkpoint was written before it.")
            + (f" {self.advice}" if self.advice else ""))
        self.model.stop_training = True


__all__ = ["DEFAULT_ADVICE", "NonFiniteLoss", "NonFiniteState", "StopOnNonFiniteLoss"]

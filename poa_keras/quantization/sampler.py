"""The host-side draw of a step's bit-widths (SSQL, REFERENCE.md §5).

SSQL draws the weight and the activation bit-width of its quantized branch uniformly and
independently every step (weights 2..8, activations 4..8). The draw happens on the host; the
values enter the compiled step as run-time scalars (``PlannedTrainer.step_choices``), so every
bit-width runs the same program (DESIGN contract 6). The generator's state is JSON-friendly
and goes into checkpoints, so a resumed run draws what the uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np

from poa_keras.quantization.fake import ACTIVATION_BITS, FLOAT_BITS, WEIGHT_BITS, check_bits

SSQL_WEIGHT_BITS = tuple(range(2, 9))
SSQL_ACTIVATION_BITS = tuple(range(4, 9))


def _choices(values, what, valid):
    values = tuple(values)
    if not values:
        raise ValueError(f"{what}: give at least one bit-width ({min(valid)}..{max(valid)})")
    # float steps come from float_probability, not from a 32 among the choices
    return tuple(check_bits(v, what, valid, allow_float=False) for v in values)


class BitSampler:
    """Draws (weight_bits, activation_bits) per step: each uniform over its choices,
    independently; with ``float_probability`` p the step is float instead ((32, 32)).

    Args:
        weight_bits: the weight choices (default 2..8, SSQL's).
        activation_bits: the activation choices (default 4..8, SSQL's).
        seed: the generator's seed.
        float_probability: the probability of a float step (0: SSQL, every step quantized).
    """

    def __init__(self, weight_bits=SSQL_WEIGHT_BITS, activation_bits=SSQL_ACTIVATION_BITS,
                 seed=0, float_probability=0.0):
        self.weight_bits = _choices(weight_bits, "weight bit-widths", WEIGHT_BITS)
        self.activation_bits = _choices(activation_bits, "activation bit-widths",
                                        ACTIVATION_BITS)
        self.float_probability = float(float_probability)
        if not 0.0 <= self.float_probability <= 1.0:
            raise ValueError(f"float_probability {float_probability} must lie in [0, 1]")
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.last = None

    def next(self):
        """The next (weight_bits, activation_bits)."""
        rng = self._rng
        # always three draws, so the stream does not depend on which branch was taken
        is_float = rng.random() < self.float_probability
        w = self.weight_bits[int(rng.integers(len(self.weight_bits)))]
        a = self.activation_bits[int(rng.integers(len(self.activation_bits)))]
        self.last = (FLOAT_BITS, FLOAT_BITS) if is_float else (w, a)
        return self.last

    def get_state(self) -> dict:
        """JSON-friendly state (checkpoints)."""
        return {"weight_bits": list(self.weight_bits),
                "activation_bits": list(self.activation_bits),
                "float_probability": self.float_probability,
                "rng": self._rng.bit_generator.state,
                "last": None if self.last is None else list(self.last)}

    def set_state(self, state: dict):
        for key in ("weight_bits", "activation_bits"):
            if tuple(state.get(key, ())) != getattr(self, key):
                raise ValueError(f"bit sampler state is for {key}={state.get(key)}, this "
                                 f"sampler draws {list(getattr(self, key))}")
        self._rng.bit_generator.state = state["rng"]
        self.last = None if state.get("last") is None else tuple(state["last"])

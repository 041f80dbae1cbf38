"""SSQL -- Synergistic Self-supervised and Quantization Learning (ECCV 2022; REFERENCE.md §5) as
a `PlannedTrainer`: SimSiam (methods/simsiam.py) whose encoder also learns to work quantized at
every bit-width.

Each step, with the two views x1, x2 of a batch (one forward of the concatenated 2B images, as
in SimSiam here)::

    (1) float:      z = projector(backbone(x)),  p = predictor(z)        -> z1, z2, p1, p2
    (2) bits:       (w, a) drawn on the host, uniformly and independently: weights in
                    ``weight_bits`` (2..8), activations in ``activation_bits`` (4..8)
    (3) quantized:  zq = projector(backbone(x, quant=QuantConfig(w, a, "batch")))
                    inside the same quantization (the projector's weights at a fixed 8 bits),
                    pq = predictor(zq) in float                             -> p1q, p2q
    loss = (L_fp + L_q) / 2
    L_fp = -(cos(p1, sg z2) + cos(p2, sg z1)) / 2
    L_q  = -(cos(p1q, sg z2) + cos(p2q, sg z1)) / 2

The targets of BOTH branches are the FLOAT z of the other view (``losses.ssql_loss``). The two
branches share every weight (backbone, projector, predictor): the quantized branch reaches them
through the straight-through estimator of the fake quantizers (quantization/fake.py).

Bit-widths are run-time choices (DESIGN contract 6): the host draws them with a
``BitSampler`` (quantization/sampler.py; seed ``sampler_seed``) and hands them to the step as
float32 scalars ``step_values["weight_bits"]`` and ``step_values["activation_bits"]``
(``step_choices``). The plan is always None: ONE program serves every bit-width on JAX and
TensorFlow. The sampler's state is saved in every checkpoint (``get_sampler_state``), so a
resumed run draws the bits the uninterrupted run would have drawn.

Deliberate difference from the reference -- activation ranges: the reference first runs the
float forward with observers that record the min/max of every quantized layer's output over
both views, then quantizes the second forward with those ranges (the float network's). Here
every activation quantizer of the quantized forward takes the min/max of its OWN input in that
forward, over the 2B images of both views ("batch" ranges, ``QuantConfig(ranges="batch")``):
stateless (no observer state threaded between the two forwards of a compiled step) and the same
for every backbone family. The ranges then describe the quantized network's activations (which
at low bit-widths drift from the float ones) rather than the float network's. Weight ranges are
the same in both (per-channel min/max of the current weights).

Other consequences, as in the reference: every BatchNorm (backbone, projector, predictor) runs
in training mode in both forwards, so its moving statistics are updated by both (the float and
the quantized batch); BatchNorm is not folded into the convolutions and computes in float.

Recipe keys: SimSiam's (``SIMSIAM_RECIPE``: lr 0.05 not scaled, cosine to 0, no warmup, SGD
momentum 0.9, PyTorch-style weight decay) plus ``weight_bits`` (choices, (2, ..., 8)),
``activation_bits`` ((4, ..., 8)) and ``sampler_seed`` (0). Defaults: ``SSQL_RECIPE``.

Logs: ``loss``, ``loss_fp``, ``loss_q``, ``weight_bits``, ``activation_bits`` (the step's
draw), ``z_std`` (collapse indicator of the float z1: about 1/sqrt(D) when healthy, 0 when
collapsed), ``lr``, ``grad_norm``.
"""
from __future__ import annotations

import types

import numpy as np

from poa_keras.losses.simsiam import normalized_std, ssql_loss
from poa_keras.methods.simsiam import SIMSIAM_RECIPE, SimSiam
from poa_keras.quantization.observer import QuantConfig
from poa_keras.quantization.sampler import SSQL_ACTIVATION_BITS, SSQL_WEIGHT_BITS, BitSampler

SSQL_RECIPE = dict(
    SIMSIAM_RECIPE,
    weight_bits=SSQL_WEIGHT_BITS,           # the weight bit-widths drawn from (2..8)
    activation_bits=SSQL_ACTIVATION_BITS,   # the activation bit-widths (4..8)
    sampler_seed=0,                         # the bit sampler's seed
)


class SSQL(SimSiam):
    """SSQL trainer: SimSiam with a quantized branch at host-drawn bit-widths (see the module
    docstring).

    Args:
        backbone, projector, predictor, clip_grad, feature: as ``SimSiam``.
        recipe: the recipe dict; defaults ``SSQL_RECIPE``.
        bit_sampler: a ``BitSampler``; None: one built from the recipe's ``weight_bits``,
            ``activation_bits`` and ``sampler_seed``.
    """

    recipe_defaults = SSQL_RECIPE

    def __init__(self, backbone, projector=None, predictor=None, recipe=None,
                 clip_grad="recipe", feature="pooled", bit_sampler=None, **kwargs):
        super().__init__(backbone, projector, predictor, recipe, clip_grad, feature, **kwargs)
        if bit_sampler is None:
            try:
                bit_sampler = BitSampler(self.recipe["weight_bits"],
                                         self.recipe["activation_bits"],
                                         seed=int(self.recipe["sampler_seed"]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"SSQL recipe weight_bits={self.recipe['weight_bits']!r}, "
                                 f"activation_bits={self.recipe['activation_bits']!r}: "
                                 f"{error}") from None
        # A plain object: Keras must not track the host-side sampler.
        self._bits = types.SimpleNamespace(sampler=bit_sampler, last=None)

    # ---------------------------------------------------------------------- bit-width draws
    @property
    def bit_sampler(self):
        return self._bits.sampler

    @property
    def last_bits(self):
        """(weight_bits, activation_bits) of the last step (None before the first)."""
        return self._bits.last

    def next_bits(self):
        """The next step's (weight_bits, activation_bits): the sampler's next draw. Override
        (or assign on the instance) to pin them."""
        return self._bits.sampler.next()

    def step_choices(self):
        w, a = self.next_bits()
        self._bits.last = (int(w), int(a))
        return {"weight_bits": np.float32(w), "activation_bits": np.float32(a)}

    def get_sampler_state(self):
        """The bit sampler's state (JSON-friendly), saved in checkpoints."""
        return {"bit_sampler": self._bits.sampler.get_state()}

    def set_sampler_state(self, state):
        if not isinstance(state, dict) or "bit_sampler" not in state:
            raise ValueError(f"not an SSQL sampler state (expected a dict with 'bit_sampler'), "
                             f"got {state!r}")
        self._bits.sampler.set_state(state["bit_sampler"])

    # ------------------------------------------------------------------------------- step
    def compute_loss_and_logs(self, data, plan, training=True):
        x = self.views(data)
        z = self.encode(x, training=training)
        p = self.predictor(z, training=training)
        w = self.step_values["weight_bits"]
        a = self.step_values["activation_bits"]
        zq = self.encode(x, training=training, quant=QuantConfig(w, a, ranges="batch"))
        pq = self.predictor(zq, training=training)   # outside any scope: float
        (z1, z2), (p1, p2), (p1q, p2q) = self.split(z), self.split(p), self.split(pq)
        loss, loss_fp, loss_q = ssql_loss(p1, p2, p1q, p2q, z1, z2)
        logs = {"loss_fp": loss_fp, "loss_q": loss_q, "weight_bits": w, "activation_bits": a,
                "z_std": normalized_std(z1), "lr": self.step_values["learning_rate"]}
        return self.regularized(loss), logs

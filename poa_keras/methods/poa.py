"""POA -- Pre-training Once for All (REFERENCE.md §1) as a `PlannedTrainer`.

Three branches sharing one set of student weights:

* teacher: EMA of the intact student (backbone + heads), non-trainable, sees the 2 global views;
* intact student: the full network, on every view;
* elastic student: a sub-network (the family's subnet spec: ``ViTSubnet``, ``SwinSubnet``,
  ``ResNetSubnet``) drawn on the host every step by the backbone's ``SubnetSampler`` (never
  the intact network). The plan of a step is that spec (see "plan" below for the iBOT phase).
  The heads are shared: the elastic student's features enter the heads with
  ``active_in=backbone.head_active_in(spec)`` (the elastic first linear; the ViT's width w).

Per projection head (``MultiProjectionHead``, or one ``DINOHead``), with λ = ``lambda_ie``::

    L_dino = [λ · Σ CE(intact_j, T_i) + (1 - λ) · Σ CE(elastic_j, T_i)] / n_terms
             (pairs: teacher global view i, student view j != i; n_terms = 2 + 2 v)
    L_same = (1 - λ) · [CE(elastic, softmax(intact.detach() / 0.1)) on the global views
                        + the same on the local views]

where each same-view CE is the mean over the views of that crop size and the batch (the
reference calls its loss on the flattened global / local tensors, as DINOv2 does); it is not
divided by n_terms. Total = mean over heads of (L_dino + L_same), plus ``koleo_weight`` times
KoLeo on the global CLS tokens, summed over the two global views (DINOv2 style) and averaged over
the intact and the elastic student as the reference's ssl_meta_arch.py does (0 switches it
off).

Teacher targets: Sinkhorn-Knopp (default) or DINO centering (one center per head, updated
inside the step after its targets were computed; see methods/teacher_student.py).

iBOT masked-patch loss (optional, REFERENCE §1; ``ibot_weight`` > 0 switches it on, 0 is the
default): from ``ibot_start_epoch`` (30 in the paper) on, both students see the global views
with the batch's masks (``batch["masks"]``, (2, B, N) bool, e.g. from
``multicrop_dataset(..., masks=True, mask_patch_size=p)``: mask probability 0.5 per view,
ratio 0.1-0.5,
block-wise) -- so their DINO and KoLeo terms use the masked views too, as in DINOv2/POA -- and
the teacher sees them unmasked. Per head::

    L_ibot = λ · CE_patch(intact, T_patch) + (1 - λ) · CE_patch(elastic, T_patch)

where CE_patch is the cross-entropy on the masked patches, averaged per view over its masked
patches and then over all 2B global views (``losses.ibot.ibot_masked_token_loss``), and
T_patch are the teacher's targets for the same patches: Sinkhorn-Knopp over the masked patches
of the batch only (``masked_sinkhorn_knopp``), or DINO centering with a separate per-head patch
center (``ibot_center_<i>``, EMA of the mean teacher logit over the masked patches). The
patch tokens go through the SAME projection heads as the CLS tokens (POA's default
``ibot.separate_head: false``; separate iBOT heads are not implemented); the elastic
student's patch tokens enter them with ``active_in=w``. Total += ``ibot_weight`` x mean over
heads. As in DINOv2/POA, the masked tokens are gathered into a buffer of static size U
(``ibot_max_tokens``; default ``data.masking.mask_upper_bound(2B, N, ibot_mask_probability,
ibot_mask_ratio)``, the most that ``mask_batch`` with the recipe's settings masks; "all" = 2B·N
for masks from elsewhere) and the heads run on U tokens only; masked patches beyond U would be
left out. A step without a "masks" entry, or before the start epoch, computes no iBOT branch.

Last-layer freeze (``freeze_last_layer_epochs``, 1 in the paper), the DINOv2 way that POA
uses: the heads' last layers (weight_v, weight_g) get the learning rate 0 during the freeze
steps (their lr multiplier is the step value ``last_layer_lr_scale``, 0 then 1), so their
weights do not move (no gradient step, no weight decay) while AdamW's moments still see their
gradients, and the gradient norm for clipping includes them -- as with DINOv2's
``last_layer_lr`` param group. It costs no program: the freeze is a step value, not a plan.

The plan (the key of a compiled program, DESIGN contract 6) holds only what changes shapes:
the elastic student's WIDTH. With ``runtime_depth`` (the default on JAX and TensorFlow, for a
backbone of elastic depth) the plan is the drawn subnet at the intact depth
(``backbone.full_depth_subnet``) and the depth is the run-time mask ``block_keep``
(``step_choices``): each block that some subnet skips runs inside a conditional that computes
only the branch taken, so a W x D grid compiles at most W programs and a skipped block costs
no FLOPs. Without it (the default on PyTorch, where nothing is compiled and a Python branch
is free) the plan is the drawn subnet itself. During the iBOT phase the plan is
``POAPlan(plan, ibot=True)``: at most 2 programs per width (one before the iBOT start epoch,
one after; 1 without iBOT), plus one retrace of an iBOT plan for a batch of another
structure (with/without "masks"). ``last_subnet`` is the drawn subnet, ``plan_for(subnet)``
the plan it runs under.

``lambda_ie``, ``koleo_weight`` and ``ibot_weight`` are read from ``self.recipe`` at every step
and enter the compiled step as arguments (``step_values``), like the schedules.

Logs: ``dino_intact``, ``dino_elastic``, ``same_view`` (each the weighted contribution to the
loss, averaged over heads), ``koleo`` (weighted), ``ibot`` (weighted; 0 on steps without the
iBOT branch), ``width``, ``depth`` (the elastic student's subnet), ``teacher_temp``,
``momentum``. ``loss`` = dino_intact + dino_elastic + same_view + koleo + ibot.

Layer-wise lr decay (0.9), the patch-embed lr multiplier (0.2) and weight decay on ndim > 1
variables only: see methods/teacher_student.py (shared with DINO).

POA x SSQL (``quant_weight_bits`` set; off by default): one run trains every (size, bit-width)
pair. With probability ``quant_probability`` a step's elastic student runs fake-quantized
(``quantization/``: weights per output channel, activations per tensor with the current
batch's min / max, straight-through estimator) at bit-widths drawn uniformly from
``quant_weight_bits`` x ``quant_activation_bits`` (a ``BitSampler``); the teacher and the
intact student stay float, so the quantized student learns from float targets as in SSQL. A
quantized step runs the intact size with probability ``quant_intact_probability`` (the
intact student is never quantized, so without this the full size would never learn to be
quantized), otherwise the sampler's subnet. The bit-widths are run-time values
(``step_choices``: ``weight_bits``, ``activation_bits``; 32 = float on the other steps), so the
run compiles exactly the programs of the same run without quantization (the intact size's
program is the widest width's, which the grid has already). Logs ``weight_bits`` and
``activation_bits`` (32 on float steps). The bit draws' state is part of the checkpointed
sampler state.

``elastic_student=False`` switches the elastic branch off and changes nothing else (the same
heads, targets, KoLeo, iBOT and schedules): the ablation that isolates what the elastic student
buys (benchmarks/quality.py). Then ``λ`` is not used: the intact student's terms get weight 1
(``L_dino = Σ CE(intact_j, T_i) / n_terms``, iBOT on the intact student only), there is no
same-view term, KoLeo is the intact student's alone, no subnet is drawn and every step runs one
program (plan ``None``, or ``POAPlan(None, ibot=True)`` in the iBOT phase). The backbone may
then have a single subnet.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from poa_keras.data.masking import mask_upper_bound
from poa_keras.heads.dino import DINOHead, MultiProjectionHead
from poa_keras.losses import (centered_teacher_probs, dino_cross_entropy, koleo_loss,
                              multi_view_cross_entropy, update_center)
from poa_keras.losses.ibot import (ibot_masked_token_loss, masked_sinkhorn_knopp,
                                   masked_token_positions)
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.teacher_student import (METHOD_DEFAULTS, TeacherStudentTrainer,
                                               flatten_views, split_views, unflatten_views)
from poa_keras.quantization import FLOAT_BITS, BitSampler, QuantConfig

POA_RECIPE = dict(
    schedules_lib.POA_DEFAULTS, **dict(METHOD_DEFAULTS, centering="sinkhorn"),
    lambda_ie=0.8,
    elastic_student=True,    # False: POA without its elastic branch (the ablation baseline)
    same_view_temp=0.1,
    koleo_weight=0.1,
    sampler_seed=0,
    net_select_scale=None,   # None: the backbone's own
    ibot_weight=0.0,         # POA's runs: 1.0; 0 switches the iBOT branch off
    ibot_start_epoch=30,
    ibot_mask_probability=0.5,   # the masks' settings (multicrop_dataset's mask_probability,
    ibot_mask_ratio=(0.1, 0.5),  # mask_ratio): they size the masked-token buffer
    ibot_max_tokens=None,    # None: mask_upper_bound(...); an int; or "all" (2B * N)
    # POA x SSQL (off by default): the elastic student also runs fake-quantized
    quant_weight_bits=None,        # None: off; else the weight bit choices, e.g. (2, ..., 8)
    quant_activation_bits=(4, 5, 6, 7, 8),   # the activation bit choices (SSQL's 4..8)
    quant_probability=0.5,         # share of steps whose elastic student is quantized
    quant_intact_probability=0.25,   # share of quantized steps that run the intact size
    quant_seed=1,                  # seed of the bit draws
)


class POAPlan(NamedTuple):
    """The plan of a POA step in the iBOT phase: the elastic student's subnet, and whether
    the step computes the iBOT branch. (Outside it the plan is the bare subnet spec.)"""

    subnet: object   # the family's subnet spec (ViTSubnet, SwinSubnet, ResNetSubnet)
    ibot: bool = False


class POA(TeacherStudentTrainer):
    """POA trainer: EMA teacher, intact student and elastic student (REFERENCE.md §1).

    Args:
        backbone: the elastic student backbone (any family: ``sampler``, ``feature_dim``,
            ``head_active_in``; iBOT needs ``supports_masks``).
        head: a MultiProjectionHead or DINOHead, or a dict of arguments: with ``out_dim`` a
            single DINOHead, otherwise a MultiProjectionHead (``out_dims``). ``in_dim`` defaults
            to ``backbone.feature_dim()``.
        recipe: schedule keys (``Schedules.from_recipe``; ``epochs``, ``steps_per_epoch``,
            ``batch_size`` required) and method keys: ``lambda_ie`` (0.8), ``student_temp``
            (0.1), ``same_view_temp`` (0.1), ``centering`` ("sinkhorn" | "center"),
            ``center_momentum`` (0.9), ``sinkhorn_iterations`` (3), ``koleo_weight`` (0.1),
            ``sampler_seed`` (0), ``net_select_scale``, ``ibot_weight`` (0: off; POA 1.0),
            ``ibot_start_epoch`` (30), ``ibot_mask_probability`` (0.5), ``ibot_mask_ratio``
            ((0.1, 0.5)), ``ibot_max_tokens`` (None), and the schedule keys
            ``freeze_last_layer_epochs`` (1), ``layer_decay`` (0.9), ``patch_embed_lr_mult``
            (0.2). Defaults: ``POA_RECIPE``.
        clip_grad: "recipe" (POA 1.5), a number or None.
        runtime_depth: the depth as a run-time block mask (one program per width; see "The
            plan" in the module doc). None: on JAX and TensorFlow, not on PyTorch.
    """

    recipe_defaults = POA_RECIPE
    schedule_defaults = schedules_lib.POA_DEFAULTS

    def __init__(self, backbone, head=None, recipe=None, clip_grad="recipe", runtime_depth=None,
                 **kwargs):
        elastic = bool(dict(POA_RECIPE, **(recipe or {}))["elastic_student"])
        if elastic and len(backbone.subnets()) < 2:
            raise ValueError(
                f"POA trains an elastic backbone: its elastic student runs a sub-network other "
                f"than the intact one, but {type(backbone).__name__} {backbone.name!r} has "
                f"{len(backbone.subnets())} subnet ({backbone.subnets()}); give an elastic "
                "configuration (e.g. min_width/min_depth below the full size) or train it "
                "with DINO (or set elastic_student=False)")
        if head is None or isinstance(head, dict):
            config = dict(head or {})
            config.setdefault("in_dim", backbone.feature_dim())
            if "out_dim" in config:
                config.setdefault("name", "dino_head")
                head = DINOHead(**config)
            else:
                config.setdefault("name", "projection_heads")
                head = MultiProjectionHead(**config)
        super().__init__(backbone, head, recipe, clip_grad, **kwargs)
        if float(self.recipe["ibot_weight"] or 0.0) > 0.0 and not backbone.supports_masks:
            raise ValueError(f"ibot_weight={self.recipe['ibot_weight']}: the iBOT masked-patch "
                             f"loss needs a backbone that takes masks (ElasticViT); "
                             f"{type(backbone).__name__} does not: set ibot_weight=0")
        out_dims = head.out_dims if hasattr(head, "out_dims") else [head.out_dim]
        self.out_dims = list(out_dims)
        center = self.recipe["centering"] == "center"
        self.centers = ([self._new_center(d, f"center_{i}") for i, d in enumerate(out_dims)]
                        if center else [])
        self.ibot_centers = ([self._new_center(d, f"ibot_center_{i}")
                              for i, d in enumerate(out_dims)] if center else [])
        self.elastic = elastic
        sampler = backbone.sampler(seed=int(self.recipe["sampler_seed"]),
                                   net_select_scale=self.recipe["net_select_scale"]) \
            if elastic else None
        self._host = types.SimpleNamespace(sampler=sampler, subnet=None, bits=None,
                                           bit_sampler=self._bit_sampler(elastic))
        if runtime_depth is None:
            runtime_depth = keras.backend.backend() in ("jax", "tensorflow")
        self.runtime_depth = bool(runtime_depth) and elastic and backbone.has_elastic_depth()

    # ------------------------------------------------------------------------------ sampling
    def _bit_sampler(self, elastic):
        """POA x SSQL's bit draws (None when quantization is off)."""
        weight_bits = self.recipe["quant_weight_bits"]
        if weight_bits is None:
            return None
        if not elastic:
            raise ValueError("quant_weight_bits quantizes the elastic student: it needs "
                             "elastic_student=True")
        for key in ("quant_probability", "quant_intact_probability"):
            value = self.recipe[key]
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key}={value!r} must lie in [0, 1]")
        bits = BitSampler(weight_bits, self.recipe["quant_activation_bits"],
                          seed=int(self.recipe["quant_seed"]),
                          float_probability=1.0 - float(self.recipe["quant_probability"]))
        bits.intact_rng = np.random.default_rng(int(self.recipe["quant_seed"]) + 1)
        return bits

    @property
    def sampler(self):
        return self._host.sampler

    @property
    def quantized_elastic(self):
        """Whether the elastic student runs fake-quantized on some steps (POA x SSQL)."""
        return self._host.bit_sampler is not None

    def get_sampler_state(self):
        """The subnet sampler's state (JSON-friendly), for checkpoints (None without the
        elastic student); with POA x SSQL also the bit draws'."""
        if self._host.sampler is None:
            return None
        state = self._host.sampler.get_state()
        bits = self._host.bit_sampler
        if bits is not None:
            state = dict(subnets=state, bits=bits.get_state(),
                         intact_rng=bits.intact_rng.bit_generator.state)
        return state

    def set_sampler_state(self, state):
        if self._host.sampler is None or state is None:
            return
        bits = self._host.bit_sampler
        if (bits is not None) != ("bits" in state):
            raise ValueError("the checkpoint's sampler state "
                             + ("has no" if bits is not None else "has")
                             + " bit draws, but this POA run quantizes its elastic student "
                             + ("(quant_weight_bits set)" if bits is not None else "never"))
        if bits is not None:
            bits.set_state(state["bits"])
            bits.intact_rng.bit_generator.state = state["intact_rng"]
            state = state["subnets"]
        self._host.sampler.set_state(state)

    @staticmethod
    def plan_subnet(plan):
        """The elastic student's subnet of a plan (a subnet spec or a POAPlan)."""
        return plan.subnet if isinstance(plan, POAPlan) else plan

    @property
    def last_subnet(self):
        """The subnet the last step's elastic student ran (None before the first step)."""
        return self._host.subnet

    def plan_for(self, subnet, ibot=False):
        """The plan (the program's key) under which the elastic student runs ``subnet``: the
        subnet itself, or with ``runtime_depth`` its width at the intact depth (the depth is
        then the step's ``block_keep`` mask); a ``POAPlan`` in the iBOT phase."""
        static = self.backbone.full_depth_subnet(subnet) \
            if self.runtime_depth and subnet is not None else subnet
        return POAPlan(static, ibot=True) if ibot else static

    def ibot_start_step(self):
        return int(round(float(self.recipe["ibot_start_epoch"] or 0)
                         * int(self.recipe["steps_per_epoch"])))

    def ibot_active(self, step):
        """Whether the step with this 0-based count computes the iBOT branch (if its batch
        has masks)."""
        return float(self.recipe["ibot_weight"] or 0.0) > 0.0 and step >= self.ibot_start_step()

    def next_subnet(self):
        """The elastic student's subnet of the next step (host): the sampler's next draw.
        Override to pin the subnet (benchmarks time one subnet at a time). None without the
        elastic student."""
        return None if self._host.sampler is None else self._host.sampler.next()

    def next_bits(self):
        """POA x SSQL: the (weight_bits, activation_bits) of the next step's elastic student
        ((32, 32): float), and whether it runs the intact size. (None, False) when off."""
        bits = self._host.bit_sampler
        if bits is None:
            return None, False
        drawn = bits.next()
        # always one draw, so the stream does not depend on the branch
        intact = bits.intact_rng.random() < float(self.recipe["quant_intact_probability"])
        return drawn, intact and drawn != (FLOAT_BITS, FLOAT_BITS)

    def next_plan(self):
        bits, intact = self.next_bits()
        subnet = self.backbone.full_subnet if intact else self.next_subnet()
        self._host.subnet, self._host.bits = subnet, bits
        return self.plan_for(subnet, ibot=self.ibot_active(self._current_step()))

    def step_choices(self):
        """With ``runtime_depth``: ``block_keep``, the drawn subnet's block mask; with POA x
        SSQL: ``weight_bits`` and ``activation_bits`` (32: a float step)."""
        choices = {}
        if self.runtime_depth:
            choices["block_keep"] = self.backbone.block_keep(self._host.subnet)
        if self._host.bits is not None:
            choices["weight_bits"] = np.float32(self._host.bits[0])
            choices["activation_bits"] = np.float32(self._host.bits[1])
        return choices

    def host_logs(self):
        """The drawn subnet's size (``width``, ``depth``, ...: ``subnet_log_values``), and with
        POA x SSQL its bit-widths."""
        subnet = self._host.subnet
        logs = {} if subnet is None else dict(self.backbone.subnet_log_values(subnet))
        if self._host.bits is not None:
            logs.update(weight_bits=float(self._host.bits[0]),
                        activation_bits=float(self._host.bits[1]))
        return logs

    def step_hyperparameters(self, step):
        # lambda_ie, koleo_weight and ibot_weight are step values (program arguments), read
        # from the recipe at every step: changing them, or scheduling them, never recompiles.
        # A koleo_weight that is 0/None when a plan is first compiled leaves KoLeo out of that
        # program.
        values = super().step_hyperparameters(step)
        values.update(lambda_ie=float(self.recipe["lambda_ie"]),
                      koleo_weight=float(self.recipe["koleo_weight"] or 0.0),
                      ibot_weight=float(self.recipe["ibot_weight"] or 0.0),
                      last_layer_lr_scale=0.0 if step < self.freeze_last_layer_steps else 1.0)
        return values

    def frozen_variables(self, plan):
        return ()

    def lr_multipliers(self):
        """The shared multipliers (methods/teacher_student.py), and for the heads' last layers
        the step value ``last_layer_lr_scale`` (0 during the freeze steps) on top."""
        multipliers = super().lr_multipliers()
        if not self.freeze_last_layer_steps:
            return multipliers
        variables = self.trainable_variables
        multipliers = list(multipliers) if multipliers is not None else [1.0] * len(variables)
        last = {id(v) for v in self.head.last_layer_variables()}
        return [(m, "last_layer_lr_scale") if id(v) in last else m
                for v, m in zip(variables, multipliers)]

    # -------------------------------------------------------------------------------- forward
    def _heads(self, features, active_in=None):
        out = self.head(features, active_in=active_in)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _student(self, g_flat, l_flat, n_local, subnet, training, masks=None,
                 token_index=None, keep=None, quant=None):
        """(cls of the global views (2B, w), per head logits (2 + v, B, K), per head logits of
        the gathered masked patch tokens (U, K) or None). ``keep``: a run-time block mask;
        ``quant``: the backbone's fake quantization (a QuantConfig) or None."""
        width = None if subnet is None else self.backbone.head_active_in(subnet)
        depth = {} if keep is None else {"keep": keep}
        if quant is not None:
            depth["quant"] = quant
        g_out = self.backbone(g_flat, subnet=subnet, masks=masks, training=training, **depth)
        g_cls = g_out["cls"]
        logits = [[unflatten_views(x, 2)] for x in self._heads(g_cls, width)]
        if l_flat is not None:
            l_cls = self.backbone(l_flat, subnet=subnet, training=training, **depth)["cls"]
            for per_head, x in zip(logits, self._heads(l_cls, width)):
                per_head.append(unflatten_views(x, n_local))
        patch_logits = None
        if token_index is not None:
            tokens = g_out["patch_tokens"]
            tokens = ops.take(ops.reshape(tokens, (-1, tokens.shape[-1])), token_index, axis=0)
            patch_logits = self._heads(tokens, width)
        return g_cls, logits, patch_logits

    # --------------------------------------------------------------------------------- iBOT
    def _ibot_masks(self, data, globals_):
        """The batch's masks as (2B, N) bool, or None when the batch has none."""
        masks = data.get("masks") if isinstance(data, dict) else None
        if masks is None:
            return None
        masks = ops.convert_to_tensor(masks)
        patch = int(self.backbone.patch_size)
        n = (int(globals_.shape[2]) // patch) * (int(globals_.shape[3]) // patch)
        expected = (2, int(globals_.shape[1]), n)
        if tuple(masks.shape) != expected:
            raise ValueError(f"masks must have shape (2, B, N) = {expected} for these global "
                             f"views, got {tuple(masks.shape)}")
        return ops.cast(ops.reshape(masks, (expected[0] * expected[1], n)), "bool")

    def ibot_buffer_size(self, num_images, num_patches):
        """U, the static number of masked-token slots for num_images views of num_patches."""
        total = int(num_images) * int(num_patches)
        setting = self.recipe.get("ibot_max_tokens")
        if setting == "all":
            return total
        if setting is None:
            setting = mask_upper_bound(num_images, num_patches,
                                       float(self.recipe["ibot_mask_probability"]),
                                       tuple(self.recipe["ibot_mask_ratio"]))
        return max(0, min(int(setting), total))

    def patch_targets(self, logits, weights, center=None):
        """Teacher targets (U, K) of the gathered masked patches (logits (U, K), buffer
        weights (U,)): Sinkhorn-Knopp over the masked ones, or centering with `center` (a
        (1, K) variable, updated here with the mean logit of the masked patches)."""
        temp = self.step_values["teacher_temp"]
        if self.recipe["centering"] == "sinkhorn":
            return masked_sinkhorn_knopp(logits, weights, temp,
                                         int(self.recipe["sinkhorn_iterations"]))
        logits = ops.convert_to_tensor(logits)
        probs = centered_teacher_probs(logits, center, temp)
        valid = ops.cast(ops.convert_to_tensor(weights) > 0, logits.dtype)
        count = ops.maximum(ops.sum(valid), 1.0)
        mean = ops.sum(logits * valid[:, None], axis=0, keepdims=True) / count
        center.assign(update_center(center, mean, float(self.recipe["center_momentum"])))
        return probs

    # ------------------------------------------------------------------------- the loss
    def compute_loss_and_logs(self, data, plan, training=True):
        subnet = self.plan_subnet(plan)
        globals_, locals_ = split_views(data)
        g_flat = flatten_views(globals_)
        l_flat = None if locals_ is None else flatten_views(locals_)
        n_local = 0 if locals_ is None else int(locals_.shape[0])

        # iBOT only on plans of the iBOT phase and batches that carry masks.
        masks = self._ibot_masks(data, globals_) if isinstance(plan, POAPlan) and plan.ibot \
            else None
        token_index = token_weights = None
        if masks is not None:
            size = self.ibot_buffer_size(masks.shape[0], masks.shape[1])
            if size > 0:
                token_index, token_weights = masked_token_positions(masks, size)
            else:
                masks = None
        lam = self.step_values["lambda_ie"]
        st = float(self.recipe["student_temp"])
        sv_temp = float(self.recipe["same_view_temp"])

        t_features = self.teacher_features(g_flat)
        t_logits = self.teacher_head_logits(t_features["cls"])
        centers = self.centers or [None] * len(t_logits)
        targets = [self.teacher_targets(t, c) for t, c in zip(t_logits, centers)]

        intact_cls, intact, intact_patch = self._student(g_flat, l_flat, n_local, None,
                                                         training, masks, token_index)
        if self.elastic:
            keep = self.step_values["block_keep"] if self.runtime_depth else None
            quant = None
            if self.quantized_elastic:
                quant = QuantConfig(self.step_values["weight_bits"],
                                    self.step_values["activation_bits"], ranges="batch")
            elastic_cls, elastic, elastic_patch = self._student(
                g_flat, l_flat, n_local, subnet, training, masks, token_index, keep, quant)
            w_i, w_e = lam, 1.0 - lam
        else:   # the ablation: the intact student alone, with weight 1
            elastic_cls, elastic, elastic_patch = None, [None] * len(intact), None
            w_i, w_e = 1.0, 0.0

        dino_i = dino_e = same = 0.0
        for target, views_i, views_e in zip(targets, intact, elastic):
            all_i = ops.concatenate(views_i, axis=0) if len(views_i) > 1 else views_i[0]
            ce_i, n_terms = multi_view_cross_entropy(target, all_i, st)
            dino_i = dino_i + w_i * ce_i / n_terms
            if views_e is None:
                continue
            all_e = ops.concatenate(views_e, axis=0) if len(views_e) > 1 else views_e[0]
            ce_e, _ = multi_view_cross_entropy(target, all_e, st)
            dino_e = dino_e + w_e * ce_e / n_terms
            same_h = 0.0
            for vi, ve in zip(views_i, views_e):  # global views, then local views
                same_target = ops.softmax(ops.stop_gradient(vi) / sv_temp, axis=-1)
                same_h = same_h + dino_cross_entropy(same_target, ve, st)
            same = same + w_e * same_h
        n_heads = float(len(targets))
        dino_i, dino_e, same = dino_i / n_heads, dino_e / n_heads, same / n_heads
        if not self.elastic:
            dino_e = same = ops.zeros((), "float32")
        loss = dino_i + dino_e + same
        koleo = ops.zeros((), "float32")
        if self.recipe["koleo_weight"]:
            # The reference averages the two students' KoLeo terms, each summed over the two
            # global views (never between the two views of one image).
            per_student = []
            for cls in (intact_cls, elastic_cls):
                if cls is None:
                    continue
                per_view = unflatten_views(cls, 2)
                per_student.append(koleo_loss(per_view[0]) + koleo_loss(per_view[1]))
            koleo = self.step_values["koleo_weight"] * sum(per_student) / len(per_student)
            loss = loss + koleo
        ibot = ops.zeros((), "float32")
        if token_index is not None:
            t_tokens = t_features["patch_tokens"]
            t_tokens = ops.take(ops.reshape(t_tokens, (-1, t_tokens.shape[-1])), token_index,
                                axis=0)
            t_patch = self.teacher_head_logits(t_tokens)
            ibot_centers = self.ibot_centers or [None] * len(t_patch)
            num_images = int(masks.shape[0])
            total = 0.0
            elastic_patch = elastic_patch or [None] * len(t_patch)
            for t, c, s_i, s_e in zip(t_patch, ibot_centers, intact_patch, elastic_patch):
                p = self.patch_targets(t, token_weights, c)
                total = total + w_i * ibot_masked_token_loss(p, s_i, token_weights,
                                                             num_images, st)
                if s_e is not None:
                    total = total + w_e * ibot_masked_token_loss(p, s_e, token_weights,
                                                                 num_images, st)
            ibot = self.step_values["ibot_weight"] * total / n_heads
            loss = loss + ibot
        logs = dict(dino_intact=dino_i, dino_elastic=dino_e, same_view=same, koleo=koleo,
                    ibot=ibot, teacher_temp=self.step_values["teacher_temp"],
                    momentum=self.step_values["momentum"])
        return loss, logs

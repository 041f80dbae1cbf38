"""The teacher/student machinery DINO (methods/dino.py) and POA (methods/poa.py) share, on
`PlannedTrainer` (methods/base.py).

Data: a dict ``{"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)}`` ("local" optional), or a
(globals, locals) tuple; ``split_views`` reads it. The EMA teacher (``ema_copy`` of the student
backbone and head, every variable non-trainable, so no optimizer ever touches it) sees the two
global views; the students see every view.

Teacher targets (``recipe["centering"]``):

* ``"center"`` (DINO): ``softmax((t - center) / teacher_temp)``. The center is a non-trainable
  variable (shape (1, K)), updated with ``update_center`` (EMA ``center_momentum`` = 0.9 of the
  batch mean of the raw teacher logits of both global views) INSIDE the step, right after the
  targets were computed from the old center, i.e. in ``compute_loss_and_logs`` and not in
  ``after_optimizer_step``: the teacher logits exist only there, and a teacher forward does not
  depend on the student's update, so this equals DINO's "update after the loss".
* ``"sinkhorn"`` (DINOv2/POA): Sinkhorn-Knopp (``sinkhorn_iterations`` = 3) over the teacher
  logits of both global views together (2B samples).

Schedules come from ``Schedules.from_recipe``: ``learning_rate``, ``weight_decay``, ``momentum``
(teacher EMA) and ``teacher_temp`` are per-step values (``step_hyperparameters``), read inside
the step as ``self.step_values[...]``. The teacher update runs in ``after_optimizer_step``:
``teacher = m * teacher + (1 - m) * student`` for every backbone and head variable, the
non-trainable ones too: a fixed weight-norm gain (which stays 1 in both) and BatchNorm moving
statistics. The teacher runs in inference mode (no stochastic depth; a BatchNorm normalises with
those EMA statistics: Keras' rule for a non-trainable BatchNorm, identical on every backend).
DINO's PyTorch teacher instead normalises each batch with its own batch statistics; the
families POA trains (ViT, Swin, GroupNorm ResNet) have no BatchNorm, so this only concerns a
BatchNorm family trained with DINO.

Per-variable optimisation (both DINO and POA, through PlannedTrainer's hooks):

* Weight decay only on variables with ndim > 1 (REFERENCE §2,
  ``schedules.weight_decay_multiplier``): biases, LayerNorm gains and offsets, LayerScale
  gammas, the mask token (shape (D,)) and the heads' weight-norm gains are registered in the
  optimizer's weight-decay exclusions before the first step (again after every ``compile``).
  DINOv2/POA exclude by name (".bias", "norm", "gamma"), which differs on the mask token
  (theirs is (1, D) and decayed) and on POA's trainable weight-norm gains ``weight_g`` (no
  name match, so POA's code decays them; torch stores them as (K, 1)); here both are ndim 1
  and not decayed.
* Layer-wise lr decay and the patch-embed lr multiplier (recipe ``layer_decay``,
  ``patch_embed_lr_mult``; POA 0.9 and 0.2, DINO 1 and 1): every student-backbone variable gets
  ``backbone.lr_multiplier(path, ...)`` (the family's layer ids, ``Backbone.lr_multiplier``;
  ViT: layer id 0: patch embed, cls/pos/mask tokens; block i: i + 1; final norm: depth + 1,
  multiplier 1), as DINOv2/POA's ``get_params_groups_with_decay`` does on the backbone; the
  heads get 1 (POA builds their param groups on the head module alone, where every layer id is
  num_layers + 1). The multipliers scale each variable's optimizer update
  (``PlannedTrainer.lr_multipliers``), which equals PyTorch param groups with
  ``lr * multiplier`` for AdamW. Computed when the train function is made: change the recipe
  before ``compile``.

Several devices: under a keras.distribution DataParallel distribution (JAX) the step sees the
global batch (SPMD), so the center and the Sinkhorn-Knopp sums are the reference's all-reduced
ones (methods/base.py).
"""
from __future__ import annotations

import types

import keras
from keras import ops

from poa_keras.losses import centered_teacher_probs, sinkhorn_knopp, update_center
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods import torch_fused
from poa_keras.methods.base import PlannedTrainer

# Method settings shared by DINO and POA (the schedule keys are schedules.*_DEFAULTS).
METHOD_DEFAULTS = dict(
    student_temp=0.1,
    centering="center",
    center_momentum=0.9,
    sinkhorn_iterations=3,
)


def split_views(data):
    """(globals (2, B, H, W, C), locals (v, B, h, w, C) or None) from a batch."""
    if isinstance(data, dict):
        globals_, locals_ = data["global"], data.get("local")
    elif isinstance(data, (tuple, list)) and len(data) in (1, 2):
        globals_, locals_ = data[0], (data[1] if len(data) == 2 else None)
    else:
        raise ValueError('a batch must be {"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)}')
    globals_ = ops.convert_to_tensor(globals_)
    if len(globals_.shape) != 5:
        raise ValueError(f"global views must have shape (2, B, H, W, C), got {globals_.shape}")
    if locals_ is not None:
        locals_ = ops.convert_to_tensor(locals_)
        if len(locals_.shape) != 5:
            raise ValueError(f"local views must have shape (v, B, h, w, C), got {locals_.shape}")
        if locals_.shape[0] == 0:
            locals_ = None
    return globals_, locals_


def flatten_views(x):
    """(V, B, ...) -> (V * B, ...): one backbone pass over every view of one size."""
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


def unflatten_views(x, n_views):
    """(V * B, ...) -> (V, B, ...)."""
    return ops.reshape(x, (n_views, -1) + tuple(x.shape[1:]))


def ema_copy(layer, name):
    """A non-trainable copy of `layer` (same config and weights) named `name`."""
    config = dict(layer.get_config())
    config["name"] = name
    copy = type(layer).from_config(config)
    copy.set_weights(layer.get_weights())
    return copy


class TeacherStudentTrainer(PlannedTrainer):
    """What DINO and POA share: the recipe and its schedules, an EMA teacher copy of a student
    (backbone, head), teacher targets (centering or Sinkhorn-Knopp) and the EMA update."""

    recipe_defaults = dict(schedules_lib.DINO_DEFAULTS, **METHOD_DEFAULTS)
    schedule_defaults = schedules_lib.DINO_DEFAULTS

    def __init__(self, backbone, head, recipe=None, clip_grad="recipe", **kwargs):
        recipe = dict(self.recipe_defaults, **(recipe or {}))
        if recipe["centering"] not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got "
                             f"{recipe['centering']!r}")
        sched = schedules_lib.Schedules.from_recipe(recipe, defaults=self.schedule_defaults)
        super().__init__(clip_grad=sched.clip_grad if clip_grad == "recipe" else clip_grad,
                         **kwargs)
        self.recipe = recipe
        self.schedules = sched
        steps_per_epoch = int(recipe["steps_per_epoch"])
        freeze = int(round(float(recipe.get("freeze_last_layer_epochs") or 0) * steps_per_epoch))
        self.freeze_last_layer_steps = min(freeze, sched.total_steps)
        self.backbone = backbone
        self.head = head
        self.teacher_backbone = ema_copy(backbone, f"teacher_{backbone.name}")
        self.teacher_head = ema_copy(head, f"teacher_{head.name}")
        pairs = []
        for student, teacher in ((backbone, self.teacher_backbone), (head, self.teacher_head)):
            s_w, t_w = student.weights, teacher.weights
            if len(s_w) != len(t_w) or any(tuple(a.shape) != tuple(b.shape)
                                           for a, b in zip(s_w, t_w)):
                raise ValueError(f"the teacher copy of {student.name} does not match it")
            pairs.extend(zip(s_w, t_w))
        self.teacher_backbone.trainable = False
        self.teacher_head.trainable = False
        # A plain object: Keras must not track the (already tracked) variables a second time.
        self._ema = types.SimpleNamespace(pairs=pairs)

    # ------------------------------------------------------------------------------ schedule
    def _current_step(self):
        step = self.host_step
        return 0 if step is None else int(step)

    def step_hyperparameters(self, step):
        s = self.schedules.at(step)
        return dict(learning_rate=s["lr"], weight_decay=s["weight_decay"],
                    momentum=s["momentum"], teacher_temp=s["teacher_temp"])

    # ------------------------------------------------- per-variable lr and weight decay
    def backbone_lr_multiplier(self, variable):
        """The layer-decay x patch-embed lr multiplier of one student-backbone variable (the
        backbone's ``lr_multiplier`` hook)."""
        return self.backbone.lr_multiplier(variable.path, self.schedules.layer_decay,
                                           self.schedules.patch_embed_lr_mult)

    def lr_multipliers(self):
        """Student backbone: layer decay x patch-embed multiplier; heads: 1."""
        backbone = {id(v) for v in self.backbone.trainable_variables}
        multipliers = [self.backbone_lr_multiplier(v) if id(v) in backbone else 1.0
                       for v in self.trainable_variables]
        return None if all(m == 1.0 for m in multipliers) else multipliers

    def no_weight_decay_variables(self):
        """Every trainable variable with ndim <= 1 (REFERENCE §2)."""
        return [v for v in self.trainable_variables
                if schedules_lib.weight_decay_multiplier(v.shape) == 0.0]

    # ------------------------------------------------------------------------------- teacher
    def teacher_features(self, globals_flat):
        """The teacher backbone's outputs on the flattened global views (a dict of tensors
        without gradient: "cls" (2B, D), "patch_tokens" (2B, N, D), ...; nested entries such
        as per-stage feature maps are stopped too)."""
        out = self.teacher_backbone(globals_flat, training=False)
        return keras.tree.map_structure(ops.stop_gradient, out)

    def teacher_head_logits(self, features):
        """Raw teacher-head logits of features (..., D): one tensor per head (a list),
        without gradient."""
        out = self.teacher_head(features)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [ops.stop_gradient(o) for o in out]

    def teacher_logits(self, globals_flat):
        """Raw teacher logits of the flattened global views: one (2B, K) tensor per head
        (a list), without gradient."""
        return self.teacher_head_logits(self.teacher_features(globals_flat)["cls"])

    def teacher_targets(self, logits, center=None):
        """Targets (2, B, K) from raw teacher logits (2B, K). With centering="center", also
        stores the updated center in `center` (after computing the targets from the old one)."""
        temp = self.step_values["teacher_temp"]
        if self.recipe["centering"] == "sinkhorn":
            probs = sinkhorn_knopp(logits, temp, int(self.recipe["sinkhorn_iterations"]))
        else:
            probs = centered_teacher_probs(logits, center, temp)
            center.assign(update_center(center, logits, float(self.recipe["center_momentum"])))
        return unflatten_views(probs, 2)

    def after_optimizer_step(self, plan):
        m = self.step_values["momentum"]
        pairs = self._ema.pairs
        if self.fused_step() and all(t.dtype == s.dtype == "float32" for s, t in pairs):
            torch_fused.ema_([t.value for _, t in pairs], [s.value for s, _ in pairs], m)
            return
        for s, t in pairs:
            t.assign(ops.cast(m * ops.cast(t.value, "float32")
                              + (1.0 - m) * ops.cast(s.value, "float32"), t.dtype))

    def _new_center(self, out_dim, name):
        return self.add_weight(shape=(1, int(out_dim)), initializer="zeros", trainable=False,
                               name=name)



"""DINO self-distillation (REFERENCE.md §2) as a `PlannedTrainer`, and the teacher/student
machinery that POA (methods/poa.py) shares with it.

Data: a dict ``{"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)}`` ("local" optional).
The EMA teacher (a copy of the student backbone and head, every variable non-trainable, so no
optimizer ever touches it) sees the two global views; the student sees every view. Loss::

    multi_view_cross_entropy(teacher targets, student logits) / n_terms

over every (teacher global view i, student view j != i) pair, n_terms = 2 * (2 - 1) + 2 * v.

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
``teacher = m * teacher + (1 - m) * student`` for every backbone and head variable (the
non-trainable ones too, e.g. a fixed weight-norm gain, which stays 1 in both).

The last-layer freeze (``freeze_last_layer_epochs``) is part of DINO's plan: the plan is the
bool "this step freezes the head's last layer", so at most two programs are compiled. A frozen
step drops the last layer's gradient, as DINO's ``cancel_gradients_last_layer`` does (no update,
no weight decay, no optimizer-moment update). (POA freezes it the DINOv2 way instead: see
methods/poa.py.)

Per-variable optimisation (both DINO and POA, through PlannedTrainer's hooks):

* Weight decay only on variables with ndim > 1 (REFERENCE §2): biases, LayerNorm gains and
  offsets, LayerScale gammas, the mask token (shape (D,)) and the heads' weight-norm gains are
  registered in the optimizer's weight-decay exclusions before the first step (again after every
  ``compile``). DINOv2/POA exclude by name (".bias", "norm", "gamma"), which differs only on the
  mask token (theirs is (1, D) and decayed).
* Layer-wise lr decay and the patch-embed lr multiplier (recipe ``layer_decay``,
  ``patch_embed_lr_mult``; POA 0.9 and 0.2, DINO 1 and 1): every student-backbone variable gets
  ``backbone.lr_multiplier(path, ...)`` (ViT: ``schedules.vit_lr_multiplier``; layer id 0:
  patch embed, cls/pos/mask tokens; block i: i + 1; final norm: depth + 1, multiplier 1), as
  DINOv2/POA's
  ``get_params_groups_with_decay`` does on the backbone; the heads get 1 (POA builds their param
  groups on the head module alone, where every layer id is num_layers + 1). The multipliers scale
  each variable's optimizer update (``PlannedTrainer.lr_multipliers``), which equals PyTorch param
  groups with ``lr * multiplier`` for AdamW. Computed when the train function is made: change the
  recipe before ``compile``.

Not implemented here: multi-device center/Sinkhorn sums.
"""
from __future__ import annotations

import types

import keras
from keras import ops

from poa_keras.losses import (centered_teacher_probs, multi_view_cross_entropy, sinkhorn_knopp,
                              update_center)
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.base import PlannedTrainer

# Method settings shared by DINO and POA (the schedule keys are schedules.*_DEFAULTS).
_METHOD_DEFAULTS = dict(
    student_temp=0.1,
    centering="center",
    center_momentum=0.9,
    sinkhorn_iterations=3,
)

DINO_RECIPE = dict(schedules_lib.DINO_DEFAULTS, **_METHOD_DEFAULTS)


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

    recipe_defaults = DINO_RECIPE
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
        step = self._plans.host_step
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
        return [v for v in self.trainable_variables if len(v.shape) <= 1]

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
        for s, t in self._ema.pairs:
            t.assign(ops.cast(m * ops.cast(t.value, "float32")
                              + (1.0 - m) * ops.cast(s.value, "float32"), t.dtype))

    def _new_center(self, out_dim, name):
        return self.add_weight(shape=(1, int(out_dim)), initializer="zeros", trainable=False,
                               name=name)


class DINO(TeacherStudentTrainer):
    """DINO: student backbone + DINOHead, EMA teacher (REFERENCE.md §2).

    Args:
        backbone: the student backbone (e.g. ElasticViT); DINO trains its full network.
        head: a DINOHead on the backbone's CLS features, or a dict of DINOHead arguments
            (``in_dim`` defaults to ``backbone.feature_dim()``).
        recipe: dict of schedule keys (``Schedules.from_recipe``: ``epochs``,
            ``steps_per_epoch`` and ``batch_size`` are required) and method keys:
            ``student_temp`` (0.1), ``centering`` ("center" | "sinkhorn"), ``center_momentum``
            (0.9), ``sinkhorn_iterations`` (3); ``layer_decay`` and ``patch_embed_lr_mult``
            (DINO: 1.0, off) and ``freeze_last_layer_epochs`` (1) as in the module doc.
            Defaults: ``DINO_RECIPE``.
        clip_grad: "recipe" (the recipe's ``clip_grad``, DINO 3.0), a number or None.

    Logs: ``loss``, ``dino`` (= loss), ``teacher_temp``, ``momentum``, ``grad_norm``.
    """

    def __init__(self, backbone, head=None, recipe=None, clip_grad="recipe", **kwargs):
        from poa_keras.heads.dino import DINOHead

        if head is None or isinstance(head, dict):
            config = dict(head or {})
            config.setdefault("in_dim", backbone.feature_dim())
            config.setdefault("name", "dino_head")
            head = DINOHead(**config)
        super().__init__(backbone, head, recipe, clip_grad, **kwargs)
        self.center = self._new_center(head.out_dim, "center")

    def next_plan(self):
        return self._current_step() < self.freeze_last_layer_steps

    def frozen_variables(self, plan):
        return self.head.last_layer_variables() if plan else ()

    def compute_loss_and_logs(self, data, plan, training=True):
        globals_, locals_ = split_views(data)
        g_flat = flatten_views(globals_)
        (t_logits,) = self.teacher_logits(g_flat)
        targets = self.teacher_targets(t_logits, self.center)
        student = [unflatten_views(self.head(self.backbone(g_flat, training=training)["cls"]),
                                   2)]
        if locals_ is not None:
            l_logits = self.head(self.backbone(flatten_views(locals_), training=training)["cls"])
            student.append(unflatten_views(l_logits, locals_.shape[0]))
        student = ops.concatenate(student, axis=0) if len(student) > 1 else student[0]
        total, n_terms = multi_view_cross_entropy(targets, student,
                                                  float(self.recipe["student_temp"]))
        loss = total / n_terms
        return loss, {"dino": loss, "teacher_temp": self.step_values["teacher_temp"],
                      "momentum": self.step_values["momentum"]}

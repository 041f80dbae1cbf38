"""DINO self-distillation (REFERENCE.md §2) as a teacher/student trainer
(methods/teacher_student.py: EMA teacher, views, targets, per-variable optimisation).

The student backbone and its DINOHead see every view, the EMA teacher the two global views.
Loss::

    multi_view_cross_entropy(teacher targets, student logits) / n_terms

over every (teacher global view i, student view j != i) pair, n_terms = 2 * (2 - 1) + 2 * v.
Teacher targets: DINO centering (default) or Sinkhorn-Knopp (see teacher_student.py).

The last-layer freeze (``freeze_last_layer_epochs``) is part of DINO's plan: the plan is the
bool "this step freezes the head's last layer", so at most two programs are compiled. A frozen
step drops the last layer's gradient, as DINO's ``cancel_gradients_last_layer`` does (no update,
no weight decay, no optimizer-moment update). (POA freezes it the DINOv2 way instead: see
methods/poa.py.)
"""
from __future__ import annotations

from keras import ops

from poa_keras.heads.dino import DINOHead
from poa_keras.losses import multi_view_cross_entropy
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.teacher_student import (METHOD_DEFAULTS, TeacherStudentTrainer,
                                               flatten_views, split_views, unflatten_views)

DINO_RECIPE = dict(schedules_lib.DINO_DEFAULTS, **METHOD_DEFAULTS)


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

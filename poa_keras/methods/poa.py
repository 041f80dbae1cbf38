"""POA -- Pre-training Once for All (REFERENCE.md §1) as a `PlannedTrainer`.

Three branches sharing one set of student weights:

* teacher: EMA of the intact student (backbone + heads), non-trainable, sees the 2 global views;
* intact student: the full network, on every view;
* elastic student: a sub-network (``ViTSubnet``) drawn on the host every step by the
  backbone's ``SubnetSampler`` (never the intact network). The plan of a step IS that
  ViTSubnet: one compiled program per subnet. The heads are shared: the elastic student's CLS
  features of width w enter the heads with ``active_in=w`` (the elastic first linear).

Per projection head (``MultiProjectionHead``, or one ``DINOHead``), with λ = ``lambda_ie``::

    L_dino = [λ · Σ CE(intact_j, T_i) + (1 - λ) · Σ CE(elastic_j, T_i)] / n_terms
             (pairs: teacher global view i, student view j != i; n_terms = 2 + 2 v)
    L_same = (1 - λ) · [CE(elastic, softmax(intact.detach() / 0.1)) on the global views
                        + the same on the local views]

where each same-view CE is the mean over the views of that crop size and the batch (the
reference calls its loss on the flattened global / local tensors, as DINOv2 does); it is not
divided by n_terms. Total = mean over heads of (L_dino + L_same), plus ``koleo_weight`` times
KoLeo on the intact student's global CLS tokens (summed over the two global views, DINOv2
style; 0 switches it off).

Teacher targets: Sinkhorn-Knopp (default) or DINO centering (one center per head, updated
inside the step after its targets were computed; see methods/dino.py).

``lambda_ie`` and ``koleo_weight`` are read from ``self.recipe`` at every step and enter the
compiled step as arguments (``step_values``), like the schedules.

Logs: ``dino_intact``, ``dino_elastic``, ``same_view`` (each the weighted contribution to the
loss, averaged over heads), ``koleo`` (weighted), ``width``, ``depth`` (the elastic student's
subnet), ``teacher_temp``, ``momentum``. ``loss`` = dino_intact + dino_elastic + same_view +
koleo.

Not implemented: the iBOT masked-patch loss (REFERENCE §1: mask prob 0.5, ratio 0.1-0.5, same λ
split, from epoch 30) -- it would add per-head patch heads and a masks entry to the batch;
the last-layer freeze (the plan is the ViTSubnet only, so ``freeze_last_layer_epochs`` is
ignored); layer-wise lr decay and the patch-embed lr multiplier.
"""
from __future__ import annotations

import types

from keras import ops

from poa_keras.losses import dino_cross_entropy, koleo_loss, multi_view_cross_entropy
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.dino import (_METHOD_DEFAULTS, TeacherStudentTrainer, flatten_views,
                                    split_views, unflatten_views)

POA_RECIPE = dict(
    schedules_lib.POA_DEFAULTS, **dict(_METHOD_DEFAULTS, centering="sinkhorn"),
    lambda_ie=0.8,
    same_view_temp=0.1,
    koleo_weight=0.1,
    sampler_seed=0,
    net_select_scale=None,   # None: the backbone's own
)


class POA(TeacherStudentTrainer):
    """POA trainer: EMA teacher, intact student and elastic student (REFERENCE.md §1).

    Args:
        backbone: the elastic student backbone (ElasticViT: ``sampler``, ``embed_dim``).
        head: a MultiProjectionHead or DINOHead, or a dict of arguments: with ``out_dim`` a
            single DINOHead, otherwise a MultiProjectionHead (``out_dims``). ``in_dim`` defaults
            to ``backbone.embed_dim``.
        recipe: schedule keys (``Schedules.from_recipe``; ``epochs``, ``steps_per_epoch``,
            ``batch_size`` required) and method keys: ``lambda_ie`` (0.8), ``student_temp``
            (0.1), ``same_view_temp`` (0.1), ``centering`` ("sinkhorn" | "center"),
            ``center_momentum`` (0.9), ``sinkhorn_iterations`` (3), ``koleo_weight`` (0.1),
            ``sampler_seed`` (0), ``net_select_scale``. Defaults: ``POA_RECIPE``.
        clip_grad: "recipe" (POA 1.5), a number or None.
    """

    recipe_defaults = POA_RECIPE
    schedule_defaults = schedules_lib.POA_DEFAULTS

    def __init__(self, backbone, head=None, recipe=None, clip_grad="recipe", **kwargs):
        from poa_keras.heads.dino import DINOHead, MultiProjectionHead

        if head is None or isinstance(head, dict):
            config = dict(head or {})
            config.setdefault("in_dim", backbone.embed_dim)
            if "out_dim" in config:
                config.setdefault("name", "dino_head")
                head = DINOHead(**config)
            else:
                config.setdefault("name", "projection_heads")
                head = MultiProjectionHead(**config)
        super().__init__(backbone, head, recipe, clip_grad, **kwargs)
        out_dims = head.out_dims if hasattr(head, "out_dims") else [head.out_dim]
        self.out_dims = list(out_dims)
        self.centers = ([self._new_center(d, f"center_{i}") for i, d in enumerate(out_dims)]
                        if self.recipe["centering"] == "center" else [])
        sampler = backbone.sampler(seed=int(self.recipe["sampler_seed"]),
                                   net_select_scale=self.recipe["net_select_scale"])
        self._host = types.SimpleNamespace(sampler=sampler)

    # ------------------------------------------------------------------------------ sampling
    @property
    def sampler(self):
        return self._host.sampler

    def get_sampler_state(self):
        """The subnet sampler's state (JSON-friendly), for checkpoints."""
        return self._host.sampler.get_state()

    def set_sampler_state(self, state):
        self._host.sampler.set_state(state)

    def next_plan(self):
        return self._host.sampler.next()

    def step_hyperparameters(self, step):
        # lambda_ie and koleo_weight are step values (program arguments), read from the recipe
        # at every step: changing them, or scheduling them, never recompiles. A koleo_weight
        # that is 0/None when a plan is first compiled leaves KoLeo out of that program.
        values = super().step_hyperparameters(step)
        values.update(lambda_ie=float(self.recipe["lambda_ie"]),
                      koleo_weight=float(self.recipe["koleo_weight"] or 0.0))
        return values

    def frozen_variables(self, plan):
        return ()

    # -------------------------------------------------------------------------------- forward
    def _heads(self, features, active_in=None):
        out = self.head(features, active_in=active_in)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _student(self, g_flat, l_flat, n_local, subnet, training):
        """(cls of the global views (2B, w), per head logits (2 + v, B, K))."""
        width = None if subnet is None else subnet.width
        g_cls = self.backbone(g_flat, subnet=subnet, training=training)["cls"]
        logits = [[unflatten_views(x, 2)] for x in self._heads(g_cls, width)]
        if l_flat is not None:
            l_cls = self.backbone(l_flat, subnet=subnet, training=training)["cls"]
            for per_head, x in zip(logits, self._heads(l_cls, width)):
                per_head.append(unflatten_views(x, n_local))
        return g_cls, logits

    def compute_loss_and_logs(self, data, plan, training=True):
        lam = self.step_values["lambda_ie"]
        st = float(self.recipe["student_temp"])
        sv_temp = float(self.recipe["same_view_temp"])
        globals_, locals_ = split_views(data)
        g_flat = flatten_views(globals_)
        l_flat = None if locals_ is None else flatten_views(locals_)
        n_local = 0 if locals_ is None else int(locals_.shape[0])

        t_logits = self.teacher_logits(g_flat)
        centers = self.centers or [None] * len(t_logits)
        targets = [self.teacher_targets(t, c) for t, c in zip(t_logits, centers)]

        intact_cls, intact = self._student(g_flat, l_flat, n_local, None, training)
        _, elastic = self._student(g_flat, l_flat, n_local, plan, training)

        dino_i = dino_e = same = 0.0
        for target, views_i, views_e in zip(targets, intact, elastic):
            all_i = ops.concatenate(views_i, axis=0) if len(views_i) > 1 else views_i[0]
            all_e = ops.concatenate(views_e, axis=0) if len(views_e) > 1 else views_e[0]
            ce_i, n_terms = multi_view_cross_entropy(target, all_i, st)
            ce_e, _ = multi_view_cross_entropy(target, all_e, st)
            dino_i = dino_i + lam * ce_i / n_terms
            dino_e = dino_e + (1.0 - lam) * ce_e / n_terms
            same_h = 0.0
            for vi, ve in zip(views_i, views_e):  # global views, then local views
                same_target = ops.softmax(ops.stop_gradient(vi) / sv_temp, axis=-1)
                same_h = same_h + dino_cross_entropy(same_target, ve, st)
            same = same + (1.0 - lam) * same_h
        n_heads = float(len(targets))
        dino_i, dino_e, same = dino_i / n_heads, dino_e / n_heads, same / n_heads
        loss = dino_i + dino_e + same
        koleo = ops.zeros((), "float32")
        if self.recipe["koleo_weight"]:
            per_view = unflatten_views(intact_cls, 2)
            koleo = self.step_values["koleo_weight"] * (koleo_loss(per_view[0])
                                                        + koleo_loss(per_view[1]))
            loss = loss + koleo
        logs = dict(dino_intact=dino_i, dino_elastic=dino_e, same_view=same, koleo=koleo,
                    width=float(plan.width), depth=float(plan.depth),
                    teacher_temp=self.step_values["teacher_temp"],
                    momentum=self.step_values["momentum"])
        return loss, logs

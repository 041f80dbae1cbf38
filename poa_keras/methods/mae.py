"""MAE (He et al., CVPR 2022) and MAE-Lite's attention distillation (Wang et al., ICML 2023) as a
`PlannedTrainer` (REFERENCE.md §3).

Each step, with images x (B, H, W, C) and the step's masking noise (B, N)::

    ids_keep, mask, ids_restore = mae_masking(noise, K)         K = int(N (1 - mask_ratio))
    latent = encoder(x, visible_ids=ids_keep)                   only the K visible patches
    pred   = decoder(concat(cls, patch_tokens), ids_restore)    (B, N, p * p * C)
    loss   = mae_loss(pred, x, mask)                            masked patches only

and with a teacher (MAE-Lite's distillation; a frozen, larger MAE encoder, inference mode)::

    A_s = encoder's pre-softmax attention logits of ``distill_blocks``  (B, h_s, 1 + K, 1 + K)
    A_t = teacher(x, visible_ids=ids_keep)'s, of ``teacher_blocks``   (the SAME visible tokens)
    loss += distill_weight * mean_blocks MSE(head_mapping(A_s), stop_gradient(A_t))

The encoder is an ``ElasticViT`` (``pos_embed="sincos"`` for MAE's fixed embedding) and stays
one: ``encoder.extract(...)`` and presets work as for POA. The masking noise comes from the
host (``step_choices``): per step a seeded numpy draw from (``mask_seed``, step), so the masks
are the same on every backend and a resumed run draws what the uninterrupted run drew. Its
values are ranks (``data.masking.random_masking_noise``), so argsort has no ties.

Optimisation (MAE's recipe): AdamW (0.9, 0.95), lr ``lr x batch / 256`` (``lr_scaling``
"linear"), a linear warmup from 0 over ``warmup_epochs`` then a cosine to ``min_lr``, per step;
weight decay 0.05 except on parameters with ndim <= 1 (MAE's ``add_weight_decay``: biases and
norms; the CLS and mask tokens, (1, 1, D), are decayed as in MAE); no gradient clipping.

Data: ``{"global": (V, B, H, W, 3)}`` (the first view is used; ``pretrain`` makes one view:
``MAE_DATA_DEFAULTS``), or an image batch (B, H, W, 3). The plan is always None: one program.

Logs: ``loss``, ``mae_loss``, ``distill_loss`` (with a teacher), ``lr``.

Recipe keys (``MAE_RECIPE``; ``epochs``, ``steps_per_epoch``, ``batch_size`` required):
``lr`` (1.5e-4), ``lr_scaling`` ("linear"), ``reference_batch`` (None: 256), ``min_lr`` (0),
``warmup_epochs`` (40), ``weight_decay`` (0.05), ``mask_ratio`` (0.75), ``norm_pix_loss``
(True), ``mask_seed`` (0), ``clip_grad`` (None), ``distill_weight`` (1.0), ``distill_blocks``
([-1]: the last block the encoder runs), ``teacher_blocks`` (None: the same positions).
"""
from __future__ import annotations

import numpy as np
from keras import ops

from poa_keras.data.masking import num_visible_patches, random_masking_noise
from poa_keras.heads.mae import AttentionHeadMapping, MAEDecoder
from poa_keras.losses.mae import attention_distillation_loss, mae_loss, mae_masking
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.simsiam import checked_recipe

MAE_RECIPE = dict(
    lr=1.5e-4,                # base lr at batch 256 (MAE, MAE-Lite)
    lr_scaling="linear",
    reference_batch=None,     # None: 256
    min_lr=0.0,
    warmup_epochs=40,
    weight_decay=0.05,
    mask_ratio=0.75,
    norm_pix_loss=True,
    mask_seed=0,
    clip_grad=None,
    distill_weight=1.0,       # with a teacher (MAE-Lite: 1.0)
    distill_blocks=(-1,),     # positions among the blocks the encoder runs (-1: the last)
    teacher_blocks=None,      # None: the same positions in the teacher
)


def learning_rate_schedule(recipe, steps_per_epoch=None):
    """The per-step learning rate of an MAE recipe (float64, epochs x steps_per_epoch): linear
    warmup from 0 over ``warmup_epochs``, then a cosine from the scaled ``lr`` to ``min_lr``."""
    return schedules_lib.warmup_cosine_lr(dict(MAE_RECIPE, **recipe), steps_per_epoch)


def _positions(value, what):
    items = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not items or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                        for i in items):
        raise ValueError(f"{what} must be a non-empty list of block positions (ints; -1 = the "
                         f"last block), got {value!r}")
    return tuple(int(i) for i in items)


class MAE(schedules_lib.PerStepLearningRate, PlannedTrainer):
    """MAE pretraining of an ``ElasticViT`` encoder, with MAE-Lite's attention distillation when
    a ``teacher`` is given (module docstring).

    Args:
        backbone: the encoder, an ``ElasticViT`` (its full network is trained).
        decoder: an ``MAEDecoder``, or a dict of its arguments (``in_dim``, ``patch_size`` and
            ``in_channels`` default to the encoder's; MAE-Lite: dim 96, depth 1, 3 heads).
        recipe: the recipe dict (module docstring); defaults ``MAE_RECIPE``.
        teacher: None, or a frozen ``ElasticViT`` MAE encoder with the encoder's patch size
            (MAE-Lite: MAE-Base); it runs in inference mode and never gets a gradient.
        head_mapping: None (made: student heads -> teacher heads) or an
            ``AttentionHeadMapping``; only with a teacher.
        clip_grad: "recipe" (the recipe's ``clip_grad``), a number or None.
    """

    recipe_defaults = MAE_RECIPE

    def __init__(self, backbone, decoder=None, recipe=None, teacher=None, head_mapping=None,
                 clip_grad="recipe", **kwargs):
        recipe = checked_recipe(recipe, self.recipe_defaults, type(self).__name__)
        if getattr(backbone, "family", None) != "ViT":
            raise ValueError(f"MAE trains a ViT encoder (ElasticViT); {backbone.name} is a "
                             f"{getattr(backbone, 'family', type(backbone).__name__)} backbone")
        lr = learning_rate_schedule(recipe)
        super().__init__(clip_grad=recipe["clip_grad"] if clip_grad == "recipe" else clip_grad,
                         **kwargs)
        self.recipe = recipe
        self.lr_schedule = lr
        self.batch_size = int(recipe["batch_size"])
        self.backbone = backbone
        grid = backbone.grid_size
        self.num_patches = grid * grid
        self.num_visible = num_visible_patches(self.num_patches, recipe["mask_ratio"])
        if decoder is None or isinstance(decoder, dict):
            config = dict(decoder or {})
            config.setdefault("in_dim", backbone.embed_dim)
            config.setdefault("patch_size", backbone.patch_size)
            config.setdefault("in_channels", backbone.in_channels)
            config.setdefault("name", "decoder")
            decoder = MAEDecoder(**config)
            decoder.build()
        if (decoder.in_dim, decoder.patch_size, decoder.in_channels) != (
                backbone.embed_dim, backbone.patch_size, backbone.in_channels):
            raise ValueError(f"the decoder (in_dim {decoder.in_dim}, patch {decoder.patch_size}, "
                             f"{decoder.in_channels} channels) does not fit the encoder "
                             f"(width {backbone.embed_dim}, patch {backbone.patch_size}, "
                             f"{backbone.in_channels} channels)")
        self.decoder = decoder
        self.teacher = teacher
        self.head_mapping = None
        self.distill_blocks = self.teacher_blocks = ()
        if teacher is not None:
            self._set_up_distillation(teacher, head_mapping)
        elif head_mapping is not None:
            raise ValueError("head_mapping is only used with a teacher")

    def _set_up_distillation(self, teacher, head_mapping):
        if getattr(teacher, "family", None) != "ViT":
            raise ValueError(f"the distillation teacher must be a ViT (ElasticViT) with global "
                             f"attention; {teacher.name} is a "
                             f"{getattr(teacher, 'family', type(teacher).__name__)} backbone")
        if teacher.patch_size != self.backbone.patch_size:
            raise ValueError(f"the teacher {teacher.name} has patch size {teacher.patch_size}, "
                             f"the student {self.backbone.patch_size}: attention distillation "
                             "needs the same patch grid (the same visible tokens); give a "
                             f"teacher with patch size {self.backbone.patch_size}")
        self.distill_blocks = _positions(self.recipe["distill_blocks"], "distill_blocks")
        teacher_blocks = self.recipe["teacher_blocks"]
        self.teacher_blocks = (self.distill_blocks if teacher_blocks is None
                               else _positions(teacher_blocks, "teacher_blocks"))
        if len(self.teacher_blocks) != len(self.distill_blocks):
            raise ValueError(f"teacher_blocks {self.teacher_blocks} and distill_blocks "
                             f"{self.distill_blocks} must pair up (the same length)")
        for what, blocks, depth in (("distill_blocks", self.distill_blocks, self.backbone.depth),
                                    ("teacher_blocks", self.teacher_blocks, teacher.depth)):
            bad = [b for b in blocks if not -depth <= b < depth]
            if bad:
                raise ValueError(f"{what} {bad}: the model runs {depth} blocks (0..{depth - 1}, "
                                 f"or -{depth}..-1)")
        teacher.trainable = False
        student_heads = self.backbone.embed_dim // self.backbone.head_dim
        teacher_heads = teacher.embed_dim // teacher.head_dim
        if head_mapping is None:
            head_mapping = AttentionHeadMapping(student_heads, teacher_heads, name="head_mapping")
            head_mapping.build()
        if (head_mapping.student_heads, head_mapping.teacher_heads) != (student_heads,
                                                                         teacher_heads):
            raise ValueError(f"head_mapping maps {head_mapping.student_heads} -> "
                             f"{head_mapping.teacher_heads} heads; the student has "
                             f"{student_heads}, the teacher {teacher_heads}")
        self.head_mapping = head_mapping

    # ------------------------------------------------------------------------------ schedule
    def step_hyperparameters(self, step):
        return {"learning_rate": self.learning_rate_at(step),
                "weight_decay": float(self.recipe["weight_decay"])}

    def masking_noise(self, step):
        """The (B, N) masking noise of the 0-based step: a numpy draw seeded with
        (``mask_seed``, step), so every backend and a resumed run draw the same masks."""
        rng = np.random.default_rng([int(self.recipe["mask_seed"]), int(step)])
        return random_masking_noise(self.batch_size, self.num_patches, rng)

    def step_choices(self):
        return {"mask_noise": self.masking_noise(self.host_step)}

    def no_weight_decay_variables(self):
        """Every trainable variable with ndim <= 1 (MAE's ``add_weight_decay``)."""
        return [v for v in self.trainable_variables
                if schedules_lib.weight_decay_multiplier(v.shape) == 0.0]

    # ------------------------------------------------------------------------------- forward
    def images(self, data):
        """The batch's images (B, H, W, C): the first view of a multi-crop batch, or the images."""
        if isinstance(data, dict):
            images = data["global"][0]
        elif isinstance(data, (tuple, list)):
            images = data[0]
        else:
            images = data
        if len(images.shape) != 4:
            raise ValueError(f"MAE trains on images (B, H, W, C); got shape {tuple(images.shape)}")
        if images.shape[0] != self.batch_size:
            raise ValueError(f"the batch holds {images.shape[0]} images, the recipe's "
                             f"batch_size is {self.batch_size} (the masking noise is drawn per "
                             "step for that many images)")
        size = self.backbone.image_size
        if tuple(images.shape[1:3]) != (size, size):
            raise ValueError(f"MAE trains at the encoder's image size {size} x {size} (its "
                             f"patch grid); got images of {tuple(images.shape[1:3])}")
        return images

    def forward(self, images, noise, training=True):
        """(loss, logs, pred, mask): the MAE forward of ``images`` with masking ``noise``
        (B, N), plus the distillation term with a teacher."""
        ids_keep, mask, ids_restore = mae_masking(noise, self.num_visible)
        distill = self.teacher is not None
        out = self.backbone(images, visible_ids=ids_keep, training=training,
                            return_attention=list(self.distill_blocks) if distill else None)
        latent = ops.concatenate([ops.expand_dims(out["cls"], 1), out["patch_tokens"]], axis=1)
        grid = (self.backbone.grid_size, self.backbone.grid_size)
        pred = self.decoder(latent, ids_restore, grid=grid, training=training)
        reconstruction = mae_loss(pred, images, mask, self.backbone.patch_size,
                                  norm_pix_loss=bool(self.recipe["norm_pix_loss"]))
        logs = {"mae_loss": reconstruction}
        loss = reconstruction
        if distill:
            target = self.teacher(images, visible_ids=ids_keep, training=False,
                                  return_attention=list(self.teacher_blocks))["attention_logits"]
            terms = [attention_distillation_loss(self.head_mapping(s), t)
                     for s, t in zip(out["attention_logits"], target)]
            term = sum(terms) / len(terms)
            logs["distill_loss"] = term
            loss = loss + float(self.recipe["distill_weight"]) * term
        return loss, logs, pred, mask

    def compute_loss_and_logs(self, data, plan, training=True):
        images = self.images(data)
        loss, logs, _, _ = self.forward(images, self.step_values["mask_noise"], training)
        logs["lr"] = self.step_values["learning_rate"]
        return loss, logs

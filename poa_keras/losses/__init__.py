"""poa_keras.losses: pure functions on tensors (keras.ops only, no model knowledge).

DINO cross-entropy over views, DINO centering + sharpening, Sinkhorn-Knopp targets, the KoLeo
regulariser, the iBOT masked-patch loss, SimSiam's / SSQL's negative cosine, MAE's masked
reconstruction loss, MAE-Lite's attention distillation loss and TinyViT's sparse soft targets and
soft-target cross-entropy. Targets never
carry gradient.
"""
from poa_keras.losses.dino import (centered_teacher_probs, dino_cross_entropy,
                                   multi_view_cross_entropy, sinkhorn_knopp, update_center)
from poa_keras.losses.distill import dense_soft_targets, soft_target_cross_entropy, sparse_topk
from poa_keras.losses.ibot import ibot_patch_loss
from poa_keras.losses.koleo import koleo_loss
from poa_keras.losses.mae import (attention_distillation_loss, mae_loss, mae_masking,
                                  normalized_pixel_targets, patchify)
from poa_keras.losses.simsiam import (cosine_similarity, negative_cosine, normalized_std,
                                      simsiam_loss, ssql_loss)

__all__ = ["attention_distillation_loss", "centered_teacher_probs", "cosine_similarity",
           "dense_soft_targets", "dino_cross_entropy", "ibot_patch_loss", "koleo_loss",
           "mae_loss", "mae_masking", "multi_view_cross_entropy", "negative_cosine",
           "normalized_pixel_targets", "normalized_std", "patchify", "simsiam_loss",
           "sinkhorn_knopp", "soft_target_cross_entropy", "sparse_topk", "ssql_loss",
           "update_center"]

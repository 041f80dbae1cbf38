"""MAE's reconstruction loss and MAE-Lite's attention distillation loss (REFERENCE.md §3): pure
functions on tensors (keras.ops).

* ``patchify``: (B, H, W, C) images -> (B, N, p * p * C) patches, row-major over the patch grid,
  each patch's values in (row, column, channel) order (MAE's ``patchify`` on NCHW images gives
  the same order).
* ``mae_masking``: MAE's ``random_masking`` from a (B, N) noise: the K patches of lowest noise
  stay visible, ``mask`` is 1 where a patch is masked.
* ``mae_loss``: MSE between the decoder's predictions and the (per-patch normalised) pixels,
  averaged over the masked patches only.
* ``attention_distillation_loss``: MSE between the head-mapped student's and the teacher's
  pre-softmax attention logits.
"""
from __future__ import annotations

from keras import ops


def patchify(images, patch_size):
    """(B, H, W, C) -> (B, (H / p) * (W / p), p * p * C)."""
    b, h, w, c = images.shape
    p = int(patch_size)
    if h is None or w is None or h % p or w % p:
        raise ValueError(f"patchify: image size {(h, w)} is not a multiple of the patch size {p}")
    x = ops.reshape(images, (-1, h // p, p, w // p, p, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, (h // p) * (w // p), p * p * c))


def mae_masking(noise, num_visible):
    """MAE's masking from ``noise`` (B, N): ``ids_shuffle = argsort(noise)``; returns
    ``(ids_keep (B, K) int32, mask (B, N) float32 with 1 = masked, ids_restore (B, N) int32)``
    with ``ids_keep`` the first K of ``ids_shuffle`` (the encoder's token order) and
    ``ids_restore = argsort(ids_shuffle)`` (a patch's position in the shuffled order)."""
    ids_shuffle = ops.cast(ops.argsort(noise, axis=1), "int32")
    ids_restore = ops.cast(ops.argsort(ids_shuffle, axis=1), "int32")
    ids_keep = ids_shuffle[:, :int(num_visible)]
    mask = ops.cast(ids_restore >= int(num_visible), "float32")
    return ids_keep, mask, ids_restore


def normalized_pixel_targets(patches, epsilon=1e-6):
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, over sqrt(var + eps) with the
    UNBIASED variance of the patch's values (torch's ``var`` default)."""
    patches = ops.cast(patches, "float32")
    n = patches.shape[-1]
    mean = ops.mean(patches, axis=-1, keepdims=True)
    var = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (n - 1)
    return (patches - mean) / ops.sqrt(var + epsilon)


def mae_loss(pred, images, mask, patch_size, norm_pix_loss=True, epsilon=1e-6):
    """MAE's loss: ``pred`` (B, N, p * p * C) against the patches of ``images`` (B, H, W, C)
    (normalised per patch with ``norm_pix_loss``), the per-patch mean squared error averaged
    over the masked patches (``mask`` (B, N), 1 = masked) only."""
    target = patchify(ops.cast(images, "float32"), patch_size)
    if norm_pix_loss:
        target = normalized_pixel_targets(target, epsilon)
    per_patch = ops.mean(ops.square(ops.cast(pred, "float32") - target), axis=-1)
    mask = ops.cast(mask, "float32")
    return ops.sum(per_patch * mask) / ops.sum(mask)


def attention_distillation_loss(student_logits, teacher_logits):
    """MAE-Lite's attention distillation: the mean squared error over every element (torch's
    ``nn.MSELoss``) between the (head-mapped) student logits and the teacher's, both
    (B, heads, T, T); the teacher's carry no gradient."""
    if tuple(student_logits.shape[1:]) != tuple(teacher_logits.shape[1:]):
        raise ValueError(f"attention logits of the student {tuple(student_logits.shape)} and "
                         f"the teacher {tuple(teacher_logits.shape)} differ: map the student's "
                         "heads to the teacher's (AttentionHeadMapping) and encode the same "
                         "visible tokens")
    teacher = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    return ops.mean(ops.square(ops.cast(student_logits, "float32") - teacher))

"""iBOT masked-patch distillation: the student sees masked patches and predicts the teacher's
targets for the tokens it did not see."""
from __future__ import annotations

from keras import ops

from poa_keras.losses._common import as_float, as_target


def ibot_patch_loss(teacher_patch_probs, student_patch_logits, masks, student_temp=0.1):
    """Masked-patch cross-entropy, averaged per image over its masked patches, then over images.

    loss = -1/B sum_b [ sum_{n masked in b} sum_k p_bnk log softmax(s_bn / T)_k ] / max(M_b, 1)
    with M_b the number of masked patches of image b. An image without masked patches
    contributes 0 and still counts in the mean over the B images (as in iBOT / DINOv2, where
    only a fraction of the images is masked); nothing is divided by zero, so no NaN.

    Args:
      teacher_patch_probs: (B, N, K) teacher target distributions per patch (rows sum to 1).
        Only the masked positions are read.
      student_patch_logits: (B, N, K) raw student logits per patch.
      masks: (B, N) bool (or 0/1), True where the student's patch was masked.
      student_temp: the student's temperature.

    Returns:
      A scalar.
    """
    p = as_target(teacher_patch_probs)
    s = as_float(student_patch_logits)
    m = ops.cast(ops.convert_to_tensor(masks), s.dtype)
    if len(p.shape) != 3 or len(m.shape) != 2:
        raise ValueError(
            "expected teacher_patch_probs (B, N, K) and masks (B, N); got "
            f"{tuple(p.shape)} and {tuple(m.shape)}")
    per_patch = ops.sum(p * ops.log_softmax(s / student_temp, axis=-1), axis=-1)  # (B, N)
    per_image = ops.sum(per_patch * m, axis=-1) / ops.maximum(ops.sum(m, axis=-1), 1.0)
    return -ops.mean(per_image)

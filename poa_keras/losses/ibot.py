"""iBOT masked-patch distillation: the student sees masked patches and predicts the teacher's
targets for the tokens it did not see."""
from __future__ import annotations

import math

from keras import ops

from poa_keras.losses.common import as_float, as_target


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


# -- masked tokens gathered into a static-size buffer --------------------------------------------
# A compiled step needs static shapes, but the number of masked patches varies from batch to
# batch. As DINOv2/POA do (their collate's "upperbound"), the masked tokens are gathered into a
# buffer of a fixed size U (an upper bound on the masked count, see data.masking.mask_upper_bound)
# with the empty slots weighted 0, so the heads run on U tokens instead of all B * N.

_NEG = -1e30  # log-weight of an empty slot: exp() is 0, and it stays finite through the sums


def masked_token_positions(masks, max_tokens):
    """Where the masked patches are, as a fixed-size buffer.

    Args:
      masks: (B, N) bool (or 0/1), True where a patch is masked.
      max_tokens: U, the buffer size (a Python int, 1 <= U <= B * N).

    Returns:
      (indices, weights), both (U,): ``indices`` (int32) into the flattened (B * N) patch axis,
      the masked positions first in row-major order, then arbitrary unmasked ones;
      ``weights`` (float32) = 1 / M_b for a slot holding a masked patch of image b (M_b its
      number of masked patches) and 0 for an empty slot. Masked patches beyond the first U are
      left out (none are when U is an upper bound on the count).
    """
    m = ops.cast(ops.convert_to_tensor(masks), "int32")
    if len(m.shape) != 2:
        raise ValueError(f"masks must have shape (B, N), got {tuple(m.shape)}")
    b, n = int(m.shape[0]), int(m.shape[1])
    max_tokens = int(max_tokens)
    if not 1 <= max_tokens <= b * n:
        raise ValueError(f"max_tokens must lie in [1, B * N = {b * n}], got {max_tokens}")
    flat = ops.reshape(m, (-1,))
    position = ops.arange(b * n, dtype="int32")
    # Masked positions sort first, each group in row-major order (float32 is exact below 2^24).
    key = ops.cast(position + (1 - flat) * (b * n), "float32")
    _, indices = ops.top_k(-key, k=max_tokens, sorted=True)
    indices = ops.cast(indices, "int32")
    valid = ops.cast(ops.take(flat, indices), "float32")
    per_image = ops.maximum(ops.sum(ops.cast(m, "float32"), axis=1), 1.0)
    weights = valid / ops.take(per_image, indices // n)
    return indices, weights


def masked_sinkhorn_knopp(teacher_logits, weights, teacher_temp, n_iterations=3):
    """Sinkhorn-Knopp targets over the non-empty slots of a masked-token buffer (DINOv2/POA's
    iBOT targets: the assignment is equipartitioned over the masked patches only, with B = their
    number).

    Same iteration as ``losses.sinkhorn_knopp`` (log domain) on the rows whose weight is > 0;
    empty rows take no part and get all-zero targets. No NaN even if every row is empty.

    Args:
      teacher_logits: (U, K) raw teacher logits of the gathered tokens.
      weights: (U,) the buffer weights (``masked_token_positions``): > 0 marks a masked token.
      teacher_temp: the teacher's temperature.
      n_iterations: normalisation rounds (3).

    Returns:
      (U, K) targets without gradient: rows of masked tokens sum to 1, empty rows are 0.
    """
    if int(n_iterations) != n_iterations or n_iterations < 0:
        raise ValueError(f"n_iterations={n_iterations!r} must be an integer >= 0")
    log_q = as_target(teacher_logits) / teacher_temp
    if len(log_q.shape) != 2:
        raise ValueError(f"teacher_logits must have shape (U, K); got {tuple(log_q.shape)}")
    valid = ops.expand_dims(ops.cast(ops.convert_to_tensor(weights), log_q.dtype) > 0, -1)
    k = log_q.shape[1]
    count = ops.maximum(ops.sum(ops.cast(valid, log_q.dtype)), 1.0)
    log_b = ops.log(count)
    log_k = math.log(k)
    log_q = ops.where(valid, log_q, _NEG)
    log_q = log_q - ops.logsumexp(log_q)  # total to 1

    def one_round(_, log_q):
        log_q = log_q - ops.logsumexp(log_q, axis=0, keepdims=True) - log_k  # prototypes: 1/K
        log_q = log_q - ops.logsumexp(log_q, axis=1, keepdims=True) - log_b  # samples: 1/B
        return ops.where(valid, log_q, _NEG)

    log_q = ops.fori_loop(0, int(n_iterations), one_round, log_q)
    return ops.stop_gradient(ops.where(valid, ops.exp(log_q + log_b), 0.0))


def ibot_masked_token_loss(teacher_probs, student_logits, weights, num_images,
                           student_temp=0.1):
    """``ibot_patch_loss`` on gathered tokens (DINOv2/POA's ``forward_masked``).

    loss = -1/num_images sum_u w_u sum_k p_uk log softmax(s_u / T)_k, with w_u = 1 / M_b for a
    masked patch of image b and 0 for an empty slot: the per-image mean over its masked patches,
    summed over images and divided by the number of images (masked or not).

    Args:
      teacher_probs: (U, K) targets of the gathered tokens.
      student_logits: (U, K) student logits of the same tokens.
      weights: (U,) from ``masked_token_positions``.
      num_images: B, the number of images the masks cover (a Python number).
      student_temp: the student's temperature.

    Returns:
      A scalar.
    """
    p = as_target(teacher_probs)
    s = as_float(student_logits)
    w = ops.cast(ops.convert_to_tensor(weights), s.dtype)
    per_token = ops.sum(p * ops.log_softmax(s / student_temp, axis=-1), axis=-1)
    return -ops.sum(per_token * w) / float(num_images)

"""DINO-style self-distillation: the cross-entropy between teacher and student views, and the
two ways of turning teacher logits into targets (centering + sharpening, Sinkhorn-Knopp).

Shapes: B = batch, K = prototypes (the projection head's output size), V = views.
Targets (teacher probabilities, centers, Sinkhorn assignments) never carry gradient: every
function here applies ``stop_gradient`` to them, so callers need not remember to.
"""
from __future__ import annotations

import math

from keras import ops

from poa_keras.losses.common import as_float, as_target, views


def dino_cross_entropy(teacher_probs, student_logits, student_temp=0.1):
    """CE(p, q) = -sum_k p_k log softmax(s / student_temp)_k, averaged over the batch.

    Args:
      teacher_probs: (B, K) target distributions (rows sum to 1); any leading shape (..., K)
        works, the mean is then over all leading positions.
      student_logits: (B, K) raw student logits, same shape as `teacher_probs`.
      student_temp: the student's temperature (0.1 in DINO and POA).

    Returns:
      A scalar.
    """
    p = as_target(teacher_probs)
    log_q = ops.log_softmax(as_float(student_logits) / student_temp, axis=-1)
    return -ops.mean(ops.sum(p * log_q, axis=-1))


def multi_view_cross_entropy(teacher_probs_list, student_logits_list, student_temp=0.1,
                             skip_same_view=True):
    """Cross-entropy summed over every (teacher view i, student view j) pair.

    The teacher views are the first ``len(teacher_probs_list)`` student views (the global
    crops); the remaining student views are the local crops. With ``skip_same_view`` the pairs
    with i == j (a teacher view and the student's view of the same global crop) are left out,
    as in DINO's cross-view loss.

    Args:
      teacher_probs_list: G tensors of shape (B, K) (or one (G, B, K) tensor): teacher targets
        for the global views.
      student_logits_list: V >= G tensors of shape (B, K) (or one (V, B, K) tensor): student
        logits, global views first, then local views.
      student_temp: the student's temperature.
      skip_same_view: leave out the i == j pairs.

    Returns:
      (total, n_terms): the scalar sum of the per-pair batch-mean cross-entropies and the number
      of pairs summed, a Python int. The reference divides by n_terms: for G = 2 globals and
      v locals, n_terms = 2 * (2 - 1) + 2 * v (18 for v = 8).
    """
    teachers = views(teacher_probs_list, "teacher_probs_list")
    students = views(student_logits_list, "student_logits_list")
    if len(students) < len(teachers):
        raise ValueError(
            f"got {len(teachers)} teacher views but only {len(students)} student views; the "
            "teacher views must be the first student views (global crops first)")
    teachers = [as_target(p) for p in teachers]
    # Each student view's log-probabilities are computed once and reused for every teacher.
    log_qs = [ops.log_softmax(as_float(s) / student_temp, axis=-1) for s in students]
    total, n_terms = None, 0
    for i, p in enumerate(teachers):
        for j, log_q in enumerate(log_qs):
            if skip_same_view and i == j:
                continue
            term = -ops.mean(ops.sum(p * log_q, axis=-1))
            total = term if total is None else total + term
            n_terms += 1
    if n_terms == 0:
        raise ValueError(
            f"no (teacher, student) pair to sum: {len(teachers)} teacher view(s), "
            f"{len(students)} student view(s), skip_same_view={skip_same_view}")
    return total, n_terms


def centered_teacher_probs(teacher_logits, center, teacher_temp):
    """DINO teacher targets: softmax((t - center) / teacher_temp) over the prototypes.

    The center is subtracted BEFORE dividing by the temperature (both are in logit units).

    Args:
      teacher_logits: (B, K) raw teacher logits (any leading shape (..., K)).
      center: (1, K) or (K,) running center (see `update_center`).
      teacher_temp: the teacher's temperature (0.04 -> 0.07 in DINO and POA); a float or a
        scalar tensor (a schedule value).

    Returns:
      (B, K) probabilities, rows summing to 1, without gradient.
    """
    t = as_target(teacher_logits)
    c = as_target(center)
    return ops.softmax((t - c) / teacher_temp, axis=-1)


def update_center(center, teacher_logits, momentum=0.9):
    """The new center: momentum * center + (1 - momentum) * batch mean of the teacher logits.

    Pure: returns the new value, the caller stores it (DINO updates it after the loss, which
    used the old center). On a single device the batch mean is over this device's batch; a
    multi-device caller must average the means across devices.

    Args:
      center: (1, K) or (K,) current center.
      teacher_logits: (B, K) raw teacher logits (not centered, not divided by a temperature).
        Any leading shape (..., K) is averaged over, e.g. the two global views stacked as
        (2, B, K) or concatenated as (2B, K).
      momentum: the EMA momentum (0.9 in DINO and POA).

    Returns:
      The new center, with the shape and dtype of `center`.
    """
    c = as_target(center)
    t = as_target(teacher_logits)
    k = t.shape[-1]
    batch_mean = ops.mean(ops.reshape(t, (-1, k)), axis=0)
    new = momentum * c + (1.0 - momentum) * ops.reshape(batch_mean, ops.shape(c))
    return ops.cast(new, ops.convert_to_tensor(center).dtype)


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """Sinkhorn-Knopp teacher targets (SwAV, DINOv2, POA): an equipartitioned assignment.

    The reference iteration, on Q = exp(logits / T)^T of shape (K, B):
    normalise Q to total 1; repeat `n_iterations` times: scale every prototype row to sum 1/K,
    then every sample column to sum 1/B; finally multiply by B, so that each sample's column
    sums to 1. Returned transposed, as (B, K).

    Numerics: the iteration is carried out on log Q, where every "divide by the sum" becomes
    "subtract the logsumexp". This is mathematically identical (each normalisation is a
    division by a positive sum, whatever common factor Q carries cancels), but the
    logsumexp subtracts the maximum before exponentiating, so large logits or a small
    temperature neither overflow exp nor underflow a whole row/column to 0 (which the direct
    form turns into 0/0 = NaN). The computation stays in the (B, K) layout: the reference's
    "rows" (prototypes) are our axis 1 entries summed over axis 0, and vice versa.

    Args:
      teacher_logits: (B, K) raw teacher logits.
      teacher_temp: the teacher's temperature (the logits are divided by it, not the student's).
      n_iterations: number of (prototype, sample) normalisation rounds (3 in DINOv2 and POA).

    Returns:
      (B, K) target probabilities without gradient; each row sums to 1 (for
      n_iterations >= 1) and each column sums to about B / K.

    B is this call's batch: the reference all-reduces the sums over devices, so its B is the
    global batch. Under keras.distribution (JAX SPMD) this call sees the global batch, so the
    sums are the reference's (tests/test_distribution.py).
    """
    if int(n_iterations) != n_iterations or n_iterations < 0:
        raise ValueError(f"n_iterations={n_iterations!r} must be an integer >= 0")
    log_q = as_target(teacher_logits) / teacher_temp  # (B, K) = log of the reference's Q^T
    if len(log_q.shape) != 2:
        raise ValueError(f"teacher_logits must have shape (B, K); got {tuple(log_q.shape)}")
    b, k = ops.shape(log_q)[0], log_q.shape[1]
    log_b = ops.log(ops.cast(b, log_q.dtype))
    log_k = math.log(k)
    log_q = log_q - ops.logsumexp(log_q)  # total to 1

    def one_round(_, log_q):
        log_q = log_q - ops.logsumexp(log_q, axis=0, keepdims=True) - log_k  # prototypes: 1/K
        return log_q - ops.logsumexp(log_q, axis=1, keepdims=True) - log_b  # samples: 1/B

    # A loop op rather than a Python loop: XLA's compile time grows much faster than linearly
    # with the number of unrolled rounds (50 rounds took over a minute to compile on CPU).
    log_q = ops.fori_loop(0, int(n_iterations), one_round, log_q)
    return ops.exp(log_q + log_b)

"""TinyViT's distillation targets and loss (REFERENCE.md §4), keras.ops only.

    probs  = softmax(teacher_logits)                          (B, C)
    ids, values = sparse_topk(probs, K)                       top-K, sorted; values rounded to
                                                              float16 as the store keeps them
    target = dense_soft_targets(ids, values, C)               values at ids, the rest
                                                              (1 - sum values) / (C - K)
    loss   = soft_target_cross_entropy(student_logits, target)   mean_b -sum_c t log softmax(z)

No temperature; the target never carries gradient.
"""
from __future__ import annotations

from keras import ops

from poa_keras.losses.common import as_float, as_target


def sparse_topk(probs, k, value_dtype="float16"):
    """(ids int32 (..., K), values float32 (..., K)): the K largest probabilities of ``probs``
    (..., C), sorted descending, the values rounded through ``value_dtype`` (the store's float16;
    None: kept in float32). The online teacher's targets go through this so that they equal
    the stored ones."""
    values, ids = ops.top_k(as_float(probs), int(k), sorted=True)
    if value_dtype is not None:
        values = ops.cast(ops.cast(values, value_dtype), "float32")
    return ops.cast(ids, "int32"), values


def dense_soft_targets(ids, values, num_classes):
    """Dense targets (..., C) float32 from sparse top-K (REFERENCE.md §4, as the official code):
    the top-K ``values`` written at their ``ids``, every other class gets
    (1 - sum values) / (C - K) (not clipped: float16 rounding can make it a tiny negative
    number; with K = C it is unused)."""
    values = as_float(values)
    k = int(values.shape[-1])
    num_classes = int(num_classes)
    if k > num_classes:
        raise ValueError(f"{k} top-K values for {num_classes} classes; K must be <= the number "
                         "of classes")
    # scattered, O(batch x C) memory (a (batch, K, C) one-hot would not fit at 22k classes)
    lead = ops.shape(values)[:-1]
    flat_values = ops.reshape(values, (-1,))
    flat_ids = ops.reshape(ops.cast(ids, "int32"), (-1,))
    rows = ops.shape(flat_values)[0] // k
    row_ids = ops.reshape(ops.repeat(ops.expand_dims(ops.arange(rows, dtype="int32"), 1), k,
                                     axis=1), (-1,))
    where = ops.stack([row_ids, flat_ids], axis=1)
    written = ops.scatter(where, flat_values, (rows, num_classes))
    covered = ops.scatter(where, ops.ones_like(flat_values), (rows, num_classes))
    rest = (1.0 - ops.sum(ops.reshape(flat_values, (rows, k)), axis=-1, keepdims=True)) / \
        float(max(num_classes - k, 1))
    return ops.reshape(written + (1.0 - covered) * rest, (*lead, num_classes))


def soft_target_cross_entropy(logits, targets):
    """mean over the batch of -sum_c targets * log_softmax(logits) (timm's
    SoftTargetCrossEntropy, TinyViT's loss); logits (B, C), targets (B, C), float32."""
    logits, targets = as_float(logits), as_target(targets)
    if tuple(logits.shape) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must "
                         "have the same shape (batch, classes)")
    return ops.mean(-ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1))

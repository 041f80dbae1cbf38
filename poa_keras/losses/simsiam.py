"""SimSiam's and SSQL's losses (REFERENCE.md §5): negative cosine similarity against a target
that carries no gradient.

With p the predictor's output and z the projector's (encoder's) output of a view, per sample::

    cos(p, z) = <p, z> / max(||p|| ||z||, eps)                  (torch's F.cosine_similarity)
    D(p, z)   = -mean_over_batch cos(p, stop_gradient(z))

    SimSiam:  L    = (D(p1, z2) + D(p2, z1)) / 2
    SSQL:     L_fp = (D(p1, z2) + D(p2, z1)) / 2                 (the float branch: SimSiam)
              L_q  = (D(p1q, z2) + D(p2q, z1)) / 2               (the quantized branch)
              L    = (L_fp + L_q) / 2

The targets of SSQL's quantized branch are ALWAYS the float projections z of the other view:
the quantized predictions p1q, p2q are pulled towards the float network's output, never
towards the quantized one's. Every loss lies in [-1, 1]; -1 is perfect agreement.

``normalized_std`` is SimSiam's collapse indicator: the standard deviation over the batch of
the l2-normalised outputs, averaged over the channels. For outputs spread over the unit sphere
of d dimensions it is about 1 / sqrt(d); a collapsed encoder (one output for every image) gives
0.

Half-precision inputs are computed in float32 (``common.as_float``).
"""
from __future__ import annotations

from keras import ops

from poa_keras.losses.common import as_float

# torch.nn.functional.cosine_similarity's default: the product of the norms is floored at eps.
COSINE_EPS = 1e-8


def _check_pair(a, b, what):
    if len(a.shape) != 2 or tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{what}: expected two (B, D) tensors of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def cosine_similarity(a, b, eps=COSINE_EPS):
    """Per-row cosine similarity of two (B, D) tensors: (B,), float32.

    ``<a, b> / max(||a|| ||b||, eps)``, written with rsqrt of the floored squared product so
    the gradient stays finite for a zero row."""
    a, b = as_float(a), as_float(b)
    _check_pair(a, b, "cosine_similarity")
    dot = ops.sum(a * b, axis=-1)
    norms_sq = ops.sum(ops.square(a), axis=-1) * ops.sum(ops.square(b), axis=-1)
    return dot * ops.rsqrt(ops.maximum(norms_sq, eps * eps))


def negative_cosine(p, z):
    """``D(p, z) = -mean(cos(p, stop_gradient(z)))``: a scalar; no gradient reaches z.

    Args:
      p: (B, D) predictions.
      z: (B, D) targets (projections of the other view).
    """
    return -ops.mean(cosine_similarity(p, ops.stop_gradient(as_float(z))))


def simsiam_loss(p1, p2, z1, z2):
    """SimSiam's symmetric loss ``(D(p1, z2) + D(p2, z1)) / 2`` (scalar in [-1, 1]).

    Args:
      p1, p2: (B, D) predictions of view 1 and view 2.
      z1, z2: (B, D) projections of view 1 and view 2 (targets: no gradient).
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def ssql_loss(p1, p2, p1q, p2q, z1, z2):
    """SSQL's loss: ``(L_fp + L_q) / 2`` (see the module docstring).

    Args:
      p1, p2: (B, D) float predictions of view 1 and view 2.
      p1q, p2q: (B, D) predictions of the quantized encoder's outputs (float predictor).
      z1, z2: (B, D) FLOAT projections of view 1 and view 2: the targets of both branches.

    Returns:
      ``(loss, loss_fp, loss_q)``, three scalars.
    """
    loss_fp = simsiam_loss(p1, p2, z1, z2)
    loss_q = simsiam_loss(p1q, p2q, z1, z2)
    return 0.5 * (loss_fp + loss_q), loss_fp, loss_q


def normalized_std(z, eps=1e-12):
    """SimSiam's collapse indicator: ``mean_d std_over_batch(z / ||z||)`` of (B, D) outputs,
    float32 scalar (population std). About 1 / sqrt(D) when healthy, 0 when collapsed."""
    z = as_float(z)
    if len(z.shape) != 2:
        raise ValueError(f"normalized_std: expected (B, D) outputs, got {tuple(z.shape)}")
    z = z * ops.rsqrt(ops.maximum(ops.sum(ops.square(z), axis=-1, keepdims=True), eps * eps))
    return ops.mean(ops.std(ops.stop_gradient(z), axis=0))

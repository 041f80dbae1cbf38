"""KoLeo regulariser (DINOv2; Sablayrolles et al., "Spreading vectors for similarity search"):
pushes every feature away from its nearest neighbour in the batch, so that the features spread
uniformly over the unit sphere."""
from __future__ import annotations

from keras import ops

from poa_keras.losses.common import as_float

# Floor under squared norms before the square root: keeps the gradient of sqrt finite for
# duplicate (or zero) vectors, and is far below any distance that matters (sqrt = 1e-15).
_TINY_SQUARE = 1e-30


def koleo_loss(features, eps=1e-8):
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps), on L2-normalised features.

    Args:
      features: (B, D) features (e.g. one view's CLS tokens), B >= 2. They are L2-normalised
        here (x / max(||x||, eps)), so raw features can be passed.
      eps: added to the nearest-neighbour distance inside the log (and the floor of the norm).

    Returns:
      A scalar. The nearest neighbour is chosen without gradient (largest cosine similarity,
      which on the unit sphere is the smallest distance); the gradient flows through the
      distance to it.

    DINOv2 applies it to each global view's student CLS tokens separately and sums; that is
    the caller's choice.
    """
    x = as_float(features)
    if len(x.shape) != 2:
        raise ValueError(f"features must have shape (B, D); got {tuple(x.shape)}")
    if x.shape[0] is not None and x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 features per batch; got {x.shape[0]}")
    sq_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    x = x / ops.sqrt(ops.maximum(sq_norm, eps * eps))  # = x / max(||x||, eps)
    n = ops.shape(x)[0]
    # Cosines lie in [-1, 1]: pushing the diagonal down by 3 keeps a sample from choosing
    # itself while any other sample, even an antipodal one, can still be chosen.
    sims = ops.matmul(x, ops.transpose(x)) - 3.0 * ops.eye(n, dtype=x.dtype)
    nearest = ops.argmax(ops.stop_gradient(sims), axis=-1)
    diff = x - ops.take(x, nearest, axis=0)
    dist = ops.sqrt(ops.maximum(ops.sum(ops.square(diff), axis=-1), _TINY_SQUARE))
    return -ops.mean(ops.log(dist + eps))

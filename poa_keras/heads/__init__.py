"""poa_keras.heads: projection heads that map backbone features to prototype logits.

* `DINOHead`: MLP -> L2-normalise -> weight-normalised prototypes, elastic in its input width.
* `MultiProjectionHead`: POA's several DINO heads with different prototype counts.
* `WeightNormalizedDense`: the weight-normalised last layer (kernel g * v / ||v||).
"""
from poa_keras.heads.dino import DINOHead, MultiProjectionHead, WeightNormalizedDense, l2_normalize

__all__ = ["DINOHead", "MultiProjectionHead", "WeightNormalizedDense", "l2_normalize"]

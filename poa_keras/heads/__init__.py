"""poa_keras.heads: projection heads that map backbone features to prototype logits or
projections.

* `DINOHead`: MLP -> L2-normalise -> weight-normalised prototypes, elastic in its input width.
* `MultiProjectionHead`: POA's several DINO heads with different prototype counts.
* `WeightNormalizedDense`: the weight-normalised last layer (kernel g * v / ||v||).
* `SimSiamProjector`, `SimSiamPredictor`: SimSiam's / SSQL's projector (8-bit quantizable)
  and predictor (never quantized).
* `MAEDecoder`, `AttentionHeadMapping`: MAE's lightweight decoder and MAE-Lite's head mapping of
  attention distillation.
"""
from poa_keras.heads.dino import DINOHead, MultiProjectionHead, WeightNormalizedDense, l2_normalize
from poa_keras.heads.mae import AttentionHeadMapping, MAEDecoder
from poa_keras.heads.simsiam import SimSiamPredictor, SimSiamProjector

__all__ = ["AttentionHeadMapping", "DINOHead", "MAEDecoder", "MultiProjectionHead", "SimSiamPredictor", "SimSiamProjector",
           "WeightNormalizedDense", "l2_normalize"]

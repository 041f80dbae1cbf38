"""poa_keras.eval: evaluation of frozen (sub-)networks.

  features  extract_features: (N, D) CLS features of a backbone or a sub-network, batched
            through its compiled forward (uint8 images normalised as in training).
  knn       knn_classify: weighted k-NN (DINO protocol, several k at once, batched);
            knn_eval: images -> features -> k-NN accuracy in one call.
"""
from poa_keras.eval.features import extract_features
from poa_keras.eval.knn import DEFAULT_KS, knn_classify, knn_eval

__all__ = ["DEFAULT_KS", "extract_features", "knn_classify", "knn_eval"]

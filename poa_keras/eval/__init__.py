"""poa_keras.eval: evaluation of frozen (sub-)networks.

  features  extract_features: (N, D) CLS features of a backbone or a sub-network, batched
            through its compiled forward (uint8 images normalised as in training).
  knn       knn_classify: weighted k-NN (DINO protocol, several k at once, batched);
            knn_eval: images -> features -> k-NN accuracy in one call.
  linear    linear_probe: a linear classifier on frozen features (CLS, + avg-pooled patch
            tokens, + last n blocks), a learning-rate grid trained jointly, best by val
            accuracy; probe_features / train_linear_classifier are its two halves.
  ptq       post-training quantization (SSQL's protocol): calibrate (min/max of every
            activation quantizer on the first train images), ptq_features (one compiled
            program for every bit pair), ptq_knn_eval, ptq_linear_probe.
  sweep     sweep: k-NN, params, FLOPs and latency of every subnet of a teacher, and with
            bits=[...] at every bit-width (bytes, BitOPs) (SweepResult: CSV / JSON, Pareto
            front, budget select, plot); format_table / print_table.
"""
from poa_keras.eval.features import extract_features
from poa_keras.eval.knn import DEFAULT_KS, knn_classify, knn_eval
from poa_keras.eval.linear import linear_probe, probe_features, train_linear_classifier
from poa_keras.eval.ptq import (SSQL_BITS, calibrate, check_calibrated, ptq_features,
                                ptq_knn_eval, ptq_linear_probe)
from poa_keras.eval.sweep import SweepResult, format_table, load_sweep, print_table, select, sweep

__all__ = ["DEFAULT_KS", "extract_features", "knn_classify", "knn_eval"]
__all__ += ["linear_probe", "probe_features", "train_linear_classifier"]
__all__ += ["SSQL_BITS", "calibrate", "check_calibrated", "ptq_features", "ptq_knn_eval",
            "ptq_linear_probe"]
__all__ += ["SweepResult", "format_table", "load_sweep", "print_table", "select", "sweep"]

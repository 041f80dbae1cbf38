"""Weighted k-nearest-neighbour classification of frozen features (DINO / DINOv2 protocol).

    result = knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes=10)
    result[20]["top1"]         # fraction of test samples whose top-1 prediction is right, k = 20
    knn_eval(backbone, x_train, y_train, x_test, y_test, subnet=(192, 4))   # images -> result

The rule (REFERENCE.md §1 "Evaluation", §2 "k-NN"): features are L2-normalised; each test
sample takes its k most cosine-similar training samples; neighbour j votes for its label with
weight exp(sim_j / T), T = 0.07; the class with the largest summed vote is the prediction.
"""
from __future__ import annotations

import numpy as np
from keras import ops

from poa_keras.eval.features import FROM_PRESET, extract_features
from poa_keras.validation import (check_features, check_int, check_ks, check_labels,
                                  check_positive_number)

DEFAULT_KS = (10, 20, 100, 200)

# Auto batch size: test rows per step so that one block of similarities (rows x bank) stays
# near 2**24 float32 values (64 MiB), whatever the bank size.
_SIMILARITY_BLOCK = 1 << 24


def knn_classify(train_features, train_labels, test_features, test_labels, num_classes,
                 ks=DEFAULT_KS, temperature=0.07, batch_size=None, return_predictions=False):
    """Weighted k-NN accuracy of test features against a bank of labelled training features.

    Args:
      train_features: (N, D) float array, the bank (any backend tensor or numpy).
      train_labels: (N,) integers in [0, num_classes).
      test_features: (M, D) float array.
      test_labels: (M,) integers in [0, num_classes), or None to get predictions only.
      num_classes: number of classes C.
      ks: one int or a sequence of ints >= 1; all are evaluated from ONE top-k search (the
        largest k). A k larger than the bank (k > N) is clipped to N: every training sample
        votes; the result stays under the requested k and records the k actually used.
      temperature: T > 0 of the vote weights exp(sim / T).
      batch_size: test samples per similarity block (B x N values in memory at a time);
        default: about 2**24 / N (64 MiB of float32 similarities), at most M.
      return_predictions: also return the (M,) int32 top-1 prediction for every k.

    Returns:
      {k: {"top1": float, "top5": float, "k_used": int[, "predictions": (M,) int32]}} for every
      requested k, accuracies as fractions in [0, 1] (None when test_labels is None).

    Details:
      * Votes are computed as exp((sim - s_max) / T) with s_max the test sample's largest
        similarity: the same ranking of classes as DINO's exp(sim / T) and DINOv2's softmax
        over the neighbours (both differ from it by a positive factor per test sample), without
        overflow or underflow of the top neighbour's weight at small T.
      * top-5: the label is among the five highest-voted classes, counting only classes that
        at least one of the k neighbours belongs to (DINO's sort fills the remaining slots with
        arbitrary zero-vote classes, which inflates top-5 when k neighbours span few classes).
        With C < 5 classes, top-5 means top-C. Top-5 >= top-1 always.
      * Ties between classes (equal votes) go to the lower class index, in top-1 and top-5.
        Ties between neighbours at the k-th similarity are broken by the backend's top-k.

    Where it runs: the similarity matmul and the top-k search, the O(M N D) and O(M N) work,
    run through keras.ops on the active backend (the GPU when there is one: an ImageNet-size
    bank is minutes on a CPU and seconds on a GPU); only the (B, max k) neighbour similarities
    and labels come back to numpy, where the votes for every k are summed with bincount, exactly
    and identically on every backend. On a 2-core CPU a 10k x 10k bank of 192-dim features
    takes a few seconds on each backend (jax's top-k is the fastest, numpy's argpartition,
    measured, is no faster than tensorflow's or torch's top-k).
    """
    ks_req = check_ks(ks)
    temperature = check_positive_number(temperature, "temperature")
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    train = check_features(train_features, "train_features")
    test = check_features(test_features, "test_features")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_features and test_features must have the same feature "
                         f"dimension, got {train.shape[1]} and {test.shape[1]} (shapes "
                         f"{train.shape} and {test.shape})")
    n_train, n_test = train.shape[0], test.shape[0]
    if n_train == 0:
        raise ValueError("train_features is empty: the k-NN bank needs at least one sample")
    if n_test == 0:
        raise ValueError("test_features is empty: there is nothing to classify")
    train_y = check_labels(train_labels, "train_labels", n_train, "train_features", num_classes)
    test_y = (None if test_labels is None
              else check_labels(test_labels, "test_labels", n_test, "test_features", num_classes))
    if batch_size is None:
        batch_size = max(1, min(n_test, _SIMILARITY_BLOCK // n_train))
    batch_size = check_int(batch_size, "batch_size", minimum=1)

    k_used = {k: min(k, n_train) for k in ks_req}
    k_max = max(k_used.values())
    ks_eff = sorted(set(k_used.values()))
    bank = ops.convert_to_tensor(_l2_normalize(train), "float32")
    bank_t = ops.transpose(bank)
    top5 = min(5, num_classes)

    preds = {k: np.empty(n_test, np.int32) for k in ks_eff}
    hits1 = {k: 0 for k in ks_eff}
    hits5 = {k: 0 for k in ks_eff}
    for start in range(0, n_test, batch_size):
        block = _l2_normalize(test[start:start + batch_size])
        sims = ops.matmul(ops.convert_to_tensor(block, "float32"), bank_t)    # (B, N)
        top_sims, top_idx = ops.top_k(sims, k_max, sorted=True)               # (B, k_max)
        top_sims = np.asarray(ops.convert_to_numpy(top_sims), np.float64)
        neighbour_y = train_y[np.asarray(ops.convert_to_numpy(top_idx))]
        weights = np.exp((top_sims - top_sims[:, :1]) / temperature)
        rows = top_sims.shape[0]
        true_y = None if test_y is None else test_y[start:start + rows]
        for k in ks_eff:
            pred, hit1, hit5 = _vote(neighbour_y[:, :k], weights[:, :k], num_classes, true_y,
                                     top5)
            preds[k][start:start + rows] = pred
            if true_y is not None:
                hits1[k] += int(hit1.sum())
                hits5[k] += int(hit5.sum())

    result = {}
    for k in ks_req:
        ke = k_used[k]
        entry = {"top1": None if test_y is None else hits1[ke] / n_test,
                 "top5": None if test_y is None else hits5[ke] / n_test,
                 "k_used": ke}
        if return_predictions:
            entry["predictions"] = preds[ke].copy()
        result[k] = entry
    return result


def _vote(labels, weights, num_classes, true_y, top):
    """Weighted votes of (B, k) neighbour labels -> top-1 predictions and top-`top` hits."""
    rows = labels.shape[0]
    flat = (np.arange(rows)[:, None] * num_classes + labels).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=rows * num_classes)
    present = np.bincount(flat, minlength=rows * num_classes) > 0
    # Classes no neighbour belongs to rank below every voted class (-1 < any vote >= 0).
    score = np.where(present, votes, -1.0).reshape(rows, num_classes)
    pred = np.argmax(score, axis=1).astype(np.int32)   # first maximum: lowest class index
    if true_y is None:
        return pred, None, None
    hit1 = pred == true_y
    true_score = score[np.arange(rows), true_y][:, None]
    classes = np.arange(num_classes)[None, :]
    ahead = (score > true_score) | ((score == true_score) & (classes < true_y[:, None]))
    hit5 = (true_score[:, 0] >= 0) & (ahead.sum(axis=1) < top)
    return pred, hit1, hit5


def knn_eval(backbone, train_images, train_labels, test_images, test_labels, subnet=None,
             num_classes=None, ks=DEFAULT_KS, temperature=0.07, batch_size=64,
             knn_batch_size=None, pixel_normalization=FROM_PRESET, return_predictions=False):
    """k-NN accuracy of a backbone's (sub-network's) CLS features: extract, then classify.

    Args:
      backbone: an elastic backbone (e.g. ElasticViT).
      train_images, test_images: (N, H, W, C) uint8 (through the backbone's preprocessing:
        resized if needed, normalised as in training) or float (already preprocessed) arrays;
        see `extract_features`.
      train_labels, test_labels: integer class labels.
      subnet: which sub-network (None: the full network; a spec, a tuple or a size name).
      num_classes: default 1 + the largest label in either split.
      ks, temperature, return_predictions: as `knn_classify`.
      batch_size: images per forward pass of the extraction.
      knn_batch_size: `knn_classify`'s batch_size.
      pixel_normalization: for uint8 images, as `extract_features`.

    Returns:
      `knn_classify`'s result.
    """
    train_y = np.asarray(train_labels)
    test_y = np.asarray(test_labels)
    if num_classes is None:
        tops = [int(y.max()) for y in (train_y, test_y)
                if y.size and np.issubdtype(y.dtype, np.integer)]
        num_classes = max(tops) + 1 if tops else 1
    kwargs = dict(subnet=subnet, batch_size=batch_size, normalize=True,
                  pixel_normalization=pixel_normalization)
    train_feats = extract_features(backbone, train_images, **kwargs)
    test_feats = extract_features(backbone, test_images, **kwargs)
    return knn_classify(train_feats, train_y, test_feats, test_y, num_classes, ks=ks,
                        temperature=temperature, batch_size=knn_batch_size,
                        return_predictions=return_predictions)


def _l2_normalize(x):
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return (x / np.maximum(norms, 1e-12)[:, None].astype(np.float32)).astype(np.float32,
                                                                             copy=False)

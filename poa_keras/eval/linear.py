"""Linear probe of frozen features (DINOv2 protocol, REFERENCE.md §1 "Evaluation").

    result = linear_probe(backbone, x_train, y_train, x_val, y_val, subnet=(192, 4),
                          avgpool=True, last_blocks=4)
    result["best_learning_rate"], result["top1"]          # val top-1 of the best lr, in [0, 1]
    result["per_learning_rate"][1e-2]["top1"]             # every lr of the grid
    result["classifier"]                                  # keras.Model: features -> logits

Features: the CLS token of the (sub-)network, optionally concatenated with the CLS tokens of the
``last_blocks - 1`` blocks before the last (each through the final LayerNorm, DINOv2's
``get_intermediate_layers(norm=True)``) and with the average of the last block's patch tokens
(``avgpool``), in DINOv2's ``create_linear_input`` order: [cls of block L-n+1, ..., cls of
block L, mean patch token]. They are extracted ONCE (``extract_features``: fixed-size, padded
batches through one compiled program), then one linear classifier per learning rate is trained
on them with ``model.fit`` (softmax cross-entropy, SGD momentum 0.9, cosine decay to 0 over the
run, weight init N(0, 0.01), zero bias: DINOv2's linear head) and scored on the validation
features; the best validation top-1 picks the learning rate. The learning rates are used as
given (DINOv2 scales its grid by batch / 256 first; do that yourself if you want it).

DINOv2 searches 13 learning rates x last blocks {1, 4} x avgpool {False, True}, 10 epochs; the
default grid here is a handful of rates. As in DINOv2, the classifiers of the whole grid train
together, in one model and one pass over the features (see `train_linear_classifier`): they
see the same batches in the same order (one seeded stream of permutations) from the same
initial weights, so they differ in the learning rate only.
"""
from __future__ import annotations

import inspect
import math
import numbers
import time
import weakref

import keras
import numpy as np
from keras import ops

from poa_keras.eval.features import FROM_PRESET, INPUT_NORMALIZATIONS, extract_features
from poa_keras.optimizers import LRMultiplierOptimizer
from poa_keras.validation import check_features, check_int, check_labels

DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ----- features ----------------------------------------------------------------------------------

class _ProbeFeatureView(keras.layers.Layer):
    """images -> {"cls": probe features} of one (backbone, subnet, avgpool, last_blocks).

    The probe's concatenated features under the key that ``extract_features`` reads, so that
    extraction (uint8 normalisation, fixed-size padded batches, one compiled program through
    ``backbones/compiled.py``) is the k-NN's own code. Not a model to save: it only reads the
    backbone's weights."""

    def __init__(self, backbone, spec, avgpool, last_blocks, dim):
        super().__init__(name=f"{backbone.name}_probe_features")
        self.backbone = backbone
        self.spec = spec
        self.avgpool = avgpool
        self.last_blocks = last_blocks
        self.dim = dim
        self.in_channels = getattr(backbone, "in_channels", 3)
        self.built = True

    @property
    def preprocessing(self):
        """The backbone's: uint8 images enter the view as they enter the backbone."""
        return getattr(self.backbone, "preprocessing", None)

    def resolve_subnet(self, subnet):
        if subnet is not None:   # the view is one subnet already
            raise ValueError(f"a probe feature view takes no subnet, got {subnet!r}")
        return None

    def feature_dim(self, subnet=None):
        return self.dim

    def compiled_forward(self, subnet=None, training=False):
        from poa_keras.backbones.compiled import compiled_forward
        return compiled_forward(self, self.resolve_subnet(subnet), False)

    def call(self, images, subnet=None, training=None):
        kwargs = {} if self.spec is None else {"subnet": self.spec}
        if self.last_blocks > 1:
            kwargs["return_blocks"] = True
        out = self.backbone(images, training=False, **kwargs)
        name = self.backbone.name
        if self.last_blocks > 1:
            blocks = out["blocks"]
            if len(blocks) < self.last_blocks:
                raise ValueError(f"last_blocks={self.last_blocks} but {name} runs "
                                 f"{len(blocks)} blocks for subnet {self.spec}; valid: "
                                 f"1..{len(blocks)}")
            parts = [b[:, 0] for b in blocks[-self.last_blocks:-1]] + [_cls(out, name)]
        else:
            parts = [_cls(out, name)]
        if self.avgpool:
            if "patch_tokens" not in out:
                raise ValueError(f"avgpool=True needs patch tokens, but {name} returns only "
                                 f"{sorted(out)}; use avgpool=False")
            parts.append(ops.mean(ops.cast(out["patch_tokens"], "float32"), axis=1))
        parts = [ops.cast(p, "float32") for p in parts]
        return {"cls": parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)}


def _cls(outputs, name):
    if "cls" in outputs:
        return outputs["cls"]
    if "pooled" in outputs:
        return outputs["pooled"]
    raise ValueError(f"{name} returns neither 'cls' nor 'pooled' (got {sorted(outputs)})")


def _supports_block_outputs(backbone):
    try:
        return "return_blocks" in inspect.signature(backbone.call).parameters
    except (TypeError, ValueError):
        return False


def probe_features(backbone, images, subnet=None, avgpool=False, last_blocks=1, batch_size=64,
                   pixel_normalization=FROM_PRESET, verbose=0):
    """The linear probe's frozen features of ``images``: (N, D) float32 numpy, not normalised.

    Args:
      backbone: an elastic backbone (or an extracted subnet).
      images: (N, H, W, C) uint8 (through the backbone's preprocessing, see
        `pixel_normalization`) or float (already preprocessed); see `extract_features`.
      subnet: None (the full network), a spec, a tuple or a size name.
      avgpool: also concatenate the mean of the last block's patch tokens (needs a backbone
        with ``patch_tokens``).
      last_blocks: concatenate the CLS tokens of the last n blocks the subnet runs (each
        through the final norm), n >= 1; n > 1 needs a backbone whose ``call`` takes
        ``return_blocks`` (ElasticViT).
      batch_size: images per forward pass (the last batch is padded: one compiled program).
      pixel_normalization: for uint8 images, as `extract_features`.
      verbose: 0 silent; 1 a Keras progress bar over the batches; 2 one line at the end.

    Returns:
      (N, D) with D = width * (last_blocks + avgpool), width = ``backbone.feature_dim(subnet)``.
    """
    view = _feature_view(backbone, subnet, avgpool, last_blocks)
    verbose = _check_verbose(verbose)
    if view is None:   # plain CLS: the backbone's own compiled forward, shared with k-NN
        source, kwargs = backbone, {"subnet": subnet}
    else:
        source, kwargs = view, {}
    n = np.shape(images)[0] if np.ndim(images) >= 1 else 0
    if verbose and isinstance(batch_size, numbers.Integral) and batch_size >= 1 and n:
        steps = -(-n // min(int(batch_size), n))
        source = _Ticking(source, keras.utils.Progbar(steps, verbose=verbose, unit_name="batch"))
    return extract_features(source, images, batch_size=batch_size, normalize=False,
                            pixel_normalization=pixel_normalization, **kwargs)


class _Ticking:
    """Stands in for a backbone (or view) and advances a progress bar once per forward batch
    (``extract_features`` calls the compiled forward once per batch)."""

    def __init__(self, model, progbar):
        self._model = model
        self._progbar = progbar

    def __getattr__(self, name):
        return getattr(self._model, name)

    def compiled_forward(self, subnet=None, training=False):
        forward = self._model.compiled_forward(subnet, training)

        def run(images):
            out = forward(images)
            self._progbar.add(1)
            return out
        return run


def _feature_view(backbone, subnet, avgpool, last_blocks):
    """None for plain CLS features; else the cached view of this feature choice (validated)."""
    if not isinstance(avgpool, (bool, np.bool_)):
        raise TypeError(f"avgpool must be True or False, got {avgpool!r}")
    last_blocks = check_int(last_blocks, "last_blocks", minimum=1)
    spec = backbone.resolve_subnet(subnet)
    if last_blocks > 1:
        if not _supports_block_outputs(backbone):
            raise ValueError(f"last_blocks={last_blocks} needs per-block outputs, which "
                             f"{type(backbone).__name__} does not provide (its call takes no "
                             "return_blocks); use last_blocks=1")
        if hasattr(backbone, "block_ids"):
            run = len(backbone.block_ids(spec))
            if last_blocks > run:
                raise ValueError(f"last_blocks={last_blocks} but {backbone.name} runs {run} "
                                 f"blocks for subnet {spec}; valid: 1..{run}")
    if not avgpool and last_blocks == 1:
        return None
    views = _VIEWS.setdefault(backbone, {})
    key = (spec, bool(avgpool), last_blocks)
    if key not in views:
        width = int(backbone.feature_dim(spec))
        views[key] = _ProbeFeatureView(backbone, spec, bool(avgpool), last_blocks,
                                       width * (last_blocks + int(bool(avgpool))))
    return views[key]


# ----- the classifier grid -----------------------------------------------------------------------

def train_linear_classifier(train_features, train_labels, val_features, val_labels, num_classes,
                            learning_rates=DEFAULT_LEARNING_RATES, epochs=10, batch_size=256,
                            momentum=0.9, weight_decay=0.0, seed=0, verbose=0):
    """Trains one linear classifier per learning rate on fixed features; best by val top-1.

    All classifiers of the grid train together, as DINOv2 does: one Keras model holds one
    ``Dense`` head per learning rate on the same features, its loss is the sum of the heads'
    softmax cross-entropies (so each head gets exactly its own gradient), and one ``model.fit``
    with SGD (momentum, cosine decay to 0) trains them all, the per-head learning rates coming
    from an `LRMultiplierOptimizer` over a peak-1 schedule (exact for SGD with momentum and
    constant multipliers: the same updates as one run per learning rate). One compiled step
    and one pass over the data serve the whole grid.

    Args:
      train_features, val_features: (N, D) and (M, D) float arrays.
      train_labels, val_labels: integer labels in [0, num_classes).
      num_classes: number of classes C.
      learning_rates: one positive number or a sequence of them (the grid).
      epochs: passes over the training features.
      batch_size: training batch (min(batch_size, N)); every batch has this size (the stream
        of seeded permutations continues across epochs), so a compiled backend traces once.
      momentum: SGD momentum in [0, 1).
      weight_decay: decoupled weight decay of SGD (0: none, DINOv2's choice).
      seed: initial weights (the same for every head: N(0, 0.01), zero bias) and batch order.
      verbose: 0 silent; 1 a Keras progress bar and one line per learning rate; 2 one line per
        epoch and per learning rate.

    Returns:
      {"best_learning_rate": float, "top1": float, "top5": float (of the best),
       "per_learning_rate": {lr: {"top1", "top5", "train_loss", "diverged"}},
       "classifier": keras.Model (D,) -> (C,) logits of the best lr, "feature_dim": D,
       "num_classes": C}. Accuracies are fractions; top-5 is top-C when C < 5; train_loss is
      the mean cross-entropy on the training features after training. The best is the highest
      val top-1, ties to the higher top-5, then to the earlier learning rate of the grid. A
      head whose weights or loss became non-finite is marked diverged (top1 = top5 = None) and
      never chosen (it cannot disturb the others); RuntimeError if every head diverged.
    """

    lrs = _check_learning_rates(learning_rates)
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    epochs = check_int(epochs, "epochs", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    verbose = _check_verbose(verbose)
    seed = check_int(seed, "seed", minimum=0)
    if (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
            or not 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
            or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    train = check_features(train_features, "train_features")
    val = check_features(val_features, "val_features")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"train_features and val_features must have the same feature "
                         f"dimension, got {train.shape[1]} and {val.shape[1]}")
    if train.shape[0] == 0:
        raise ValueError("train_features is empty: there is nothing to train on")
    if val.shape[0] == 0:
        raise ValueError("val_features is empty: the learning rate cannot be chosen")
    train_y = check_labels(train_labels, "train_labels", train.shape[0], "train_features",
                      num_classes).astype(np.int32)
    val_y = check_labels(val_labels, "val_labels", val.shape[0], "val_features", num_classes)

    start = time.perf_counter()
    dim = train.shape[1]
    step = min(batch_size, train.shape[0])
    steps_per_epoch = -(-train.shape[0] // step)
    kernel0 = np.random.default_rng(seed).normal(0.0, 0.01, (dim, num_classes))
    model, heads = _grid_model(dim, num_classes, len(lrs), kernel0)
    multipliers = {}
    for head, lr in zip(heads, lrs):
        multipliers[head.kernel.path] = multipliers[head.bias.path] = lr
    schedule = keras.optimizers.schedules.CosineDecay(1.0, decay_steps=epochs * steps_per_epoch)
    inner = keras.optimizers.SGD(schedule, momentum=float(momentum),
                                 weight_decay=float(weight_decay) or None)
    model.compile(optimizer=LRMultiplierOptimizer(inner, multipliers), loss=_summed_grid_ce)
    # the state now: created in the step, it makes TensorFlow trace the step twice
    model.optimizer.build(model.trainable_variables)
    model.fit(_batch_stream(train, train_y, step, seed), epochs=epochs,
              steps_per_epoch=steps_per_epoch, shuffle=False, verbose=verbose)

    per_lr, weights = {}, {}
    for head, lr in zip(heads, lrs):
        kernel, bias = (np.asarray(ops.convert_to_numpy(w), np.float64)
                        for w in (head.kernel, head.bias))
        loss = math.nan
        if np.isfinite(kernel).all() and np.isfinite(bias).all():
            loss = _cross_entropy(train, train_y, kernel, bias)
        diverged = not math.isfinite(loss)
        top1 = top5 = None
        if not diverged:
            top1, top5 = _accuracy(val, val_y, kernel, bias, num_classes)
            weights[lr] = (kernel, bias)
        per_lr[lr] = {"top1": top1, "top5": top5, "train_loss": loss, "diverged": diverged}
        if verbose:
            shown = "diverged" if diverged else f"val top-1 {top1:.4f}, top-5 {top5:.4f}"
            print(f"linear probe lr={lr:g}: train loss {loss:.4f}, {shown}", flush=True)
    if verbose:
        print(f"linear probe: {len(lrs)} learning rates x {epochs} epochs trained together in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    finite = [lr for lr in lrs if not per_lr[lr]["diverged"]]
    if not finite:
        raise RuntimeError(f"every learning rate of the grid {lrs} diverged (non-finite loss); "
                           "try smaller learning rates")
    order = {lr: i for i, lr in enumerate(lrs)}
    best = max(finite, key=lambda lr: (per_lr[lr]["top1"], per_lr[lr]["top5"], -order[lr]))
    classifier = _linear_model(dim, num_classes)
    kernel, bias = weights[best]
    classifier.get_layer("linear").set_weights([kernel.astype("float32"), bias.astype("float32")])
    return {"best_learning_rate": best, "top1": per_lr[best]["top1"],
            "top5": per_lr[best]["top5"], "per_learning_rate": per_lr,
            "classifier": classifier, "feature_dim": dim, "num_classes": num_classes}


def linear_probe(backbone, train_images, train_labels, val_images, val_labels, subnet=None,
                 num_classes=None, avgpool=False, last_blocks=1,
                 learning_rates=DEFAULT_LEARNING_RATES, epochs=10, batch_size=256,
                 feature_batch_size=64, pixel_normalization=FROM_PRESET, momentum=0.9,
                 weight_decay=0.0, seed=0, verbose=0):
    """Linear-probe accuracy of a backbone (sub-network): features once, then the lr grid.

    Args:
      backbone: an elastic backbone (e.g. ElasticViT) or an extracted subnet.
      train_images, val_images: (N, H, W, C) uint8 or float arrays (see `extract_features`).
      train_labels, val_labels: integer labels.
      subnet, avgpool, last_blocks: which features (see `probe_features`).
      num_classes: default 1 + the largest label of either split.
      feature_batch_size, pixel_normalization: the extraction's (see `probe_features`).
      learning_rates, epochs, batch_size, momentum, weight_decay, seed: the classifier
        training's (see `train_linear_classifier`).
      verbose: 0 silent (default); 1 progress bars (extraction batches, training epochs) and
        one line per stage; 2 one line per epoch and per stage.

    Returns:
      `train_linear_classifier`'s result plus "subnet" (the resolved spec or None), "avgpool",
      "last_blocks" (what to pass to `probe_features` to feed "classifier" new images).
    """
    if pixel_normalization not in INPUT_NORMALIZATIONS:
        raise ValueError(f"pixel_normalization must be one of {INPUT_NORMALIZATIONS}, got "
                         f"{pixel_normalization!r}")
    _check_learning_rates(learning_rates)   # fail before the extraction, not after
    _feature_view(backbone, subnet, avgpool, last_blocks)
    train_y, val_y = np.asarray(train_labels), np.asarray(val_labels)
    if num_classes is None:
        tops = [int(y.max()) for y in (train_y, val_y)
                if y.size and np.issubdtype(y.dtype, np.integer)]
        num_classes = max(tops) + 1 if tops else 1
    verbose = _check_verbose(verbose)
    kwargs = dict(subnet=subnet, avgpool=avgpool, last_blocks=last_blocks,
                  batch_size=feature_batch_size, pixel_normalization=pixel_normalization,
                  verbose=verbose)
    start = time.perf_counter()
    train = probe_features(backbone, train_images, **kwargs)
    val = probe_features(backbone, val_images, **kwargs)
    if verbose:
        print(f"linear probe features: train {train.shape}, val {val.shape} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    result = train_linear_classifier(train, train_y, val, val_y, num_classes,
                                     learning_rates=learning_rates, epochs=epochs,
                                     batch_size=batch_size, momentum=momentum,
                                     weight_decay=weight_decay, seed=seed, verbose=verbose)
    result.update(subnet=backbone.resolve_subnet(subnet), avgpool=bool(avgpool),
                  last_blocks=int(last_blocks))
    return result


# ----- helpers -----------------------------------------------------------------------------------

def _linear_model(dim, num_classes):
    """The chosen classifier: features (D,) -> logits (C,), one float32 Dense named "linear"."""
    inputs = keras.Input((dim,), name="features", dtype="float32")
    logits = keras.layers.Dense(num_classes, name="linear", dtype="float32")(inputs)
    return keras.Model(inputs, logits, name="linear_probe")


def _grid_model(dim, num_classes, num_heads, kernel0):
    """features (D,) -> (K, C) logits of K Dense heads with the same initial weights."""
    inputs = keras.Input((dim,), name="features", dtype="float32")
    heads = [keras.layers.Dense(num_classes, name=f"linear_{k}", dtype="float32")
             for k in range(num_heads)]
    logits = ops.stack([head(inputs) for head in heads], axis=1)
    model = keras.Model(inputs, logits, name="linear_probe_grid")
    for head in heads:
        head.kernel.assign(kernel0.astype("float32"))
        head.bias.assign(np.zeros(num_classes, "float32"))
    return model, heads


def _summed_grid_ce(y_true, y_pred):
    """Sum over the heads of the softmax cross-entropy: y_true (B,), y_pred (B, K, C) -> (B,).
    Head k's parameters get the gradient of its own term only."""
    labels = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
    labels = ops.broadcast_to(labels, ops.shape(y_pred)[:2])
    ce = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
    return ops.sum(ce, axis=-1)


def _cross_entropy(x, y, kernel, bias):
    """Mean softmax cross-entropy of logits x @ kernel + bias (float64 numpy)."""
    with np.errstate(over="ignore", invalid="ignore"):
        logits = x.astype(np.float64) @ kernel + bias
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return float(np.mean(log_norm - logits[np.arange(len(y)), y]))


def _batch_stream(x, y, batch_size, seed):
    """Endless fixed-size batches from a seeded stream of permutations of the rows."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    order, pos = rng.permutation(n), 0
    while True:
        pieces, need = [], batch_size
        while need:
            take = order[pos:pos + need]
            pieces.append(take)
            need -= take.size
            pos += take.size
            if pos == n:
                order, pos = rng.permutation(n), 0
        idx = np.concatenate(pieces)
        yield x[idx], y[idx]


def _accuracy(x, y, kernel, bias, num_classes):
    """(top-1, top-5) of logits x @ kernel + bias (float64 numpy); ties to the lower class."""
    logits = x.astype(np.float64) @ kernel + bias
    true = logits[np.arange(len(y)), y][:, None]
    classes = np.arange(num_classes)[None, :]
    ahead = ((logits > true) | ((logits == true) & (classes < y[:, None]))).sum(axis=1)
    return float(np.mean(ahead < 1)), float(np.mean(ahead < min(5, num_classes)))


def _check_verbose(verbose):
    verbose = check_int(int(verbose) if isinstance(verbose, bool) else verbose, "verbose",
                         minimum=0)
    if verbose > 2:
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose}")
    return verbose


def _check_learning_rates(learning_rates):
    seq = [learning_rates] if isinstance(learning_rates, numbers.Number) else list(learning_rates)
    if not seq:
        raise ValueError("learning_rates must hold at least one learning rate, got an empty "
                         "sequence")
    for lr in seq:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"every learning rate must be a number, got {lr!r} in "
                            f"learning_rates={learning_rates!r}")
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"every learning rate must be a finite number > 0, got {lr} in "
                             f"learning_rates={learning_rates!r}")
    return list(dict.fromkeys(float(lr) for lr in seq))

"""Layer-wise analysis of a backbone, as MAE-Lite's (REFERENCE.md §3 "Analysis"): how alike its
layers' representations are (linear CKA, between the layers of one model or of two), and how
far and how broadly its attention heads look (attention distance and entropy).

    result = analyze(backbone, images)                        # CKA between its own layers
    result = analyze(teacher, images, model_b=teacher, subnet_a="small", subnet_b="large")
    save_analysis(result, "runs/analysis")   # analysis.json, cka.png, attention_*.png

**Linear CKA, minibatch form** (Nguyen, Raghu & Kornblith 2021, eq. 3). A layer's
representation of a batch of n images, (n, ...), is flattened per image to X (n, D); its Gram
matrix K = X Xᵀ gets a zero diagonal, and the unbiased HSIC of two layers is

    HSIC_1(K, L) = [tr(K L) + (1ᵀK1)(1ᵀL1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK L 1] / (n (n-3))

(n >= 4). It is averaged over the minibatches, and CKA(K, L) = mean HSIC_1(K, L) /
sqrt(mean HSIC_1(K, K) · mean HSIC_1(L, L)): 1 for representations equal up to a rotation and
a scale, near 0 for unrelated ones; each minibatch's HSIC_1 is an unbiased estimate, so the
mean over minibatches estimates the full-data value without the full data's n x n Gram
matrices. Nan where a layer is constant over the images (0 / 0). The Gram and HSIC arithmetic
is float64 numpy on the host. The layers are what ``backbone.layer_representations`` gives
(ViT: the input of every block after its first norm, and the final-norm tokens, CLS removed;
Swin: every block's output and the final norm; ResNets: the stem and every block's output).

**Attention distance and entropy** per layer and head, from the PRE-softmax attention logits
``backbone.attention_logits`` gives ((B, heads, T, T); only families with global attention,
the ViT, have them): the rows and columns of the tokens before the patch tokens (the CLS token)
are dropped and the softmax is taken again over the N = gh x gw patch keys, p (B, heads, N, N).
Per query q: entropy = -Σ_k p ln(p + 1e-6) (nats; the 1e-6 is MAE-Lite's: a uniform attention
gives about ln N), distance = Σ_k p |pos_q - pos_k|, the Euclidean distance between the patch
grid positions (row, column); both are averaged over the queries and the images: one value
per (layer, head). The grid is the image size over the patch size, non-square grids included.

Units of the distance (a decision): ``distance_px`` is in pixels of the network's input
(grid units x ``patch_size``), the default of the figures, so that models of different patch
sizes compare; ``distance_patches`` is the grid-unit value. MAE-Lite's code multiplies grid
units by 14 although its patches are 16 px (REFERENCE.md flags it): its published curves are
``distance_patches x 14``, i.e. 14/16 of our ``distance_px`` for a patch-16 model.

Images: float images are taken as preprocessed, uint8 ones go through each model's own
preprocessing (``eval/features.py``); both models see the same images, so they must take the
same input size.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import weakref

import keras
import numpy as np
from keras import ops

from poa_keras.backbones.compiled import architecture_key
from poa_keras.eval.features import FROM_PRESET, input_preprocessing, to_backbone_input
from poa_keras.files import atomic_write_bytes
from poa_keras.validation import check_int

#: The smallest minibatch the unbiased HSIC is defined on (its n (n - 3) denominator).
MIN_BATCH = 4
#: MAE-Lite's constant inside the entropy's logarithm.
ENTROPY_EPS = 1e-6
ATTENTION_CHOICES = ("auto", True, False)
UNITS = {
    "cka": "linear CKA, unbiased HSIC (Nguyen et al. 2021, eq. 3), minibatch means; 0..1",
    "entropy": "nats (natural logarithm), after the softmax over the patch keys",
    "distance_px": "pixels of the network's input (patch grid units x patch size)",
    "distance_patches": "patch grid units (Euclidean distance between (row, column) positions)",
}


# ----- linear CKA ------------------------------------------------------------------------------

def gram_linear(x):
    """The linear Gram matrix K = X Xᵀ (n, n), float64, with its diagonal set to 0 (the
    unbiased HSIC reads the off-diagonal entries only), of representations ``x`` (n, ...)
    flattened per example to X (n, D)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 1:
        raise ValueError(f"a representation needs a leading batch axis, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    gram = x @ x.T
    np.fill_diagonal(gram, 0.0)
    return gram


def _hsic(grams_a, grams_b, pairs=True):
    """HSIC_1 of zero-diagonal Gram matrices (La, n, n) and (Lb, n, n): every pair (La, Lb),
    or with ``pairs=False`` the matching ones (La = Lb; (La,))."""
    n = grams_a.shape[-1]
    if pairs:
        trace = np.einsum("aij,bij->ab", grams_a, grams_b)   # tr(K L): K, L are symmetric
        sums = np.outer(grams_a.sum(axis=(1, 2)), grams_b.sum(axis=(1, 2)))
        cross = grams_a.sum(axis=2) @ grams_b.sum(axis=2).T  # 1ᵀ K L 1 = (K 1) · (L 1)
    else:
        trace = np.einsum("aij,aij->a", grams_a, grams_b)
        sums = grams_a.sum(axis=(1, 2)) * grams_b.sum(axis=(1, 2))
        cross = np.einsum("ai,ai->a", grams_a.sum(axis=2), grams_b.sum(axis=2))
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def hsic_unbiased(k, l):
    """HSIC_1(K, L) (Nguyen et al. 2021, eq. 3; Song et al. 2012) of two (n, n) Gram matrices,
    n >= 4; their diagonals are ignored (taken as 0). A float."""
    k, l = (np.array(g, np.float64) for g in (k, l))
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"K and L must be square matrices of one shape, got {k.shape} and "
                         f"{l.shape}")
    _check_batch(k.shape[0])
    for g in (k, l):
        np.fill_diagonal(g, 0.0)
    return float(_hsic(k[None], l[None])[0, 0])


def _check_batch(n):
    if n < MIN_BATCH:
        raise ValueError(f"the unbiased HSIC needs minibatches of at least {MIN_BATCH} examples "
                         f"(its denominator is n (n - 3)), got a batch of {n}")


class MinibatchCKA:
    """Accumulates the minibatch linear CKA between every layer of one list (a) and every
    layer of another (b, or a again) over batches: ``update`` once per minibatch, ``result``
    at the end.

        cka = MinibatchCKA()
        for batch in batches:
            cka.update([rep(batch) for rep in layers_a], [rep(batch) for rep in layers_b])
        matrix = cka.result()    # (La, Lb)

    Each update takes the representations of the same n >= 4 examples, (n, ...) arrays
    (flattened per example), one per layer; without ``reps_b`` the CKA is between the layers
    of ``reps_a`` (an La x La matrix). Every minibatch counts once in the means (the unbiased
    HSIC of each is an estimate of the same value)."""

    def __init__(self):
        self._cross = self._self_a = self._self_b = None
        self.num_batches = 0
        self.num_examples = 0
        self._two = None

    def update(self, reps_a, reps_b=None):
        grams_a = self._grams(reps_a, "reps_a")
        two = reps_b is not None
        grams_b = self._grams(reps_b, "reps_b") if two else grams_a
        if grams_b.shape[1] != grams_a.shape[1]:
            raise ValueError(f"reps_a and reps_b must hold the same examples: "
                             f"{grams_a.shape[1]} and {grams_b.shape[1]} rows")
        cross = _hsic(grams_a, grams_b)
        self_a = np.diagonal(cross).copy() if not two else _hsic(grams_a, grams_a, pairs=False)
        self_b = self_a if not two else _hsic(grams_b, grams_b, pairs=False)
        if self.num_batches:
            if two != self._two or cross.shape != self._cross.shape:
                raise ValueError(f"every update must give the same layers: the first gave a "
                                 f"{self._cross.shape} CKA matrix{' (two models)' * self._two}, "
                                 f"this one {cross.shape}{' (two models)' * two}")
            self._cross += cross
            self._self_a += self_a
            self._self_b += self_b
        else:
            # own copies: the sums grow in place (self_b may be self_a)
            self._cross, self._self_a, self._self_b = cross.copy(), self_a.copy(), self_b.copy()
            self._two = two
        self.num_batches += 1
        self.num_examples += grams_a.shape[1]
        return self

    @staticmethod
    def _grams(reps, what):
        if isinstance(reps, dict):
            reps = list(reps.values())
        reps = list(reps)
        if not reps:
            raise ValueError(f"{what} holds no layer")
        sizes = {np.shape(r)[0] for r in reps}
        if len(sizes) != 1:
            raise ValueError(f"the layers of {what} must hold the same examples, got batch sizes "
                             f"{sorted(sizes)}")
        _check_batch(sizes.pop())
        return np.stack([gram_linear(r) for r in reps])

    def result(self):
        """The CKA matrix (La, Lb), float64 (nan where a layer's HSIC with itself is not
        positive: a constant representation)."""
        if not self.num_batches:
            raise ValueError("no minibatch yet: call update first")
        norm = np.outer(self._self_a, self._self_b)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, self._cross / np.sqrt(np.maximum(norm, 0.0)), np.nan)


def batch_sizes(num_examples, batch_size):
    """How the examples are split into minibatches: ceil(num_examples / batch_size) batches of
    near-equal sizes (the first ones one larger), fewer where that would leave a batch with
    fewer than 4 examples (then a batch may exceed ``batch_size`` by up to 3 examples)."""
    num_examples = check_int(num_examples, "num_examples", MIN_BATCH)
    batch_size = check_int(batch_size, "batch_size", MIN_BATCH)
    count = min(-(-num_examples // batch_size), num_examples // MIN_BATCH)
    base, extra = divmod(num_examples, count)
    return [base + 1] * extra + [base] * (count - extra)


def linear_cka(x, y, batch_size=None):
    """The linear CKA of two representations of the same examples, (N, ...) arrays (flattened
    per example): with ``batch_size`` None from one batch of all N (N >= 4), else the
    minibatch form over ``batch_sizes(N, batch_size)`` consecutive batches. A float."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape[:1]:
        raise ValueError(f"x and y must hold the same examples, got shapes {x.shape} and "
                         f"{y.shape}")
    sizes = [x.shape[0]] if batch_size is None else batch_sizes(x.shape[0], batch_size)
    cka, start = MinibatchCKA(), 0
    for size in sizes:
        cka.update([x[start:start + size]], [y[start:start + size]])
        start += size
    return float(cka.result()[0, 0])


# ----- attention ------------------------------------------------------------------------------

def grid_distances(grid_shape):
    """(N, N) Euclidean distances between the patch grid positions (row, column) of a
    (gh, gw) grid, tokens in row-major order (the patch embedding's), float64."""
    gh, gw = (int(s) for s in grid_shape)
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    pos = np.stack([rows, cols], axis=1).astype(np.float64)
    return np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))


def _attention_sums(logits, grid_shape, distances=None):
    """Sums over images and queries of the entropy and the distance (grid units) of one batch
    of logits (B, heads, T, T): ((heads,), (heads,), B N), float64."""
    logits = ops.convert_to_tensor(logits)
    shape = tuple(logits.shape)
    gh, gw = (int(s) for s in grid_shape)
    n = gh * gw
    if len(shape) != 4 or shape[2] != shape[3] or shape[2] < n:
        raise ValueError(f"attention logits must have shape (batch, heads, T, T) with T >= the "
                         f"{n} patch tokens of a {gh} x {gw} grid, got {shape}")
    prefix = shape[2] - n   # the tokens before the patches (the CLS token)
    p = ops.softmax(ops.cast(logits[:, :, prefix:, prefix:], "float32"), axis=-1)
    entropy = -ops.sum(p * ops.log(p + ENTROPY_EPS), axis=-1)        # (B, heads, N)
    distances = grid_distances((gh, gw)) if distances is None else distances
    distance = ops.einsum("bhqk,qk->bhq", p, ops.convert_to_tensor(distances, "float32"))
    entropy_sum = np.asarray(ops.convert_to_numpy(ops.sum(entropy, axis=(0, 2))), np.float64)
    distance_sum = np.asarray(ops.convert_to_numpy(ops.sum(distance, axis=(0, 2))), np.float64)
    return entropy_sum, distance_sum, shape[0] * n


def attention_statistics(logits, grid_shape):
    """The attention entropy and distance of every head, averaged over the queries and the
    images of one batch of PRE-softmax logits (B, heads, T, T) (see the module docstring:
    the tokens before the gh x gw patch tokens are dropped, the softmax re-taken over the
    patch keys).

    Returns ``(entropy, distance)``, two float64 arrays (heads,): nats, and patch grid units
    (multiply by the patch size for pixels)."""
    entropy, distance, count = _attention_sums(logits, grid_shape)
    return entropy / count, distance / count


# ----- models ---------------------------------------------------------------------------------

def _spec_record(spec):
    if spec is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _model_record(model, spec):
    return {"name": model.name, "class": type(model).__name__,
            "family": getattr(model, "family", None), "subnet": _spec_record(spec),
            "image_size": getattr(model, "image_size", None)}


def _to_numpy(tensor):
    return np.asarray(ops.convert_to_numpy(tensor))


# (architecture, hook, spec, options) -> (weakref to the tracing model, jitted program, names)
_JAX_HOOK_PROGRAMS: dict = {}


def hook_runner(model, hook, subnet=None, **kwargs):
    """A callable images -> ``model.<hook>(images, subnet=subnet, **kwargs)``, its output (a
    dict, in the hook's order, or a list of tensors) as the hook gives it, for the hooks the
    analysis reads (``layer_representations``, ``attention_logits``). Per backend, as
    ``backbones/compiled.py`` does for the call: on JAX a jitted stateless call (eager JAX
    compiles every op of every new shape on its own: seconds per hook on a CPU), shared by
    the models of one architecture (``compiled.architecture_key``: an extracted subnet or a
    reloaded preset reuses it); on PyTorch the eager hook without autograd; on TensorFlow the
    eager hook (tracing a tf.function costs more than the few batches of an analysis)."""
    spec = model.resolve_subnet(subnet)
    backend = keras.backend.backend()
    if backend == "jax":
        arch = architecture_key(model)
        key = (("model", id(model)) if arch is None else arch, hook, spec,
               tuple(sorted(kwargs.items())))

        def run(images):
            program, names = _jax_hook_program(model, key, hook, spec, kwargs)
            images = ops.convert_to_tensor(images)
            out = program([v.value for v in model.trainable_variables],
                          [v.value for v in model.non_trainable_variables], images)
            order = names.get(tuple(images.shape))
            return out if order is None else dict(zip(order, out))
        return run
    if backend == "torch":
        import torch

        def run(images):
            with torch.no_grad():
                return getattr(model, hook)(images, subnet=spec, **kwargs)
        return run
    return lambda images: getattr(model, hook)(images, subnet=spec, **kwargs)


def _jax_hook_program(model, key, hook, spec, kwargs):
    """(the jitted stateless hook of this architecture, {image shape: output names}), built
    for ``model`` or shared with the model of the same architecture that built it."""
    import jax

    entry = _JAX_HOOK_PROGRAMS.get(key)
    if entry is not None and entry[0]() is not None and \
            architecture_key(entry[0]()) == key[0]:   # its model unchanged since (see compiled)
        return entry[1], entry[2]
    ref = weakref.ref(model)   # the program must not keep its model alive
    names = {}

    @jax.jit
    def program(trainable, non_trainable, images):
        owner = ref()
        mapping = list(zip(owner.trainable_variables, trainable)) + list(
            zip(owner.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            out = getattr(owner, hook)(images, subnet=spec, **kwargs)
        if isinstance(out, dict):   # a jitted dict comes back in sorted key order
            names[tuple(images.shape)] = list(out)
            out = list(out.values())
        return out

    _JAX_HOOK_PROGRAMS[key] = (ref, program, names)
    weakref.finalize(model, _drop_hook_program, key, ref)
    return program, names


def _drop_hook_program(key, ref):
    entry = _JAX_HOOK_PROGRAMS.get(key)
    if entry is not None and entry[0] is ref:
        del _JAX_HOOK_PROGRAMS[key]


class _Attention:
    """The per-(layer, head) sums of one model's attention statistics over the batches."""

    def __init__(self, model, spec, images_shape):
        patch = getattr(model, "patch_size", None)
        self.patch_size = None if patch is None else int(patch)
        self.grid = None if patch is None else (images_shape[1] // patch,
                                                images_shape[2] // patch)
        self.distances = None if patch is None else grid_distances(self.grid)
        self.model, self.spec = model, spec
        self.run = hook_runner(model, "attention_logits", spec, blocks="all")
        self.entropy = self.distance = None
        self.count = 0

    def update(self, images):
        logits = self.run(images)
        if self.patch_size is None:
            raise ValueError(f"{self.model.name} gives attention logits but has no patch_size: "
                             "the patch grid of the attention distance is unknown")
        sums = [_attention_sums(x, self.grid, self.distances) for x in logits]
        entropy = [s[0] for s in sums]
        distance = [s[1] for s in sums]
        if self.entropy is None:
            self.entropy, self.distance = entropy, distance
        else:
            self.entropy = [a + b for a, b in zip(self.entropy, entropy)]
            self.distance = [a + b for a, b in zip(self.distance, distance)]
        self.count += sums[0][2] if sums else 0

    def record(self):
        entropy = [e / self.count for e in self.entropy]
        patches = [d / self.count for d in self.distance]
        # the blocks the subnet runs, by position (the ViT's names of its representations)
        return {"layers": [f"block_{k}" for k in range(len(entropy))],
                "entropy": [e.tolist() for e in entropy],
                "distance_px": [(d * self.patch_size).tolist() for d in patches],
                "distance_patches": [d.tolist() for d in patches],
                "patch_size": self.patch_size, "grid": list(self.grid),
                "uniform_entropy": math.log(self.grid[0] * self.grid[1])}


def _json_matrix(matrix):
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]


def check_same_input_size(model_a, model_b):
    """A ValueError naming both sizes unless the two models take the same input size
    (``image_size``): the CKA between two models compares them on the same images."""
    size_a, size_b = (getattr(m, "image_size", None) for m in (model_a, model_b))
    if size_a != size_b:
        raise ValueError(f"the two models take different input sizes: {model_a.name} {size_a} "
                         f"px, {model_b.name} {size_b} px; CKA compares two models on the same "
                         "images, so they must take the same size")


def analyze(model_a, images, model_b=None, subnet_a=None, subnet_b=None, batch_size=64,
            attention="auto", pixel_normalization=FROM_PRESET, verbose=0):
    """Linear CKA between layers, and the attention distance and entropy of every head.

    Args:
      model_a: a backbone (any family: ``layer_representations`` gives its layers).
      images: (N, H, W, C) numpy array, N >= 4: float images are taken as preprocessed, uint8
        ones go through each model's preprocessing (``pixel_normalization``, as in
        ``extract_features``).
      model_b: None: CKA between the layers of ``model_a`` (La x La); a backbone (``model_a``
        itself too, with another ``subnet_b``): between the layers of the two on the same
        images (La x Lb). Both must take the same input size (``image_size``).
      subnet_a, subnet_b: the sub-networks (None: the intact networks; a spec, tuple or name).
      batch_size: images per forward pass and per CKA minibatch (>= 4; see ``batch_sizes``).
      attention: "auto" (default): the attention statistics of every model that has global
        attention (the ViT), the others' refusal recorded; True: required (a family without
        attention raises its ValueError); False: none.
      pixel_normalization: for uint8 images (see ``extract_features``).
      verbose: 0 silent; 1 a Keras progress bar over the batches.

    Returns:
      A JSON-able dict: ``num_images``, ``batch_sizes``; ``model_a`` / ``model_b`` (None
      without): name, class, family, subnet, image_size, ``layers`` (the CKA's layer names);
      ``cka``: the (La, Lb) matrix as nested lists (None where undefined); ``attention``:
      {"a": ..., "b": ...} per model: None (not asked), {"refused": reason}, or {"layers",
      "entropy", "distance_px", "distance_patches" (each layers x heads), "patch_size",
      "grid", "uniform_entropy" (ln N)}; ``units``.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {list(ATTENTION_CHOICES)}, got {attention!r}")
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (num_images, height, width, channels), got "
                         f"shape {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"images must be uint8 (0..255) or float (already preprocessed), got "
                        f"dtype {images.dtype}")
    batch_size = check_int(batch_size, "batch_size", MIN_BATCH)
    if images.shape[0] < MIN_BATCH:
        raise ValueError(f"the CKA needs at least {MIN_BATCH} images (minibatches of n >= 4 for "
                         f"the unbiased HSIC), got {images.shape[0]}")
    if model_b is not None:
        check_same_input_size(model_a, model_b)
    models = [("a", model_a, model_a.resolve_subnet(subnet_a))]
    if model_b is not None:
        models.append(("b", model_b, model_b.resolve_subnet(subnet_b)))
    elif subnet_b is not None:
        raise ValueError("subnet_b needs model_b (give model_b=model_a to compare two subnets "
                         "of one model)")
    prep = {role: input_preprocessing(m, pixel_normalization) for role, m, _ in models}
    runners = {role: hook_runner(m, "layer_representations", spec) for role, m, spec in models}

    sizes = batch_sizes(images.shape[0], batch_size)
    cka = MinibatchCKA()
    layers = {}
    watch = {role: None for role, _, _ in models}
    refused = {}
    bar = keras.utils.Progbar(len(sizes), unit_name="batch") if verbose else None
    start = 0
    for size in sizes:
        batch = images[start:start + size]
        start += size
        reps = {}
        for role, model, spec in models:
            x = ops.convert_to_tensor(
                to_backbone_input(batch, getattr(model, "in_channels", 3), prep[role]))
            found = runners[role](x)
            names = list(found)
            if layers.setdefault(role, names) != names:
                raise ValueError(f"{model.name} gave the layers {names}, earlier {layers[role]}")
            reps[role] = [_to_numpy(found[name]) for name in names]
            del found
            if attention is False or role in refused:
                continue
            if watch[role] is None:
                watch[role] = _Attention(model, spec, tuple(x.shape))
            try:
                watch[role].update(x)
            except ValueError as error:
                if attention is True or watch[role].count:
                    raise
                refused[role] = str(error)   # a family without global attention
        cka.update(reps["a"], reps.get("b"))
        if bar is not None:
            bar.add(1)

    attention_records = {}
    for role, _, _ in models:
        if attention is False:
            attention_records[role] = None
        elif role in refused:
            attention_records[role] = {"refused": refused[role]}
        else:
            attention_records[role] = watch[role].record()
    result = {"num_images": int(images.shape[0]), "batch_sizes": sizes,
              "model_a": dict(_model_record(model_a, models[0][2]), layers=layers["a"]),
              "model_b": None, "cka": _json_matrix(cka.result()),
              "attention": attention_records, "units": dict(UNITS)}
    if model_b is not None:
        result["model_b"] = dict(_model_record(model_b, models[1][2]), layers=layers["b"])
    return result


# ----- figures and files ----------------------------------------------------------------------

def _title(record):
    subnet = record.get("subnet")
    if not subnet:
        return record["name"]
    text = ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in subnet.items())
    return f"{record['name']} ({text})"


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def _ticks(ax, axis, names):
    step = max(1, math.ceil(len(names) / 24))   # at most ~24 labels per axis
    where = list(range(0, len(names), step))
    getattr(ax, f"set_{axis}ticks")(where)
    getattr(ax, f"set_{axis}ticklabels")([names[i] for i in where], fontsize=7,
                                         rotation=90 if axis == "x" else 0)


def plot_cka(result, path):
    """The CKA matrix of an ``analyze`` result as a heat map (layer 0 at the bottom left;
    rows: model a's layers, columns: model b's or a's again; 0..1). Written as PNG, atomically
    (matplotlib's Agg canvas, no pyplot). Returns the path."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in result["cka"]],
                      np.float64)
    rows = result["model_a"]["layers"]
    other = result.get("model_b") or result["model_a"]
    cols = other["layers"]
    fig = _figure(max(5.0, 2.5 + 0.22 * len(cols)), max(4.5, 2.0 + 0.22 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0,
                      interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, label="linear CKA")
    _ticks(ax, "x", cols)
    _ticks(ax, "y", rows)
    ax.set_ylabel(_title(result["model_a"]))
    ax.set_xlabel(_title(other))
    ax.set_title(f"linear CKA (unbiased, minibatch), {result['num_images']} images", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


MEASURES = {"distance_px": "attention distance (px)",
            "distance_patches": "attention distance (patches)",
            "entropy": "attention entropy (nats)"}


def plot_attention(result, path, measure="distance_px"):
    """Per-layer box plots of one attention measure of an ``analyze`` result (the boxes over
    the heads, every head a dot, as MAE-Lite's figures), one panel per model that has them:
    ``measure`` "distance_px" (default), "distance_patches" or "entropy" (with ln N, the
    entropy of a uniform attention, dashed). Written as PNG, atomically. Returns the path."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")
    panels = [(role, stats) for role, stats in (result.get("attention") or {}).items()
              if stats and "refused" not in stats]
    if not panels:
        raise ValueError("the result holds no attention statistics (analyze with attention on "
                         "a model with global attention, e.g. a ViT)")
    depth = max(len(stats["layers"]) for _, stats in panels)
    fig = _figure(max(5.5, 1.5 + 0.45 * depth) * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)   # the dots' horizontal jitter
    for ax, (role, stats) in zip(axes, panels):
        values = [np.asarray(v, np.float64) for v in stats[measure]]
        where = np.arange(1, len(values) + 1)
        ax.boxplot(values, positions=where, widths=0.6, showfliers=False)
        for x, v in zip(where, values):
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(v)), v, s=9, alpha=0.6, color="C0",
                       zorder=3)
        if measure == "entropy":
            ax.axhline(stats["uniform_entropy"], ls="--", color="gray", lw=1,
                       label=f"uniform over {stats['grid'][0]}x{stats['grid'][1]} patches")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(where)
        ax.set_xticklabels(stats["layers"], rotation=90, fontsize=7)
        ax.set_ylabel(MEASURES[measure])
        ax.ticklabel_format(axis="y", useOffset=False)   # values, not offsets from one
        ax.set_title(_title(result[f"model_{role}"]), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{MEASURES[measure]} per head, {result['num_images']} images", fontsize=11)
    fig.tight_layout()
    return _save_png(fig, path)


def save_analysis(result, output_dir):
    """Writes an ``analyze`` result into ``output_dir`` (created if needed), every file
    atomically: ``analysis.json``, ``cka.png`` and, where the result has attention statistics,
    ``attention_distance.png`` (pixels) and ``attention_entropy.png``. Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    text = json.dumps(result, indent=2)
    paths = [atomic_write_bytes(os.path.join(output_dir, "analysis.json"), text.encode("utf-8")),
             plot_cka(result, os.path.join(output_dir, "cka.png"))]
    if any(s and "refused" not in s for s in (result.get("attention") or {}).values()):
        paths.append(plot_attention(result, os.path.join(output_dir, "attention_distance.png")))
        paths.append(plot_attention(result, os.path.join(output_dir, "attention_entropy.png"),
                                    measure="entropy"))
    return [str(p) for p in paths]

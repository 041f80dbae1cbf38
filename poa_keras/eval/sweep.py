"""Every sub-network of one elastic teacher at once: k-NN accuracy, size, cost (POA Figure 1).

    result = sweep("runs/my_teacher", (x_train, y_train), (x_val, y_val), output_dir="runs/sw")
    print_table(result)                           # spec, name, params, GFLOPs, latency, top-1
    result.pareto(x="flops")                      # rows no other subnet beats on cost AND top-1
    row, spec = result.select(params=25e6, latency_ms=40)   # best top-1 within every budget
    student = teacher.extract(spec)

For every subnet of the teacher's grid (or a chosen subset), `sweep` measures:

* ``top1`` / ``top5`` (and ``top1_k{k}`` / ``top5_k{k}`` for every k of ``ks``): weighted k-NN
  (``eval.knn``: L2-normalised CLS features, votes exp(sim / T)) of the validation images
  against the training images as the bank, both embedded by the teacher's ELASTIC forward of
  that subnet (``teacher.compiled_forward(spec)``, which equals the extracted network's forward);
  the bank is re-embedded for every subnet (features differ per subnet), batch by batch;
* ``params``: ``teacher.subnet_params(spec)``; ``flops``: ``teacher.subnet_flops(spec,
  image_size=(H, W))`` per image at the data's resolution (a multiply-add = 2 FLOPs);
* ``latency_ms``: the wall time of the EXTRACTED subnet's compiled forward
  (``teacher.extract(spec).compiled_forward()``) on one fixed batch of ``latency_batch``
  validation images, each call synchronised by copying the output to the host, measured after
  the k-NN of every subnet by ``eval.latency.measure_interleaved``: ``latency_warmup`` untimed
  calls of every subnet (the first one compiles), then ``latency_runs`` rounds that time every
  subnet once each in a shuffled order, so a drift of the machine hits all subnets alike
  instead of inverting sizes. ``latency_ms`` is the median over the rounds and
  ``latency_ms_spread`` their interquartile range (q3 - q1), ``latency_rounds`` the rounds
  timed; ``latency_ms_per_image`` = latency_ms / latency_batch. Where a subnet at least as big
  in every spec field as another (as wide AND as deep) comes out faster by more than the larger
  of the two spreads, both are re-measured in further rounds (up to ``latency_max_runs``); an
  inversion that remains is warned about and listed in ``metadata["latency_inversions"]``.
  The extracted subnets of a round are held in memory together, in groups of at most
  ``latency_memory_mb`` of parameters (one group for small teachers; interleaving is then
  within each group). A measurement of this machine and backend, not a property of the model:
  compare rows of one sweep, not across machines; ``select(latency_ms=...)`` warns when the
  choice depends on differences within the spread;
* ``name``: the teacher's named size of that spec (e.g. "small"), if any.

**Quantized sweep (PTQ), ``bits=[...]``**: every subnet x every bit pair is a row, e.g.
``sweep(teacher, train, val, bits=["32", "8/8", "5/5", "4/4", "3/3", "2/4"])`` (SSQL's set,
``eval.ptq.SSQL_BITS``; "W/A" = weight / activation bits, 2..8, "32" = float). Per subnet the
EXTRACTED network (what is deployed) is calibrated once (``eval.ptq.calibrate``: min / max of
every activation quantizer over the first ``num_calibration_images`` TRAIN images, SSQL's
protocol; the ranges do not depend on the bit-width, so one calibration serves every pair) and
its quantized forward (one compiled program, the bits as run-time values) gives the bank and
query features of every pair. Extra columns: ``bits`` ("4/4"; "32" for float),
``weight_bits``, ``activation_bits``, ``bytes`` (the weights' size at that width) and
``bitops`` (per image; both by the rules of ``quantization/cost.py``). The "32" row is the
float sweep's row (the teacher's float forward, its latency); the other rows have no latency
(fake quantization measures accuracy, not speed), and with no "32" pair nothing is timed. The
"8/8" rows also report the REAL Keras int8 model (``quantization.quantize(extracted, "int8")``:
``int8_top1`` / ``int8_top5``, and ``int8_layers`` / ``float_layers``, the layers with a kernel
that Keras quantized and those it left in float (it has no int8 convolution), counted by
type). ``pareto(x="bytes")``, ``select(bytes=...)`` (``Selection.bits`` gives the pair) and the
plot (top-1 against size and BitOPs, a marker per bit pair) work on these rows.

Only the Backbone hooks are used (``subnets``, ``resolve_subnet``, ``named_subnets``,
``subnet_params``, ``subnet_flops``, ``feature_dim``, ``extract``, ``compiled_forward``), so every
family works. Spec fields become row columns through ``dataclasses.asdict``; a tuple field (a
ResNet's stage depths) is a list in the rows and JSON and "3-4-6-3" in CSV.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from poa_keras.backbones.base import Backbone
from poa_keras.elastic import spec as spec_module
from poa_keras.eval.features import (FROM_PRESET, INPUT_NORMALIZATIONS, extract_features,
                                     input_preprocessing, to_backbone_input)
from poa_keras.eval.knn import knn_classify
from poa_keras.eval.latency import inversions, measure_interleaved, spec_dominates
from poa_keras.eval.ptq import (DEFAULT_CALIBRATION_IMAGES, calibrate, check_float_model,
                                parse_bits_list, ptq_features)
from poa_keras.files import atomic_write_bytes
from poa_keras.quantization.cost import quant_cost
from poa_keras.quantization.fake import FLOAT_BITS
from poa_keras.quantization.observer import (activation_quantizers, format_bits_pair,
                                             parse_bits_pair)
from poa_keras.version import __version__
from poa_keras.validation import (check_choice, check_int, check_ks, check_labelled_images,
                                  check_positive_number)

#: Cost columns a row has (``pareto`` x-axes and ``select`` budgets); ``bytes`` and ``bitops``
#: in quantized sweeps only.
COST_COLUMNS = ("params", "flops", "latency_ms", "latency_ms_per_image", "bytes", "bitops")
#: The columns a quantized sweep adds (besides ``bytes`` / ``bitops``).
BITS_COLUMNS = ("bits", "weight_bits", "activation_bits")
INT8_COLUMNS = ("int8_top1", "int8_top5", "int8_layers", "float_layers")
FLOAT_PAIR = (FLOAT_BITS, FLOAT_BITS)
CSV_FILE, JSON_FILE, PLOT_FILE = "sweep.csv", "sweep.json", "sweep.png"


class Selection(NamedTuple):
    """What ``select`` returns: the chosen row and its spec (None when only rows were given)."""

    row: dict
    spec: object

    @property
    def bits(self):
        """(weight_bits, activation_bits) of the chosen row of a quantized sweep ((32, 32):
        float), None for a float-only sweep."""
        bits = self.row.get("bits")
        return None if bits is None else parse_bits_pair(str(bits))


# ----- the sweep -------------------------------------------------------------------------------

def sweep(teacher, train_data, val_data, subnets=None, ks=(20,), temperature=0.07,
          batch_size=64, measure_latency=True, latency_batch=32, latency_runs=10,
          latency_warmup=2, latency_max_runs=None, latency_memory_mb=2048, output_dir=None,
          progress=True, num_classes=None,
          pixel_normalization=FROM_PRESET, knn_batch_size=None, bits=None,
          num_calibration_images=DEFAULT_CALIBRATION_IMAGES, int8=True):
    """k-NN accuracy, parameters, FLOPs and latency of every subnet of an elastic teacher
    (and, with ``bits``, at every bit-width: the 2-D size x bits sweep).

    Args:
      teacher: an elastic backbone (``poa_keras.Backbone``), or a preset name or directory,
        loaded with ``Backbone.from_preset`` (its full network: the teacher).
      train_data: ``(images, labels)``: the k-NN bank. Images (N, H, W, C) numpy, uint8 0..255
        (through the teacher's preprocessing, the record of its preset: resized to its input
        size if needed, normalised as in training; see ``pixel_normalization``) or float
        (already preprocessed); labels (N,) integers.
      val_data: ``(images, labels)`` of the queries, the same image size as ``train_data``.
      subnets: None (the whole grid, ``teacher.subnets()``, smallest first) or a list of specs,
        tuples (e.g. ``(384, 12)``) or named sizes (``"small"``), evaluated in that order
        (duplicates once). A single spec or name is taken as a list of one.
      ks: the k of the k-NN, one int or several; the first is the headline ``top1`` / ``top5``.
      temperature: vote temperature T of exp(sim / T).
      batch_size: images per forward pass of the feature extraction; capped at the size of the
        smaller split, so that both splits run one batch shape (one compiled program per subnet).
      measure_latency: time the extracted subnets (False: ``latency_ms`` is None, no extraction).
      latency_batch: images of the timed batch (the first ``latency_batch`` validation images,
        repeated if there are fewer).
      latency_runs: timed interleaved rounds (every subnet once per round; the median and the
        interquartile range over the rounds are reported).
      latency_warmup: untimed calls of every subnet first (compilation, allocator warm-up),
        >= 1.
      latency_max_runs: the most rounds a subnet gets when re-measuring an inverted pair
        (default 3 x latency_runs).
      latency_memory_mb: parameter megabytes (float32) of extracted subnets held at once while
        timing: the subnets are timed together in groups of at most this size.
      output_dir: if given, ``sweep.csv`` and ``sweep.json`` are written there after every
        subnet (a long sweep that stops keeps what it measured) and ``sweep.png`` at the end.
      progress: a progress bar, one step per subnet, showing the last top-1 / top-5.
      num_classes: default 1 + the largest label of either split.
      pixel_normalization: for uint8 images, as ``extract_features`` ("preset": the
        teacher's ``preprocessing``). FLOPs are counted at the preprocessed size.
      knn_batch_size: ``knn_classify``'s batch_size (similarity rows in memory at a time).
      bits: None (float only, one row per subnet) or bit pairs, one row per subnet and pair:
        a list of "W/A" strings or (w, a) pairs, or one comma-separated string, e.g.
        ``["32", "8/8", "5/5", "4/4", "3/3", "2/4"]`` (weights and activations 2..8; "32":
        float). See the module docstring.
      num_calibration_images: with ``bits``: the first this many TRAIN images calibrate every
        extracted subnet (SSQL: 100); train_data must hold at least as many.
      int8: with an "8/8" pair: also evaluate the real Keras int8 model of every subnet.

    Returns:
      a ``SweepResult``: ``.rows`` (one JSON-friendly dict per subnet, or per subnet and bit
      pair), ``.specs`` (the spec of every row), ``.metadata``; ``to_csv``, ``to_json``,
      ``pareto``, ``select``, ``plot``.
    """
    # Every argument is checked before the first forward pass (the cheap ones before a preset
    # is loaded).
    if not _is_teacher_like(teacher):
        _load_teacher(teacher)   # raises the TypeError
    train_x, train_y = check_labelled_images(train_data, "train_data")
    val_x, val_y = check_labelled_images(val_data, "val_data")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ValueError(f"train_data and val_data images must have the same (height, width, "
                         f"channels), got {train_x.shape[1:]} and {val_x.shape[1:]}")
    pairs = None if bits is None else parse_bits_list(bits)
    if pairs is not None:
        num_calibration_images = check_int(num_calibration_images, "num_calibration_images",
                                           minimum=1)
        if num_calibration_images > train_x.shape[0]:
            raise ValueError(f"num_calibration_images={num_calibration_images} but train_data "
                             f"holds {train_x.shape[0]} images (calibration uses the first "
                             f"num_calibration_images train images)")
    ks = check_ks(ks)
    temperature = check_positive_number(temperature, "temperature")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    check_choice(pixel_normalization, "pixel_normalization", INPUT_NORMALIZATIONS)
    if measure_latency:
        latency_batch = check_int(latency_batch, "latency_batch", minimum=1)
        latency_runs = check_int(latency_runs, "latency_runs", minimum=1)
        latency_warmup = check_int(latency_warmup, "latency_warmup", minimum=1)
        latency_max_runs = check_int(3 * latency_runs if latency_max_runs is None
                                     else latency_max_runs, "latency_max_runs",
                                     minimum=latency_runs)
        latency_memory_mb = check_positive_number(latency_memory_mb, "latency_memory_mb")
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    for name, y in (("train_data", train_y), ("val_data", val_y)):
        if y.min() < 0 or y.max() >= num_classes:
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise ValueError(f"{name} labels must lie in [0, num_classes={num_classes}), got "
                             f"label {bad}")
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    teacher = _load_teacher(teacher)
    if pairs is not None:
        check_float_model(teacher, "a quantized sweep")
        if not activation_quantizers(teacher):
            raise ValueError(f"{teacher.name} ({type(teacher).__name__}) has no activation "
                             "quantizers: it cannot be swept at bit-widths (bits=None)")
    specs = _resolve_subnets(teacher, subnets)
    with_float = pairs is None or FLOAT_PAIR in pairs
    measure_latency = bool(measure_latency) and with_float   # latency is a float row's
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

    # uint8 images go through the teacher's preprocessing (resized to its input size if
    # needed); float ones are taken as preprocessed, at their own size.
    preprocessing = (input_preprocessing(teacher, pixel_normalization)
                     if train_x.dtype == np.uint8 else None)
    image_size = tuple(int(s) for s in train_x.shape[1:3])
    if preprocessing is not None:
        image_size = tuple(int(s) for s in preprocessing.output_size(*image_size))
    step = min(batch_size, train_x.shape[0], val_x.shape[0])
    names = _names_by_spec(teacher)
    latency_input = (_latency_batch(val_x, latency_batch, preprocessing or pixel_normalization,
                                    getattr(teacher, "in_channels", 3))
                     if measure_latency else None)
    metadata = _metadata(teacher, specs, ks, temperature, num_classes, train_x, val_x,
                         image_size, step, pixel_normalization, measure_latency,
                         latency_batch if measure_latency else None,
                         latency_runs if measure_latency else None,
                         latency_warmup if measure_latency else None)
    metadata["preprocessing"] = None if preprocessing is None else preprocessing.get_config()
    if pairs is not None:
        metadata.update(_bits_metadata(pairs, num_calibration_images, int8))
    result = SweepResult([], specs=[], metadata=metadata)

    bar = None
    if progress:
        import keras
        bar = keras.utils.Progbar(len(specs), unit_name="subnet",
                                  stateful_metrics=["top1", "top5"])
    features = dict(subnet=None, batch_size=step, normalize=True,
                    pixel_normalization=pixel_normalization)
    for i, spec in enumerate(specs):
        features["subnet"] = spec
        knn = None
        if with_float:
            bank = extract_features(teacher, train_x, **features)
            queries = extract_features(teacher, val_x, **features)
            knn = knn_classify(bank, train_y, queries, val_y, num_classes, ks=ks,
                               temperature=temperature, batch_size=knn_batch_size)
            del bank, queries
        row = _spec_columns(spec)
        row.update(
            name=names.get(spec),
            params=int(teacher.subnet_params(spec)),
            flops=int(teacher.subnet_flops(spec, image_size=image_size)),
            feature_dim=int(teacher.feature_dim(spec)),
            latency_ms=None,
            latency_ms_spread=None,
            latency_ms_per_image=None,
            latency_rounds=None,
        )
        if pairs is None:
            rows = [_with_knn(row, knn, ks)]
        else:
            rows = _quantized_rows(teacher, spec, row, knn, pairs, train_x, train_y, val_x,
                                   val_y, num_classes, ks, temperature, knn_batch_size, step,
                                   pixel_normalization, num_calibration_images, image_size,
                                   int8)
        result.rows.extend(rows)
        result.specs.extend([spec] * len(rows))
        if output_dir is not None:
            result.to_csv(output_dir / CSV_FILE)
            result.to_json(output_dir / JSON_FILE)
        if bar is not None:
            last = rows[-1]
            bar.update(i + 1, values=[("top1", last["top1"]), ("top5", last["top5"])])
    if measure_latency:
        _sweep_latency(teacher, result, latency_input, latency_batch, latency_runs,
                       latency_warmup, latency_max_runs, latency_memory_mb, progress)
        if output_dir is not None:
            result.to_csv(output_dir / CSV_FILE)
            result.to_json(output_dir / JSON_FILE)
    if output_dir is not None:
        result.plot(output_dir / PLOT_FILE)
    return result


def _with_knn(row, knn, ks):
    """``row`` with the k-NN columns of ``knn`` (``knn_classify``'s result) added."""
    row = dict(row, top1=knn[ks[0]]["top1"], top5=knn[ks[0]]["top5"])
    for k in ks:
        row[f"top1_k{k}"] = knn[k]["top1"]
        row[f"top5_k{k}"] = knn[k]["top5"]
    return row


def _bits_metadata(pairs, num_calibration_images, int8):
    return {
        "bits": [format_bits_pair(*p) for p in pairs],
        "num_calibration_images": int(num_calibration_images),
        "calibration": "min/max of every activation quantizer over the first "
                       f"{int(num_calibration_images)} train images, float forward of the "
                       "extracted subnet; one calibration per subnet for every bit pair",
        "weight_quantization": "symmetric, per output channel",
        "activation_quantization": "asymmetric, per tensor, calibrated ranges",
        "bytes_rule": "quantized kernels at their weight bits / 8 (fixed-8 layers at 8), every "
                      "other parameter 4 bytes; calibrated ranges and weight scales not counted",
        "bitops_rule": "sum over quantized conv / linear layers of MACs x weight bits x input "
                       "activation bits, per image (float: x 32 x 32)",
        "int8": bool(int8) and (8, 8) in pairs,
    }


def _quantized_rows(teacher, spec, base, knn_float, pairs, train_x, train_y, val_x, val_y,
                    num_classes, ks, temperature, knn_batch_size, step, pixel_normalization,
                    num_calibration_images, image_size, int8):
    """The rows of one subnet, one per bit pair: its extracted network calibrated once, then
    the PTQ features of every pair through one compiled program."""
    model = teacher.extract(spec)
    calibrate(model, train_x, num_images=num_calibration_images,
              batch_size=min(step, num_calibration_images),
              pixel_normalization=pixel_normalization)
    cost = quant_cost(model, image_size=image_size)
    features = dict(batch_size=step, normalize=True, pixel_normalization=pixel_normalization,
                    image_size=image_size)
    rows = []
    for w, a in pairs:
        if (w, a) == FLOAT_PAIR:
            knn = knn_float   # the float sweep's own numbers (the teacher's float forward)
        else:
            bank = ptq_features(model, train_x, (w, a), **features)
            queries = ptq_features(model, val_x, (w, a), **features)
            knn = knn_classify(bank, train_y, queries, val_y, num_classes, ks=ks,
                               temperature=temperature, batch_size=knn_batch_size)
            del bank, queries
        row = _spec_columns(spec)
        row.update(name=base["name"], bits=format_bits_pair(w, a), weight_bits=int(w),
                   activation_bits=int(a), params=base["params"], bytes=cost.bytes(w, a),
                   bitops=cost.bitops(w, a))
        row.update({k: v for k, v in base.items() if k not in row})
        row = _with_knn(row, knn, ks)
        row.update(dict.fromkeys(INT8_COLUMNS))
        rows.append(row)
    if int8 and (8, 8) in pairs:
        int8_columns = _keras_int8(model, train_x, train_y, val_x, val_y, num_classes, ks,
                                   temperature, knn_batch_size, step, pixel_normalization)
        rows[pairs.index((8, 8))].update(int8_columns)
    return rows


def _keras_int8(model, train_x, train_y, val_x, val_y, num_classes, ks, temperature,
                knn_batch_size, step, pixel_normalization):
    """The real Keras int8 model of an extracted subnet (quantized in place): its k-NN
    top-1 / top-5 and which layers with a kernel Keras quantized or left float, by type."""
    from poa_keras.quantization import quantize

    quantize(model, "int8")
    features = dict(batch_size=step, normalize=True, pixel_normalization=pixel_normalization)
    bank = extract_features(model, train_x, **features)
    queries = extract_features(model, val_x, **features)
    knn = knn_classify(bank, train_y, queries, val_y, num_classes, ks=ks[:1],
                       temperature=temperature, batch_size=knn_batch_size)
    quantized, left = {}, {}
    for layer in model._flatten_layers(include_self=False):
        if any(True for _ in layer._flatten_layers(include_self=False)):
            continue   # a container: its leaves are counted
        kind = type(layer).__name__
        if getattr(layer, "quantization_mode", None) is not None:
            quantized[kind] = quantized.get(kind, 0) + 1
        elif any(v.name == "kernel" for v in layer.weights):
            left[kind] = left.get(kind, 0) + 1
    return {"int8_top1": knn[ks[0]]["top1"], "int8_top5": knn[ks[0]]["top5"],
            "int8_layers": _count_text(quantized), "float_layers": _count_text(left)}


def _count_text(counts):
    """{"Dense": 16, "Conv2D": 1} -> "Conv2D:1 Dense:16" ("" when empty)."""
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _is_teacher_like(teacher):
    return isinstance(teacher, (Backbone, str, os.PathLike))


def _load_teacher(teacher):
    if isinstance(teacher, Backbone):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        return Backbone.from_preset(teacher)
    raise TypeError(f"teacher must be an elastic backbone (poa_keras.Backbone) or a preset name "
                    f"or directory, got {type(teacher).__name__}")


def _resolve_subnets(teacher, subnets):
    if subnets is None:
        specs = list(teacher.subnets())
    else:
        if isinstance(subnets, (str, teacher.subnet_class)):
            subnets = [subnets]
        elif isinstance(subnets, tuple) and any(isinstance(s, numbers.Integral) for s in subnets):
            # (384, 12) or (64, (3, 4, 6, 3)): one spec written as a tuple, not a list of specs.
            raise TypeError(f"subnets must be a list of specs, tuples or size names; "
                            f"{subnets!r} looks like ONE spec: pass [{subnets!r}]")
        try:
            subnets = list(subnets)
        except TypeError:
            raise TypeError(f"subnets must be None or a list of specs, tuples or size names, "
                            f"got {subnets!r}") from None
        if not subnets:
            raise ValueError("subnets is empty: give None (the whole grid) or at least one spec")
        specs = [teacher.resolve_subnet(s) for s in subnets]
    if not specs:
        raise ValueError(f"{teacher.name} has an empty subnet grid")
    return list(dict.fromkeys(specs))   # first occurrence, order kept


def _names_by_spec(teacher):
    names = {}
    for name, spec in teacher.named_subnets.items():
        spec = teacher.resolve_subnet(spec)
        names[spec] = name if spec not in names else f"{names[spec]}/{name}"
    return names


def _spec_columns(spec):
    """Spec fields -> JSON-friendly columns (tuples become lists of ints)."""
    return {k: _json_value(v) for k, v in dataclasses.asdict(spec).items()}


def _json_value(v):
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _latency_batch(images, size, pixel_normalization, in_channels):
    """The fixed timed batch: the first `size` images (repeated if fewer), as fed to the net."""
    return to_backbone_input(images[np.arange(size) % images.shape[0]], in_channels,
                             pixel_normalization)


def _sweep_latency(teacher, result, batch, latency_batch, runs, warmup, max_runs, memory_mb,
                   progress):
    """Fills the latency columns of ``result``'s rows: the extracted subnets' compiled
    forwards timed in interleaved rounds (``eval.latency``), group by group."""
    import warnings

    from keras import ops

    x = ops.convert_to_tensor(batch)
    specs = list(dict.fromkeys(result.specs))   # a quantized sweep has a row per bit pair
    groups, current, size = [], [], 0.0
    for spec in specs:   # float32 parameter megabytes, packed in order
        mb = 4.0 * teacher.subnet_params(spec) / 2 ** 20
        if current and size + mb > memory_mb:
            groups.append(current)
            current, size = [], 0.0
        current.append(spec)
        size += mb
    groups.append(current)
    bar = None
    if progress:
        import keras
        bar = keras.utils.Progbar((warmup + runs) * len(specs), unit_name="call")
        print("timing the extracted subnets (interleaved rounds)")
    stats, remaining = {}, []
    for group in groups:
        models = {spec: teacher.extract(spec) for spec in group}
        calls = {spec: _synchronised_call(model.compiled_forward(), x)
                 for spec, model in models.items()}
        group_stats, group_left = measure_interleaved(
            calls, rounds=runs, warmup=warmup, dominates=spec_dominates, max_rounds=max_runs,
            progress=None if bar is None else (lambda: bar.add(1)))
        stats.update(group_stats)
        remaining += group_left
        del calls, models
    # across groups (large teachers) an inversion is reported, not re-measured
    remaining = list(dict.fromkeys(remaining + inversions(stats, spec_dominates)))
    for row, spec in zip(result.rows, result.specs):
        if row.get("bits") not in (None, str(FLOAT_BITS)):
            continue   # latency is the float network's (fake quantization is not faster)
        st = stats[spec]
        row.update(latency_ms=1000.0 * st.median, latency_ms_spread=1000.0 * st.spread,
                   latency_ms_per_image=1000.0 * st.median / latency_batch,
                   latency_rounds=st.rounds)
    result.metadata.update(
        latency_statistic="median over interleaved rounds; spread = interquartile range",
        latency_groups=len(groups), latency_max_runs=max_runs,
        latency_inversions=[[str(a), str(b)] for a, b in remaining])
    if remaining:
        warnings.warn(
            "latency: after re-measuring, these subnets are still timed faster than a subnet "
            "they contain, by more than the spread (a real effect of the hardware, or a busy "
            "machine: rerun on a quiet one before selecting by latency): " + "; ".join(
                f"{a} {1000 * stats[a].median:.3g} ms < {b} {1000 * stats[b].median:.3g} ms"
                for a, b in remaining), stacklevel=3)


def _synchronised_call(forward, x):
    from keras import ops

    def call():
        # Copying the (B, D) output to the host waits for the device: asynchronous backends
        # (JAX dispatch, CUDA streams) are timed to completion, at the cost of a tiny transfer.
        ops.convert_to_numpy(forward(x)["cls"])

    return call


def _metadata(teacher, specs, ks, temperature, num_classes, train_x, val_x, image_size, step,
              pixel_normalization, measure_latency, latency_batch, latency_runs,
              latency_warmup):
    import keras

    spec_class = type(specs[0])
    return {
        "teacher": teacher.name,
        "family": type(teacher).__name__,
        "spec_class": spec_class.__name__,
        "spec_fields": [f.name for f in dataclasses.fields(spec_class)],
        "ks": list(ks),
        "k": ks[0],
        "temperature": temperature,
        "num_classes": num_classes,
        "num_train": int(train_x.shape[0]),
        "num_val": int(val_x.shape[0]),
        "image_size": list(image_size),
        "feature_batch_size": int(step),
        "pixel_normalization": pixel_normalization,
        "measure_latency": bool(measure_latency),
        "latency_batch": latency_batch,
        "latency_runs": latency_runs,
        "latency_warmup": latency_warmup,
        "backend": keras.backend.backend(),
        "poa_keras_version": __version__,
        "keras_version": keras.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


# ----- the result ------------------------------------------------------------------------------

class SweepResult:
    """The rows of a sweep (one dict per subnet, in evaluation order), their specs and metadata.

    Attributes:
      rows: list of dicts with the spec fields, ``name``, ``params``, ``flops``,
        ``feature_dim``, ``latency_ms``, ``latency_ms_per_image``, ``top1``, ``top5`` (at the
        first k) and ``top1_k{k}`` / ``top5_k{k}`` for every k; accuracies are fractions. A
        quantized sweep has one row per subnet and bit pair, with ``bits``, ``weight_bits``,
        ``activation_bits``, ``bytes``, ``bitops`` and the ``int8_*`` columns too.
      specs: the spec of every row (rebuilt from the spec fields when loaded from a file whose
        spec class is known), or None.
      metadata: how the sweep was run (teacher, ks, temperature, image size, latency batch...).
    """

    def __init__(self, rows, specs=None, metadata=None):
        self.rows = list(rows)
        self.specs = None if specs is None else list(specs)
        self.metadata = dict(metadata or {})
        if self.specs is not None and len(self.specs) != len(self.rows):
            raise ValueError(f"{len(self.specs)} specs for {len(self.rows)} rows")

    def __len__(self):
        return len(self.rows)

    def __repr__(self):
        teacher = self.metadata.get('teacher', 'a teacher')
        if self.metadata.get("bits"):
            subnets = len(self.rows) // max(1, len(self.metadata["bits"]))
            return (f"SweepResult({len(self.rows)} rows: {subnets} subnets x "
                    f"{len(self.metadata['bits'])} bit pairs of {teacher})")
        return f"SweepResult({len(self.rows)} subnets of {teacher})"

    @property
    def spec_fields(self):
        fields = self.metadata.get("spec_fields")
        if fields:
            return list(fields)
        return _guess_spec_fields(self.rows)

    # -- files ----------------------------------------------------------------------------------
    def to_csv(self, path):
        """Writes the rows as CSV (atomically); tuple spec fields as "3-4-6-3", None as ""."""
        columns = _columns(self.rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
        return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))

    def to_json(self, path):
        """Writes {"metadata": ..., "rows": [...]} as JSON (atomically)."""
        text = json.dumps({"metadata": self.metadata, "rows": self.rows}, indent=2)
        return atomic_write_bytes(path, text.encode("utf-8"))

    @classmethod
    def from_json(cls, path):
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path} is not a sweep JSON file (no 'rows')")
        metadata = data.get("metadata") or {}
        return cls(data["rows"], specs=_rebuild_specs(data["rows"], metadata), metadata=metadata)

    @classmethod
    def from_csv(cls, path):
        """Reads a ``to_csv`` file: integers, floats, "" -> None, "3-4-6-3" -> [3, 4, 6, 3]."""
        with open(path, newline="") as f:
            # A name (and a bit pair: "32" is float, not a number) stays text even where it
            # looks like a number.
            rows = [{k: (v or None) if k in _TEXT_COLUMNS else _parse_cell(v)
                     for k, v in r.items()} for r in csv.DictReader(f)]
        return cls(rows, specs=None, metadata={})

    # -- analysis -------------------------------------------------------------------------------
    def pareto(self, x="params", y="top1"):
        """See the module-level ``pareto``."""
        return pareto(self.rows, x=x, y=y)

    def select(self, params=None, flops=None, latency_ms=None, latency_ms_per_image=None,
               metric="top1", bytes=None, bitops=None, budget_bytes=None):
        """See the module-level ``select``; returns ``Selection(row, spec)``."""
        return select(self, params=params, flops=flops, latency_ms=latency_ms,
                      latency_ms_per_image=latency_ms_per_image, metric=metric, bytes=bytes,
                      bitops=bitops, budget_bytes=budget_bytes)

    def plot(self, path, y="top1", panels=None):
        """See the module-level ``plot``."""
        return plot(self, path, y=y, panels=panels)

    def format_table(self, **kwargs):
        return format_table(self.rows, spec_fields=self.spec_fields, **kwargs)


def _columns(rows):
    columns = []
    for row in rows:
        for c in row:
            if c not in columns:
                columns.append(c)
    return columns


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "-".join(str(int(x)) for x in v)
    if isinstance(v, float):
        return repr(v)   # shortest text that reads back to the same float
    return v


_TEXT_COLUMNS = ("name", "bits", "int8_layers", "float_layers")
_INT = re.compile(r"^-?\d+$")
_INT_LIST = re.compile(r"^\d+(-\d+)+$")


def _parse_cell(text):
    if text is None or text == "":
        return None
    if _INT.match(text):
        return int(text)
    if _INT_LIST.match(text):
        return [int(t) for t in text.split("-")]
    try:
        return float(text)
    except ValueError:
        return text


def _guess_spec_fields(rows):
    known = set(COST_COLUMNS) | {"name", "feature_dim", "top1", "top5", "latency_ms_spread",
                                 "latency_rounds"} | set(BITS_COLUMNS) | set(INT8_COLUMNS)
    if not rows:
        return []
    return [c for c in rows[0] if c not in known and not re.match(r"^top[15]_k\d+$", c)]


def _rebuild_specs(rows, metadata):
    klass = getattr(spec_module, str(metadata.get("spec_class")), None)
    if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
        return None
    fields = [f.name for f in dataclasses.fields(klass)]
    try:
        return [klass(**{f: tuple(r[f]) if isinstance(r[f], list) else r[f] for f in fields})
                for r in rows]
    except (KeyError, TypeError, ValueError):
        return None


# ----- Pareto front and budget selection -------------------------------------------------------

def _rows_of(result_or_rows):
    if isinstance(result_or_rows, SweepResult):
        return result_or_rows.rows, result_or_rows.specs
    if isinstance(result_or_rows, dict) or isinstance(result_or_rows, (str, bytes)):
        raise TypeError("expected a SweepResult or a list of row dicts, got "
                        f"{type(result_or_rows).__name__}")
    rows = list(result_or_rows)
    if not all(isinstance(r, dict) for r in rows):
        raise TypeError("expected a SweepResult or a list of row dicts")
    return rows, None


def _check_column(rows, column, what, allowed=None):
    if allowed is not None and column not in allowed:
        raise ValueError(f"{what}={column!r} is not one of {list(allowed)}")
    if rows and not any(column in r for r in rows):
        numeric = sorted({c for r in rows for c, v in r.items()
                          if isinstance(v, numbers.Real) and not isinstance(v, bool)})
        raise ValueError(f"{what}={column!r} is not a column of the sweep; numeric columns: "
                         f"{numeric}")
    if rows and all(r.get(column) is None for r in rows):
        hint = (" (the sweep ran with measure_latency=False)" if column.startswith("latency")
                else "")
        raise ValueError(f"{what}={column!r}: no row has a value{hint}")


def pareto(rows, x="params", y="top1"):
    """The rows on the upper-left Pareto front of cost `x` against accuracy `y`.

    A row is on the front when no other row has cost <= its cost and accuracy >= its accuracy
    with at least one of the two strict. Rows missing either value are ignored. Returns the
    front sorted by cost (then accuracy); two rows with the same cost and accuracy are both on
    it.
    """
    rows, _ = _rows_of(rows)
    _check_column(rows, x, "x", COST_COLUMNS)
    _check_column(rows, y, "y")
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = [r for r in points if not any(
        o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in points)]
    return sorted(front, key=lambda r: (r[x], r[y]))


def select(result_or_rows, params=None, flops=None, latency_ms=None, latency_ms_per_image=None,
           metric="top1", bytes=None, bitops=None, budget_bytes=None):
    """The most accurate subnet (and, in a quantized sweep, bit pair) within every given
    budget.

    Args:
      result_or_rows: a ``SweepResult`` or a list of row dicts.
      params, flops, latency_ms, latency_ms_per_image: budgets (cost <= budget); give at least
        one. ``flops`` is per image at the sweep's image size, ``latency_ms`` per timed batch.
      bytes, bitops: budgets on a quantized sweep's model size (bytes of the weights at the
        row's bit-width) and BitOPs per image; ``budget_bytes`` is another name for ``bytes``.
      metric: the accuracy column to maximise ("top1", "top5", "top1_k20", ...).

    Returns:
      ``Selection(row, spec)``; ``spec`` is None when only rows were given; ``.bits`` is the
      row's (weight_bits, activation_bits) in a quantized sweep. Ties in `metric` go to the
      fewer parameters, then the fewer FLOPs, then the fewer bytes, then the earlier row.

    Raises:
      ValueError: no budget given; a budget that is not a positive number; a latency budget on
        a sweep without latency; or no subnet within the budgets (the message names every
        budget and the cheapest cost available for each).
    """
    rows, specs = _rows_of(result_or_rows)
    if not rows:
        raise ValueError("the sweep has no rows to select from")
    if budget_bytes is not None:
        if bytes is not None and bytes != budget_bytes:
            raise ValueError(f"bytes={bytes!r} and budget_bytes={budget_bytes!r} are the same "
                             "budget: give one")
        bytes = budget_bytes
    budgets = {k: v for k, v in (("params", params), ("flops", flops), ("latency_ms", latency_ms),
                                 ("latency_ms_per_image", latency_ms_per_image),
                                 ("bytes", bytes), ("bitops", bitops))
               if v is not None}
    if not budgets:
        raise ValueError("give at least one budget: params=, flops=, latency_ms=, "
                         "latency_ms_per_image=, bytes= or bitops=")
    for key, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget {key}={value!r} must be a finite number > 0")
        _check_column(rows, key, "budget")
    _check_column(rows, metric, "metric")
    fits = [i for i, r in enumerate(rows)
            if r.get(metric) is not None
            and all(r.get(k) is not None and r[k] <= b for k, b in budgets.items())]
    if not fits:
        wanted = " and ".join(f"{k} <= {_fmt_cost(k, b)}" for k, b in budgets.items())
        cheapest = []
        for key in budgets:
            costs = [(r[key], r) for r in rows if r.get(key) is not None]
            cost, row = min(costs, key=lambda c: c[0])
            cheapest.append(f"{key} {_fmt_cost(key, cost)} ({_row_label(row)})")
        raise ValueError(f"no subnet fits the budget {wanted}; the cheapest available: "
                         + "; ".join(cheapest))
    best = max(fits, key=lambda i: (rows[i][metric], -(rows[i].get("params") or 0),
                                    -(rows[i].get("flops") or 0), -(rows[i].get("bytes") or 0),
                                    -i))
    _warn_latency_noise(rows, best, budgets, metric)
    return Selection(rows[best], None if specs is None else specs[best])


def _latency_spread(row, key):
    """The measured spread (interquartile range) of a latency column of a row, 0 if unknown."""
    spread = row.get("latency_ms_spread")
    if spread is None or not row.get("latency_ms"):
        return 0.0
    return float(spread) * (1.0 if key == "latency_ms" else row[key] / row["latency_ms"])


def _warn_latency_noise(rows, best, budgets, metric):
    """Warns when a latency budget decides the selection by less than the measured spread:
    the chosen subnet may exceed it, or a more accurate one excluded by it may fit."""
    import warnings

    notes = []
    for key in ("latency_ms", "latency_ms_per_image"):
        if key not in budgets:
            continue
        budget, chosen = budgets[key], rows[best]
        if chosen[key] + _latency_spread(chosen, key) > budget:
            notes.append(f"the chosen {_row_label(chosen)} takes {_fmt_cost(key, chosen[key])}"
                         f" +- {_fmt_cost(key, _latency_spread(chosen, key))}, within the "
                         f"spread of the budget {_fmt_cost(key, budget)}")
        others = {k: b for k, b in budgets.items() if k != key}
        for r in rows:
            if (r.get(metric) is not None and r[metric] > chosen[metric]
                    and r.get(key) is not None and r[key] > budget
                    and r[key] - _latency_spread(r, key) <= budget
                    and all(r.get(k) is not None and r[k] <= b for k, b in others.items())):
                notes.append(f"the more accurate {_row_label(r)} ({metric} {r[metric]:.4g}) "
                             f"takes {_fmt_cost(key, r[key])} +- "
                             f"{_fmt_cost(key, _latency_spread(r, key))}, over the budget by "
                             "less than its spread")
    if notes:
        warnings.warn("select: the latency budget decides this choice by less than the "
                      "measured spread (remeasure with more latency_runs on a quiet machine): "
                      + "; ".join(notes), stacklevel=3)


def _fmt_cost(key, value):
    """25,000,000 / 0.5 / 12.5 ms: integers with thousands separators, latencies in ms."""
    if float(value).is_integer() and abs(value) < 1e18:
        text = f"{int(value):,}"
    else:
        text = f"{value:,.6g}"
    return text + (" ms" if key.startswith("latency") else "")


def _row_label(row, spec_fields=None):
    fields = spec_fields or _guess_spec_fields([row])
    parts = [f"{f}={_csv_cell(row.get(f))}" for f in fields]
    if row.get("name"):
        parts.append(repr(str(row["name"])))
    if row.get("bits") is not None:
        parts.append(f"bits={row['bits']}")
    return " ".join(parts)


# ----- table and plot --------------------------------------------------------------------------

def _sig(v, digits=4):
    """`digits` significant digits without an exponent: 304.4, 33.71, 0.03371."""
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{decimals}f}"


def format_table(rows, spec_fields=None, pareto_x=None):
    """A readable aligned text table of sweep rows (a ``SweepResult`` or a list of dicts).

    Columns: the spec fields, name, params (M), GFLOPs, latency ms (when measured: the median
    ± the interquartile range of the interleaved rounds), top-1 % and
    top-5 % (the sweep's first k); with ``pareto_x`` ("params", "flops", ...) a "front" column
    marks the Pareto-optimal rows with "*". A quantized sweep adds bits, size (MB: bytes /
    1e6), GBitOPs and, where measured, the Keras int8 model's top-1.
    """
    if isinstance(rows, SweepResult):
        spec_fields = spec_fields or rows.spec_fields
        rows = rows.rows
    rows, _ = _rows_of(rows)
    spec_fields = list(spec_fields or _guess_spec_fields(rows))
    on_front = set()
    if pareto_x is not None:
        on_front = {id(r) for r in pareto(rows, x=pareto_x)}
    with_latency = any(r.get("latency_ms") is not None for r in rows)
    with_bits = any(r.get("bits") is not None for r in rows)
    with_int8 = any(r.get("int8_top1") is not None for r in rows)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def scaled(r, key, scale):
        return "-" if r.get(key) is None else _sig(r[key] * scale)

    header = spec_fields + ["name"] + (["bits"] if with_bits else []) + ["params (M)"]
    if with_bits:
        header += ["size (MB)", "GBitOPs"]
    header.append("GFLOPs")
    if with_latency:
        header.append("latency ms")
    header += ["top-1 %", "top-5 %"]
    if with_int8:
        header.append("int8 top-1 %")
    if pareto_x is not None:
        header.append("front")
    table = [header]
    for r in rows:
        line = [_csv_cell(r.get(f)) for f in spec_fields]
        line = ["-" if c == "" else str(c) for c in line]
        line.append(r.get("name") or "")
        if with_bits:
            line.append("-" if r.get("bits") is None else str(r["bits"]))
        line.append(scaled(r, "params", 1e-6))
        if with_bits:
            line += [scaled(r, "bytes", 1e-6), scaled(r, "bitops", 1e-9)]
        line.append(scaled(r, "flops", 1e-9))
        if with_latency:
            line.append("-" if r.get("latency_ms") is None else _sig(r["latency_ms"], 3) + (
                "" if r.get("latency_ms_spread") is None
                else " ± " + _sig(r["latency_ms_spread"], 2)))
        line += [pct(r.get("top1")), pct(r.get("top5"))]
        if with_int8:
            line.append(pct(r.get("int8_top1")) if r.get("int8_top1") is not None else "")
        if pareto_x is not None:
            line.append("*" if id(r) in on_front else "")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    left = set(range(len(spec_fields))) | {len(spec_fields)}   # spec and name: text, left
    if with_bits:
        left.add(len(spec_fields) + 1)
    out = []
    for n, line in enumerate(table):
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_table(result, **kwargs):
    """Prints ``format_table(result)``."""
    print(format_table(result, **kwargs))


_AXIS_LABELS = {"params": ("parameters (M)", 1e-6), "flops": ("GFLOPs per image", 1e-9),
                "latency_ms": ("latency (ms per batch)", 1.0),
                "latency_ms_per_image": ("latency (ms per image)", 1.0),
                "bytes": ("model size (MB of weights)", 1e-6),
                "bitops": ("GBitOPs per image", 1e-9)}
_PAIR_MARKERS = "o^sDvP*Xph"
_PAIR_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9", "C7")   # C3: the front


def plot(result, path, y="top1", panels=None):
    """Accuracy against cost, one panel per cost (default parameters and FLOPs; a quantized
    sweep: size in bytes and BitOPs): every subnet a point (coloured by its first spec field),
    the Pareto front a line, the named sizes marked and labelled. In a quantized sweep every
    bit pair has its own colour and marker, a thin grey line joins the pairs of one subnet
    (how it degrades as the bits shrink) and the Pareto front over all (subnet, pair) rows is
    the red line. Written as PNG, atomically (matplotlib's Agg canvas; pyplot is not used, so
    no global backend is switched). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, _ = _rows_of(result)
    if not rows:
        raise ValueError("the sweep has no rows to plot")
    quantized = any(r.get("bits") is not None for r in rows)
    if panels is None:
        panels = ("bytes", "bitops") if quantized else ("params", "flops")
    panels = [panels] if isinstance(panels, str) else list(panels)
    if not panels:
        raise ValueError("panels must name at least one cost column")
    for x in panels:
        _check_column(rows, x, "panel", COST_COLUMNS)
    _check_column(rows, y, "y")
    meta = result.metadata if isinstance(result, SweepResult) else {}
    fields = result.spec_fields if isinstance(result, SweepResult) else _guess_spec_fields(rows)
    colour_field = next((f for f in fields if all(
        isinstance(r.get(f), numbers.Real) for r in rows)), None)

    fig = Figure(figsize=(5.5 * len(panels), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    y_name = y.replace("top1", "top-1").replace("top5", "top-5").replace("_k", ", k=")
    k = meta.get("k")
    for ax, x in zip(axes, panels):
        label, scale = _AXIS_LABELS[x]
        pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
        xs = np.array([r[x] * scale for r in pts], float)
        ys = np.array([100.0 * r[y] for r in pts], float)
        if quantized:
            _plot_bit_pairs(ax, pts, x, y, scale, fields)
        elif colour_field is not None:
            values = [r[colour_field] for r in pts]
            sc = ax.scatter(xs, ys, c=values, cmap="viridis", s=28, zorder=2, label="subnets")
            levels = sorted(set(values))
            fig.colorbar(sc, ax=ax, label=colour_field, pad=0.01,
                         ticks=levels if len(levels) <= 16 else None)
        else:
            ax.scatter(xs, ys, s=28, zorder=2, label="subnets")
        front = pareto(pts, x=x, y=y)
        ax.plot([r[x] * scale for r in front], [100.0 * r[y] for r in front], "-", color="C3",
                lw=1.5, zorder=3, label="Pareto front")
        named = [r for r in pts if r.get("name")]
        if quantized:   # one label per named subnet, at its first (widest) bit pair
            first = str(pts[0].get("bits")) if pts else None
            named = [r for r in named if str(r.get("bits")) == first]
        if named:
            if not quantized:   # (a quantized sweep's pair markers stay visible)
                ax.scatter([r[x] * scale for r in named], [100.0 * r[y] for r in named],
                           marker="*", s=180, facecolor="none", edgecolor="black", lw=1.2,
                           zorder=4, label="named sizes")
            middle = 0.5 * (xs.min() + xs.max())
            for r in named:   # labels point inwards, so that none leaves the panel
                right = r[x] * scale > middle
                ax.annotate(str(r["name"]), (r[x] * scale, 100.0 * r[y]),
                            textcoords="offset points", xytext=(-7 if right else 7, 6),
                            ha="right" if right else "left", fontsize=9)
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"k-NN {y_name} (%)" + (f", k={k}" if k and "_k" not in y else ""))
        ax.grid(True, alpha=0.3)
        ax.margins(0.08)
        ax.legend(loc="best", fontsize=8)
    title = f"{len(rows)} subnets of {meta.get('teacher', 'the teacher')}"
    if quantized:
        pairs = list(dict.fromkeys(str(r.get("bits")) for r in rows))
        title = (f"{len(rows) // max(1, len(pairs))} subnets x {len(pairs)} bit-widths (W/A) "
                 f"of {meta.get('teacher', 'the teacher')}")
    if meta.get("num_val"):
        title += f" (k-NN: {meta.get('num_train')} bank / {meta['num_val']} query images)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def _plot_bit_pairs(ax, pts, x, y, scale, fields):
    """A quantized sweep's points: a colour and marker per bit pair (legend in the sweep's
    order), the pairs of one subnet joined by a thin grey line."""
    by_subnet = {}
    for r in pts:
        by_subnet.setdefault(tuple(_csv_cell(r.get(f)) for f in fields), []).append(r)
    for group in by_subnet.values():
        group = sorted(group, key=lambda r: r[x])
        ax.plot([r[x] * scale for r in group], [100.0 * r[y] for r in group], "-",
                color="0.75", lw=0.8, zorder=1)
    pairs = list(dict.fromkeys(str(r.get("bits")) for r in pts))
    for i, pair in enumerate(pairs):
        mine = [r for r in pts if str(r.get("bits")) == pair]
        ax.scatter([r[x] * scale for r in mine], [100.0 * r[y] for r in mine], s=34, zorder=2,
                   marker=_PAIR_MARKERS[i % len(_PAIR_MARKERS)],
                   color=_PAIR_COLOURS[i % len(_PAIR_COLOURS)],
                   label="float (32)" if pair == str(FLOAT_BITS) else f"W{pair.replace('/', ' A')}")


def load_sweep(path):
    """A ``SweepResult`` from a ``sweep.json`` or ``sweep.csv`` file (by extension), or from
    the directory a sweep wrote them into (its sweep.json, else its sweep.csv)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("sweep.json", "sweep.csv") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds no sweep.json or sweep.csv (the files a sweep "
                                    "writes into its output directory)")
        path = found[0]
    elif not path.exists():
        raise FileNotFoundError(f"no sweep file or directory at {path}")
    if path.suffix.lower() == ".csv":
        return SweepResult.from_csv(path)
    return SweepResult.from_json(path)


__all__ = ["COST_COLUMNS", "Selection", "SweepResult", "format_table", "load_sweep", "pareto",
           "plot", "print_table", "select", "sweep"]

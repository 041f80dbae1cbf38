"""Deployment: one subnet of an elastic teacher as files a runtime loads, optionally int8.

    report = export_subnet("runs/demo/teacher", subnet="small", output="deploy/small",
                           quantize="int8", formats=["onnx"],
                           eval_data=poa_keras.data.load_shapes(512, 256, image_size=32))
    report["artifacts"]["onnx"]["bytes"], report["accuracy"]["top1_change"]

``export_subnet`` extracts the subnet (``backbone.extract(spec)``; None: the network as it is),
quantizes a copy with ``model.quantize("int8")`` when asked, and writes into ``output``:

    preset/          the float subnet as a preset (``save_to_preset``; always):
                     ``Backbone.from_preset("deploy/small/preset")``
    preset_int8/     with quantize="int8": the int8 model's preset (int8 kernels + scales);
                     ``Backbone.from_preset`` loads it (its metadata says "quantization":
                     "int8", so the architecture is quantized before the weights load)
    saved_model/     tf_saved_model: ``tf.saved_model.load(path).serve(images)`` -> dict
    model.onnx       onnx: ``onnxruntime.InferenceSession(path)``
    openvino/model.xml  openvino: ``openvino.Core().compile_model(path)``
    model.tflite     litert: ``tf.lite.Interpreter(model_path=path)``
    model.pt2        torch: ``torch.export.load(path).module()(images)``
    report.json      what this returns (sizes, parameters, checks, k-NN before / after int8)

Every artefact but the presets comes from ``model.export(path, format=...)`` (Keras) of the
model that is deployed (the int8 one when quantized), with inputs (batch, H, W, C) float32 at the
backbone's image size, already preprocessed (as ``backbone.preprocessing(uint8_images)`` gives
them: the preset's record, which the presets keep and ``report.json`` repeats under
``preprocessing``), and the backbone's output dict (``cls``, ``pooled``, ViT also
``patch_tokens``).
Every artefact is reloaded (presets with ``Backbone.from_preset``, the others
by their own runtime, see ``run_artifact``) and run on the same images as the in-memory model:
float32 outputs must agree within ``ATOL + RTOL * |expected|`` (1e-5 each); int8 ones as
``_compare`` says (one-step rounding flips of the on-the-fly input quantization are allowed,
since two compilers round boundary values differently). A failed check fails the export, and
nothing is written: the output directory appears whole or not at all (written into a temporary
sibling, renamed at the end).

With ``eval_data``, the report has the k-NN top-1 (``poa_keras.eval.knn_classify`` on the
``cls`` features, the protocol of ``knn_eval``: weighted votes exp(sim / T), T = 0.07, k = 20)
of the float subnet and, quantized, of the int8 one on the same bank and queries, their change,
and the max |float - int8| feature difference and cosine similarities on the val images.

Which formats work where (Keras 3.15, measured on the tiny ViT, Swin and ResNet configurations,
float32 and int8; ``FORMAT_SUPPORT`` holds it, ``available_formats()`` adds the packages):

    format          jax                  tensorflow               torch
    preset          yes                  yes                      yes
    tf_saved_model  yes (jax2tf)         yes                      no: Keras needs torch_xla
    onnx            no: Keras needs      ResNet only (tf2onnx:    yes, fixed batch
                    jax2onnx (heavy)     Erfc, see below)         (onnxscript)
    openvino        no: XlaCallModule    float32 only             no: jit.trace refuses
                    does not convert                              dict outputs
    litert          no (Keras: tf or     float32 only, fixed      no: needs litert-torch
                    torch backend only)  batch (int8 BatchMatMul
                                         does not convert)
    torch           no (torch backend)   no (torch backend)       yes, fixed batch

"fixed batch": the artefact takes exactly ``batch_size`` images (default 1) per call; the others
take any batch. TensorFlow's ONNX converter (tf2onnx) leaves TensorFlow's exact GELU as an
``Erfc`` node that no ONNX runtime runs, so ViT and Swin (GELU MLPs) fail there; ResNet
converts. OpenVINO's int8 outputs differ from the int8 model's by up to about 3 (Swin,
ResNet). Packages: ``onnx`` needs ``onnx`` plus ``tf2onnx`` (tensorflow) or ``onnxscript``
(torch), and ``onnxruntime`` for the check (all in the ``export`` and ``test`` extras);
``openvino`` needs the ``openvino`` package (about 180 MB, in neither extra).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from poa_keras.backbones.base import Backbone
from poa_keras.eval.features import (FROM_PRESET, INPUT_NORMALIZATIONS, extract_features,
                                     input_preprocessing, to_backbone_input)
from poa_keras.eval.knn import knn_classify
from poa_keras.files import staged_directory
from poa_keras.quantization import QUANTIZE_MODES, check_mode, quantize as quantize_model
from poa_keras.validation import check_choice, check_int, check_labelled_images

FORMATS = ("preset", "tf_saved_model", "onnx", "openvino", "litert", "torch")
REPORT_FILE = "report.json"
ATOL = RTOL = 1e-5

# Where each artefact goes inside the output directory (openvino: a directory with model.xml).
_PATHS = {"preset": "preset", "tf_saved_model": "saved_model", "onnx": "model.onnx",
          "openvino": "openvino", "litert": "model.tflite", "torch": "model.pt2"}


@dataclasses.dataclass(frozen=True)
class FormatSupport:
    """How one format exports from one backend (measured; see the module docstring's table)."""

    works: bool                 # exports, reloads and matches the in-memory model
    int8: bool = True           # also for int8 models
    families: tuple = ()        # only these backbone classes (empty: every family)
    fixed_batch: bool = False   # the artefact takes one batch size only
    packages: tuple = ()        # import names the export needs
    note: str = ""              # why not, or the limits


_TORCH_ONLY = "Keras exports this format from the torch backend only"
_LITERT_BACKENDS = "Keras exports LiteRT from the tensorflow and torch backends only"
_LITERT_INT8 = ("int8: the TFLite converter rejects the int8 BatchMatMul of Keras' int8 Dense; "
                "export the float model (the converter's own optimizations can quantize it)")
_OPENVINO_INT8 = ("int8: OpenVINO's outputs differ from the int8 model's by up to about 3 "
                  "(Swin, ResNet); export the float model")
FORMAT_SUPPORT = {
    "jax": {
        "preset": FormatSupport(True),
        "tf_saved_model": FormatSupport(True, packages=("tensorflow",), note="through jax2tf"),
        "onnx": FormatSupport(False, packages=("jax2onnx",),
                              note="Keras exports ONNX from JAX with jax2onnx, which brings "
                                   "flax, optax, orbax and tensorstore; not installed here"),
        "openvino": FormatSupport(False, packages=("openvino",),
                                  note="OpenVINO cannot convert the XlaCallModule op of the "
                                       "jax2tf function Keras hands it"),
        "litert": FormatSupport(False, note=_LITERT_BACKENDS),
        "torch": FormatSupport(False, note=_TORCH_ONLY),
    },
    "tensorflow": {
        "preset": FormatSupport(True),
        "tf_saved_model": FormatSupport(True, packages=("tensorflow",)),
        "onnx": FormatSupport(True, families=("ElasticResNet",), packages=("tf2onnx", "onnx"),
                              note="tf2onnx leaves TensorFlow's exact GELU (ViT, Swin MLPs) as "
                                   "an Erfc node that ONNX runtimes cannot run; export ONNX of "
                                   "a ViT or Swin from the torch backend"),
        "openvino": FormatSupport(True, int8=False, packages=("openvino",),
                                  note=_OPENVINO_INT8),
        "litert": FormatSupport(True, int8=False, fixed_batch=True, packages=("tensorflow",),
                                note=_LITERT_INT8),
        "torch": FormatSupport(False, note=_TORCH_ONLY),
    },
    "torch": {
        "preset": FormatSupport(True),
        "tf_saved_model": FormatSupport(False, packages=("torch_xla",),
                                        note="Keras exports a SavedModel from torch through "
                                             "torch_xla; not installed here"),
        "onnx": FormatSupport(True, fixed_batch=True, packages=("onnx", "onnxscript"),
                              note="torch.onnx's dynamo exporter, fixed batch (the TorchScript "
                                   "exporter Keras uses for a dynamic batch fails on these "
                                   "models)"),
        "openvino": FormatSupport(False, packages=("openvino",),
                                  note="Keras traces the model with torch.jit.trace, which "
                                       "refuses the backbones' dict outputs"),
        "litert": FormatSupport(False, fixed_batch=True, packages=("litert_torch",),
                                note="needs the litert-torch package; not installed here"),
        "torch": FormatSupport(True, fixed_batch=True,
                               note="torch.export, fixed batch (it specialises the batch "
                                    "dimension of these models)"),
    },
}

# Packages the reload check needs, per format (beyond the export's own).
_CHECK_PACKAGES = {"tf_saved_model": ("tensorflow",), "onnx": ("onnxruntime",),
                   "openvino": ("openvino",), "litert": ("tensorflow",), "torch": ("torch",)}

_PIP_NAMES = {"jax2onnx": "jax2onnx", "tf2onnx": "tf2onnx", "onnx": "onnx",
              "onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "openvino": "openvino",
              "litert_torch": "litert-torch", "torch_xla": "torch-xla",
              "tensorflow": "tensorflow", "torch": "torch"}


def _backend():
    import keras

    return keras.backend.backend()


def _missing(packages):
    return [p for p in packages if importlib.util.find_spec(p) is None]


def available_formats(backend=None, family=None, quantize=None):
    """{format: None if it exports here, else the reason} on the active (or given) backend:
    whether Keras exports it there for these models (for ``family``, a backbone class name
    such as "ElasticViT", and ``quantize`` None or "int8", when given) and whether the
    packages it needs are installed."""
    backend = backend or _backend()
    if backend not in FORMAT_SUPPORT:
        return {f: f"Keras exports nothing from the {backend!r} backend" for f in FORMATS}
    result = {}
    for fmt, support in FORMAT_SUPPORT[backend].items():
        if not support.works:
            result[fmt] = support.note or "not supported"
            continue
        if family is not None and support.families and family not in support.families:
            result[fmt] = (f"only {', '.join(support.families)} on the {backend} backend: "
                           f"{support.note}")
            continue
        if quantize and not support.int8:
            result[fmt] = support.note or f"{quantize} models do not export"
            continue
        missing = _missing(support.packages + _CHECK_PACKAGES.get(fmt, ()))
        result[fmt] = (None if not missing else "needs " + ", ".join(
            f"{m} (pip install {_PIP_NAMES.get(m, m)})" for m in missing))
    return result


def default_formats(backend=None, family=None, quantize=None):
    """What ``export_subnet(formats=None)`` writes: every format that exports on this backend
    for this family and precision with the installed packages (always "preset")."""
    available = available_formats(backend, family, quantize)
    if family is None:   # without a family, leave out the family-restricted ones
        backend = backend or _backend()
        available = {f: r for f, r in available.items()
                     if not FORMAT_SUPPORT.get(backend, {}).get(f, FormatSupport(True)).families}
    return [f for f in FORMATS if f in available and available[f] is None]


def parse_formats(formats):
    """Format names checked against FORMATS (before anything is loaded); None stays None."""
    if formats is None:
        return None
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(formats))   # [] : the preset only
    for fmt in formats:
        if fmt not in FORMATS:
            here = default_formats()
            raise ValueError(f"unknown export format {fmt!r}; valid formats: {list(FORMATS)} "
                             f"(the {_backend()} backend here exports {here})")
    return formats


def _check_formats(formats, family, quantize):
    """The formats to write for this family and precision; ValueError for one that cannot."""
    backend = _backend()
    if formats is None:
        return default_formats(backend, family, quantize)
    available = available_formats(backend, family, quantize)
    here = [f for f in FORMATS if available.get(f) is None]
    what = f"an {quantize} {family}" if quantize else f"an {family}"  # int8, Elastic...
    for fmt in formats:
        if available.get(fmt) is not None:
            raise ValueError(f"format {fmt!r} cannot export {what} on the {backend} backend: "
                             f"{available[fmt]}; formats that work here: {here}")
    if "preset" not in formats:
        formats = ["preset"] + formats   # always: the Keras-native artefact
    return formats


def check_output(output, overwrite):
    """The export directory as a resolved Path, checked before anything is loaded: it must not
    exist, unless ``overwrite`` and it holds an earlier export (its report.json)."""
    if output is None or str(output) == "":
        raise ValueError("export needs an output directory (output=...)")
    target = Path(output).expanduser().resolve()
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"output {str(target)!r} exists; give a new directory or "
                                  "overwrite=True (CLI: --overwrite)")
        if not target.is_dir():
            raise FileExistsError(f"output {str(target)!r} is a file, not a directory")
        if any(target.iterdir()) and not (target / REPORT_FILE).is_file():
            raise FileExistsError(f"output {str(target)!r} is a non-empty directory that "
                                  f"holds no export ({REPORT_FILE} missing); refusing to "
                                  "replace it")
    return target


def _split_eval(eval_data):
    """(train, val) or load_shapes' (train, val, names) -> two checked (images, labels)."""
    if eval_data is None:
        return None
    if not isinstance(eval_data, (tuple, list)) or len(eval_data) not in (2, 3):
        raise TypeError("eval_data must be ((train_images, train_labels), (val_images, "
                        "val_labels)), as poa_keras.data.load_shapes returns it")
    return (check_labelled_images(eval_data[0], "eval_data train"),
            check_labelled_images(eval_data[1], "eval_data val"))


def _log(progress, message):
    if progress:
        print(message, flush=True)


# ----- the export -------------------------------------------------------------------------------

def export_subnet(backbone_or_preset, subnet=None, output=None, quantize=None, formats=None,
                  eval_data=None, batch_size=None, overwrite=False, k=20, temperature=0.07,
                  pixel_normalization=FROM_PRESET, progress=True, check_images=None):
    """Extracts one subnet and writes it in deployable formats; returns the report (a dict).

    Args:
      backbone_or_preset: an elastic backbone (``poa_keras.Backbone``), or a preset name or
        directory (``Backbone.from_preset``).
      subnet: None (the network as it is), a named size ("small"), a spec or a tuple.
      output: the directory to create (it must not exist unless ``overwrite``).
      quantize: None (float32) or "int8" (``model.quantize("int8")``: Dense kernels int8 with
        per-channel scales, inputs quantized on the fly; convolutions stay float).
      formats: a list (or comma-separated string) of ``FORMATS``; None: ``default_formats()``.
        "preset" is always written (``[]``: the preset only).
      eval_data: ``((train_images, train_labels), (val_images, val_labels))`` (uint8 images,
        through the backbone's preprocessing, or float already preprocessed): reports the
        k-NN top-1 (train split as
        the bank) of the float subnet and, with quantize, of the int8 one, and their feature
        differences on the val images. None: no accuracy report.
      batch_size: None: any batch where the format allows it, else 1; an int fixes the batch of
        every artefact.
      overwrite: replace an existing export at ``output`` (a directory with report.json).
      k, temperature, pixel_normalization: the k-NN (weighted votes exp(sim / T)) and how uint8
        images are preprocessed ("preset": the backbone's ``preprocessing``; see
        ``poa_keras.eval.features.extract_features``).
      progress: print what is being done.
      check_images: (B, H, W, C) images for the reload checks (uint8: preprocessed; float:
        as given, at the backbone's image size); default: the first val images of
        ``eval_data`` (preprocessed), else seeded normal noise.

    Returns:
      a JSON-friendly dict (also written as ``output/report.json``): ``output``, ``backend``,
      ``family``, ``subnet`` (the spec's fields), ``parameters``, ``quantize``,
      ``input_shape``, ``preprocessing`` (the artefacts' input: ``ImagePreprocessing`` config
      of the backbone), ``artifacts`` ({format or "preset_int8": {"path", "bytes",
      "precision", "batch", "max_abs_diff", "mean_abs_diff", "past_tolerance", "check"}}: the
      reload check against the in-memory model, see ``_compare``), ``accuracy`` (None without
      eval_data, else the k-NN top-1 of the float subnet and, quantized, of the int8 one with
      ``top1_change``, ``max_abs_feature_diff``, ``mean_cosine``, ``min_cosine``).

    Raises:
      ValueError: an unknown format or quantize mode, a format this backend cannot export
        (the message names the ones it can), a bad subnet; or an artefact whose reloaded
        outputs differ from the in-memory model's.
      FileExistsError: ``output`` exists (and ``overwrite`` is False, or it holds no export).
    """
    started = time.perf_counter()
    quantize = check_mode(quantize, allow_none=True, what="quantize mode")
    target = check_output(output, overwrite)
    formats = parse_formats(formats)
    check_choice(pixel_normalization, "pixel_normalization", INPUT_NORMALIZATIONS)
    evaluation = _split_eval(eval_data)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
    if isinstance(backbone_or_preset, (str, os.PathLike)):
        _log(progress, f"loading preset {os.fspath(backbone_or_preset)!r}")
        teacher = Backbone.from_preset(backbone_or_preset)
    elif isinstance(backbone_or_preset, Backbone):
        teacher = backbone_or_preset
    else:
        raise TypeError("backbone_or_preset must be a poa_keras.Backbone or a preset name or "
                        f"directory, got {type(backbone_or_preset).__name__}")
    spec = teacher.resolve_subnet(subnet)
    formats = _check_formats(formats, type(teacher).__name__, quantize)
    spec_full = spec or teacher.full_subnet
    model = teacher if spec is None else teacher.extract(spec)
    _log(progress, f"extracted {spec_full}: {model.count_params():,} parameters")
    deployed = model
    if quantize:
        deployed = teacher.extract(spec_full)   # a separate copy: the float model stays float
        quantize_model(deployed, quantize)
        _log(progress, f"quantized a copy to {quantize}")

    size = int(model.image_size)
    channels = int(getattr(model, "in_channels", 3))
    preprocessing = input_preprocessing(model, pixel_normalization)
    images = _check_images(check_images, evaluation, size, channels, preprocessing)
    backend = _backend()

    with staged_directory(target) as tmp:   # the export appears whole or not at all
        artifacts = {}
        for fmt in formats:
            if fmt == "preset":
                artifacts["preset"] = _write_preset(model, tmp, "preset", images, None,
                                                    model, progress)
                if quantize:
                    artifacts["preset_int8"] = _write_preset(deployed, tmp, "preset_int8",
                                                             images, quantize, model, progress)
                continue
            support = FORMAT_SUPPORT[backend][fmt]
            batch = batch_size or (1 if support.fixed_batch else None)
            artifacts[fmt] = _write_format(deployed, fmt, tmp, batch, size, channels, images,
                                           quantize, model, progress)
        accuracy = None
        if evaluation is not None:
            _log(progress, "k-NN evaluation" + (" of the float and the int8 model"
                                                 if quantize else ""))
            accuracy = _evaluate(model, deployed if quantize else None, evaluation, k,
                                 temperature, pixel_normalization)
        report = {
            "output": str(target),
            "backend": backend,
            "family": type(model).__name__,
            "subnet": _spec_dict(spec_full),
            "subnet_name": next((n for n, s in teacher.named_subnets.items()
                                 if teacher.resolve_subnet(s) == spec_full), None),
            "parameters": int(model.count_params()),
            "quantize": quantize,
            "input_shape": [None, size, size, channels],
            "preprocessing": model.preprocessing.get_config(),
            "formats": formats,
            "artifacts": artifacts,
            "accuracy": accuracy,
            "seconds": None,
        }
        report["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    _log(progress, format_report(report))
    return report


def _spec_dict(spec):
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(spec).items()}


FEATURE_BATCH = 32   # images per forward pass of the k-NN features and of the reload checks


def _check_images(check_images, evaluation, size, channels, preprocessing):
    """The images of the reload checks: given, else the first val images (as many as one
    feature batch: the forward compiled for the k-NN is the one the checks reuse), else
    seeded normal noise; uint8 ones through ``preprocessing``."""
    if check_images is not None:
        images = np.asarray(check_images)
        images = to_backbone_input(images, channels, preprocessing) \
            if images.dtype == np.uint8 and images.ndim == 4 else images.astype(np.float32)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels) or not len(images):
            raise ValueError(f"check_images must have shape (B, {size}, {size}, {channels}) "
                             f"with B >= 1, got {images.shape}")
        return images
    if evaluation is not None:
        (train_x, _), (val_x, _) = evaluation
        step = min(FEATURE_BATCH, len(train_x), len(val_x))
        images = to_backbone_input(val_x[:step], channels, preprocessing)
        if images.shape[1:3] == (size, size):
            return images
    return np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)


def _outputs(model, images):
    """The model's outputs as {name: numpy}, in the model's output order, through its compiled
    forward (on JAX a reloaded copy runs the program compiled for the model it was saved
    from: ``backbones/compiled.py`` shares programs between models of one architecture)."""
    from keras import ops

    out = model.compiled_forward()(ops.convert_to_tensor(images))
    return {name: np.asarray(ops.convert_to_numpy(v)) for name, v in out.items()}


def _bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


INT8_FLIP_RATIO = 0.1


def _compare(expected, got, what, float_outputs=None):
    """How far a reloaded artefact's outputs are from the in-memory model's.

    Float32: every value within ``ATOL + RTOL * |expected|``. Int8 (``float_outputs`` given:
    the float model's outputs on the same images): Keras' int8 Dense quantizes its inputs on
    the fly (round(x * 127 / max|x|)), and two compilers (even JAX jitted vs eager) can round a
    value that lies on a rounding boundary differently, which moves it by one quantization
    step and propagates; so values past the float tolerance are allowed where the mean
    |difference| of the output stays below ``INT8_FLIP_RATIO`` (0.1) times the mean
    |float - int8| of the same output, the quantization's own error: an artefact that lost the
    int8 arithmetic (or its scales) would be as far from the int8 model as the float one is.

    Returns {"max_abs_diff", "mean_abs_diff", "past_tolerance"} (the fraction of values past
    the float tolerance); ValueError when the check fails."""
    if set(got) != set(expected):
        raise ValueError(f"{what}: outputs {sorted(got)}, expected {sorted(expected)}")
    worst, mean, past, total = 0.0, 0.0, 0, 0
    for name, ref in expected.items():
        value = np.asarray(got[name], np.float32)
        if value.shape != ref.shape:
            raise ValueError(f"{what}: output {name!r} has shape {value.shape}, expected "
                             f"{ref.shape}")
        diff = np.abs(value.astype(np.float64) - ref)
        if not diff.size:
            continue
        bad = ~(diff <= ATOL + RTOL * np.abs(ref))   # NaN counts as bad
        worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else np.inf)
        mean = max(mean, float(diff.mean()))
        past += int(bad.sum())
        total += bad.size
        if not bad.any():
            continue
        message = (f"{what}: output {name!r} differs from the in-memory model by up to "
                   f"{float(np.nanmax(diff)):.3g} ({int(bad.sum())} of {bad.size} values past "
                   f"{ATOL:g} + {RTOL:g} * |expected|)")
        if float_outputs is None or np.isnan(diff).any():
            raise ValueError(message)
        error = float(np.abs(np.asarray(float_outputs[name], np.float64) - ref).mean())
        if not diff.mean() <= INT8_FLIP_RATIO * error:
            raise ValueError(f"{message}; mean |diff| {diff.mean():.3g} is more than "
                             f"{INT8_FLIP_RATIO:g} x the int8 model's own mean error "
                             f"{error:.3g} (rounding flips alone stay far below it)")
    return {"max_abs_diff": worst, "mean_abs_diff": mean,
            "past_tolerance": past / total if total else 0.0}


def _write_preset(model, tmp, name, images, quantize, float_model, progress):
    path = tmp / name
    model.save_to_preset(path)   # its metadata records the quantization mode
    x = _batch(images, None)
    reloaded = load_preset(path)
    if reloaded.get_config() != model.get_config():
        raise ValueError(f"the reloaded preset's configuration differs from the exported "
                         f"model's: {reloaded.get_config()} != {model.get_config()}")
    stats = _compare(_outputs(model, x), _outputs(reloaded, x), f"{name} reloaded",
                     _outputs(float_model, x) if quantize else None)
    entry = {"path": name, "bytes": _bytes(path), "precision": quantize or "float32",
             "batch": "any", **stats, "check": "Backbone.from_preset"}
    _log(progress, f"wrote {name}/ ({entry['bytes']:,} bytes; reloaded: max |diff| "
                   f"{entry['max_abs_diff']:.2g})")
    return entry


def _batch(images, batch):
    """The check batch: `batch` images (repeated if needed), or all of them (at least 2, so
    that a dynamic-batch artefact runs a batch other than the traced one)."""
    n = max(2, len(images)) if batch is None else batch
    return images[np.arange(n) % images.shape[0]]


def _write_format(model, fmt, tmp, batch, size, channels, images, quantize, float_model,
                  progress):
    import keras

    path = tmp / _PATHS[fmt]
    export_path = path / "model.xml" if fmt == "openvino" else path
    if fmt == "openvino":
        path.mkdir()
    signature = [keras.InputSpec(shape=(batch, size, size, channels), dtype="float32")]
    start = time.perf_counter()
    _log(progress, f"exporting {fmt} ...")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(export_path), format=fmt, input_signature=signature,
                         verbose=False)
    except Exception as error:
        raise ValueError(f"exporting {fmt} on the {_backend()} backend failed: "
                         f"{type(error).__name__}: {_first_line(error)}") from error
    x = _batch(images, batch)
    expected = _outputs(model, x)
    try:
        got = run_artifact(export_path, fmt, x, names=list(expected))
    except Exception as error:
        raise ValueError(f"the exported {fmt} artefact does not run: {type(error).__name__}: "
                         f"{_first_line(error)}") from error
    stats = _compare(expected, got, f"{fmt} reloaded",
                     _outputs(float_model, x) if quantize else None)
    entry = {"path": _PATHS[fmt], "bytes": _bytes(path), "precision": quantize or "float32",
             "batch": "any" if batch is None else batch, **stats, "check": _CHECKERS[fmt]}
    _log(progress, f"wrote {_PATHS[fmt]} ({entry['bytes']:,} bytes, "
                   f"{time.perf_counter() - start:.1f} s; reloaded: max |diff| "
                   f"{entry['max_abs_diff']:.2g}"
                   + (f", {100 * entry['past_tolerance']:.1f} % of values past "
                      f"{ATOL:g} (int8 rounding flips)" if entry["past_tolerance"] else "")
                   + ")")
    return entry


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:500]


# ----- running an artefact ------------------------------------------------------------------

_CHECKERS = {"tf_saved_model": "tf.saved_model.load(...).serve", "onnx": "onnxruntime",
             "openvino": "openvino.Core().compile_model", "litert": "tf.lite.Interpreter",
             "torch": "torch.export.load(...).module()"}


def run_artifact(path, fmt, images, names=("cls", "patch_tokens", "pooled")):
    """Runs an exported artefact with its own runtime (no Keras model involved) on float32
    images; returns {output name: numpy}. Runtimes that number their outputs instead of
    naming them (ONNX from torch, LiteRT) give them in the model's output order, ``names``."""
    images = np.ascontiguousarray(images, np.float32)
    path = os.fspath(path)
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)   # keep a reference: it owns the variables
        return _named(loaded.serve(tf.constant(images)), names, lambda v: v.numpy())
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        values = session.run(None, {session.get_inputs()[0].name: images})
        return _named(dict(zip([o.name for o in session.get_outputs()], values)), names)
    if fmt == "openvino":
        import openvino

        # f32: the CPU plugin otherwise computes in bf16 on CPUs that have it.
        compiled = openvino.Core().compile_model(path, "CPU",
                                                 {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(images)
        out, ordered = {}, []
        for port in compiled.outputs:
            ordered.append(result[port])
            for name in port.get_names():   # one port can carry several names (cls, pooled)
                out[name] = result[port]
        return _named(out if set(names) <= set(out) else ordered, names)
    if fmt == "litert":
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=path)
        runner = interpreter.get_signature_runner()
        (input_name,) = interpreter.get_signature_list()["serving_default"]["inputs"]
        return _named(runner(**{input_name: images}), names)
    if fmt == "torch":
        import torch

        module = torch.export.load(path).module()
        with torch.no_grad():
            out = module(torch.from_numpy(images))
        return _named(out, names, lambda v: v.detach().cpu().numpy())
    raise ValueError(f"unknown export format {fmt!r}; valid: {list(FORMATS[1:])}")


def _named(out, names, to_numpy=np.asarray):
    """{name: value} when the runtime kept the model's output names; else the outputs in
    order (a list or numbered names such as output_0, select_6) paired with `names`."""
    if isinstance(out, dict):
        if set(names) <= set(out):
            return {k: np.asarray(to_numpy(out[k])) for k in names}
        values = list(out.values())
        if all(k.startswith("output_") and k[7:].isdigit() for k in out):
            values = [out[k] for k in sorted(out, key=lambda k: int(k[7:]))]
    else:
        values = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(values) != len(names):
        raise ValueError(f"the artefact gives {len(values)} outputs, expected {len(names)} "
                         f"({list(names)})")
    return {k: np.asarray(to_numpy(v)) for k, v in zip(names, values)}


def load_preset(path):
    """A preset written by ``export_subnet``, float or int8: ``Backbone.from_preset(path)``
    (kept for code written when only this function could load int8 presets)."""
    return Backbone.from_preset(path)


# ----- accuracy ---------------------------------------------------------------------------------

def _features(model, images, pixel_normalization):
    """(N, D) float32 ``cls`` features (not normalised), FEATURE_BATCH images per pass: the
    k-NN's own feature extraction (``eval.features``), whose fixed, padded batches reuse the
    program compiled for the reload checks."""
    return extract_features(model, images, batch_size=FEATURE_BATCH, normalize=False,
                            pixel_normalization=pixel_normalization)


def _evaluate(model, quantized, evaluation, k, temperature, pixel_normalization):
    """k-NN top-1 of the float model (and the int8 one) and their feature differences."""
    (train_x, train_y), (val_x, val_y) = evaluation
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    # Both splits in one pass of one batch shape (N train + M val, padded at the very end).
    both = np.concatenate([train_x, val_x]) if train_x.shape[1:] == val_x.shape[1:] else None
    if both is None:
        raise ValueError(f"eval_data train and val images must have the same shape, got "
                         f"{train_x.shape[1:]} and {val_x.shape[1:]}")

    def top1(net):
        feats = _features(net, both, pixel_normalization)
        bank, queries = feats[:len(train_x)], feats[len(train_x):]
        result = knn_classify(bank, train_y, queries, val_y, num_classes, ks=(k,),
                              temperature=temperature)   # L2-normalises the features
        return result[k]["top1"], queries

    float_top1, float_feats = top1(model)
    accuracy = {"metric": f"k-NN top-1 (k={k}, T={temperature})", "k": k,
                "temperature": temperature, "num_train": int(train_x.shape[0]),
                "num_val": int(val_x.shape[0]), "float_top1": float_top1}
    if quantized is None:
        return accuracy
    int8_top1, int8_feats = top1(quantized)
    f = float_feats.astype(np.float64)
    q = int8_feats.astype(np.float64)
    cos = (f * q).sum(1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1),
                                      1e-12)
    accuracy.update(int8_top1=int8_top1, top1_change=int8_top1 - float_top1,
                    max_abs_feature_diff=float(np.abs(f - q).max()),
                    mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return accuracy


# ----- the report -------------------------------------------------------------------------------

def format_report(report):
    """A few readable lines of an ``export_subnet`` report."""
    spec = ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in report["subnet"].items())
    lines = [f"exported {report['family']} ({spec}"
             + (f", {report['subnet_name']!r}" if report.get("subnet_name") else "")
             + f"): {report['parameters']:,} parameters, "
             + (report["quantize"] or "float32") + f", backend {report['backend']}",
             f"{'artefact':<16} {'bytes':>12} {'precision':>9} {'batch':>5} "
             f"{'max |diff|':>10} {'past 1e-5':>9}  reloaded with"]
    for name, a in report["artifacts"].items():
        lines.append(f"{a['path']:<16} {a['bytes']:>12,} {a['precision']:>9} "
                     f"{str(a['batch']):>5} {a['max_abs_diff']:>10.2g} "
                     f"{100 * a['past_tolerance']:>8.1f}%  {a['check']}")
    acc = report.get("accuracy")
    if acc:
        line = (f"{acc['metric']} on {acc['num_val']} val images (bank {acc['num_train']}): "
                f"float {100 * acc['float_top1']:.2f} %")
        if "int8_top1" in acc:
            line += (f", int8 {100 * acc['int8_top1']:.2f} % (change "
                     f"{100 * acc['top1_change']:+.2f} points); features: max |float - int8| "
                     f"{acc['max_abs_feature_diff']:.3g}, cosine mean "
                     f"{acc['mean_cosine']:.5f} / min {acc['min_cosine']:.5f}")
        lines.append(line)
    lines.append(f"written to {report['output']}")
    return "\n".join(lines)


__all__ = ["ATOL", "FORMATS", "FORMAT_SUPPORT", "QUANTIZE_MODES", "RTOL", "available_formats",
           "check_output", "default_formats", "export_subnet", "format_report", "load_preset",
           "parse_formats", "run_artifact"]

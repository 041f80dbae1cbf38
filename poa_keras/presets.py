"""Presets in the keras-hub layout: a directory with

    config.json        the backbone's serialized config ({"module", "class_name", "config", ...})
    metadata.json      versions, parameter count, sha256 of the weights, date saved
    model.weights.h5   the weights (Keras h5 weights format)

and a registry of named presets read from the zoo cards (JSON files shipped with the package).
Loading never runs pickled code: configs are JSON, weights are h5 arrays.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import keras

from poa_keras.quantization import QUANTIZE_MODES, quantization_mode, quantize  # noqa: F401

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"


# -- the zoo ----------------------------------------------------------------------------------
def _card_dir():
    try:
        return resources.files("poa_keras.zoo")
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parent.parent / "zoo"


@functools.lru_cache(maxsize=1)
def list_presets() -> dict:
    """{name: card} of every registered preset (the zoo/ cards)."""
    cards = {}
    for entry in _card_dir().iterdir():
        if entry.name.endswith(".json"):
            card = json.loads(entry.read_text())
            cards[card["name"]] = card
    return dict(sorted(cards.items()))


def get_card(name) -> dict:
    cards = list_presets()
    if name not in cards:
        raise ValueError(f"unknown preset {name!r}: it is neither a registered name nor a "
                         f"directory; known presets: {sorted(cards)}")
    return cards[name]


def _backbone_classes():
    from poa_keras.backbones import BACKBONE_CLASSES
    return BACKBONE_CLASSES


def sha256_of(path, chunk=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# -- saving -----------------------------------------------------------------------------------
def save_preset(backbone, preset_dir):
    """Writes a preset directory atomically: into a temporary sibling, then renamed into place.

    An existing preset at `preset_dir` is replaced; any other non-empty directory is refused.
    """
    target = Path(preset_dir).resolve()
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"cannot save a preset to {target}: it is a file")
        if any(target.iterdir()) and not (target / CONFIG_FILE).exists():
            raise ValueError(f"cannot save a preset to {target}: the directory is not empty "
                             f"and holds no preset ({CONFIG_FILE} missing)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        backbone.save_weights(str(tmp / WEIGHTS_FILE))
        config = keras.saving.serialize_keras_object(backbone)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        from poa_keras import __version__
        metadata = {
            "poa_keras_version": __version__,
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
            "class_name": type(backbone).__name__,
            "parameter_count": int(backbone.count_params()),
            "num_subnets": len(backbone.subnets()),
            "weights_sha256": sha256_of(tmp / WEIGHTS_FILE),
            "quantization": quantization_mode(backbone),
            "date_saved": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        # mkdtemp makes the directory owner-only (0o700); a preset is an ordinary directory
        # (0o777 less the umask) like the files in it.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_directory(tmp, target):
    """Renames the finished directory `tmp` to `target` (a sibling). An existing `target` is
    first moved aside, then deleted, so `target` is never half written."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


# -- loading ----------------------------------------------------------------------------------
def _check_class(cls, class_name, where):
    classes = _backbone_classes()
    if class_name not in classes:
        raise ValueError(f"{where} holds {class_name!r}, which is not a poa_keras backbone; "
                         f"known architectures: {sorted(classes)}")
    klass = classes[class_name]
    from poa_keras.backbones.base import Backbone
    if cls is not Backbone and not issubclass(klass, cls):
        raise ValueError(f"{where} holds an {class_name}, not an {cls.__name__}: load it with "
                         f"{class_name}.from_preset or Backbone.from_preset")
    return klass


def _load_weights(backbone, weights_path, expected_sha256, where):
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{where}: weights file {weights_path} is missing")
    if expected_sha256:
        actual = sha256_of(weights_path)
        if actual != expected_sha256:
            raise ValueError(
                f"{where}: weights file {weights_path} is corrupted or truncated: its sha256 is "
                f"{actual}, expected {expected_sha256} ({weights_path.stat().st_size} bytes)")
    try:
        backbone.load_weights(str(weights_path))
    except Exception as error:  # h5py/Keras say "unable to open", "shape mismatch", ...
        raise ValueError(f"{where}: cannot load weights from {weights_path}: the file is "
                         f"corrupted, truncated or of another architecture ({error})") from error


def load_preset(cls, preset, load_weights=True, subnet=None, **subnet_kwargs):
    """See ``Backbone.from_preset``."""
    preset = os.fspath(preset)
    if os.path.isdir(preset):
        backbone = _load_directory(cls, Path(preset), load_weights)
    else:
        backbone = _load_registered(cls, preset, load_weights)
    if subnet is not None and subnet_kwargs:
        raise ValueError(f"give either subnet= or {sorted(subnet_kwargs)}, not both")
    if subnet is None and not any(v is not None for v in subnet_kwargs.values()):
        return backbone
    mode = quantization_mode(backbone)
    if mode is not None:
        raise ValueError(
            f"preset {preset!r} holds {mode} weights: sub-networks are extracted from float "
            "weights. Load the float teacher, extract, then quantize the extracted model (or "
            "export it with quantize='int8'); or load this preset without a subnet.")
    spec = (backbone.resolve_subnet(subnet) if subnet is not None
            else backbone.subnet_from_kwargs(**subnet_kwargs))
    return backbone.extract(spec)


def _load_directory(cls, directory, load_weights):
    where = f"preset {str(directory)!r}"
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{where} has no {CONFIG_FILE}; a preset directory holds "
                         f"{CONFIG_FILE}, {METADATA_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: {CONFIG_FILE} is not valid JSON ({error})") from error
    class_name = config.get("class_name") if isinstance(config, dict) else None
    if class_name is None or "config" not in config:
        raise ValueError(f"{where}: {CONFIG_FILE} is not a serialized backbone "
                         "(no 'class_name'/'config')")
    klass = _check_class(cls, class_name, where)
    metadata = {}
    if (directory / METADATA_FILE).is_file():
        try:
            metadata = json.loads((directory / METADATA_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: {METADATA_FILE} is not valid JSON ({error})") from error
    mode = metadata.get("quantization")
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"{where}: {METADATA_FILE} says quantization={mode!r}; known modes: "
                         f"{', '.join(repr(m) for m in QUANTIZE_MODES)}")
    backbone = klass.from_config(config["config"])
    if mode is not None:  # the architecture of the saved weights: quantized kernels and scales
        quantize(backbone, mode)
    if load_weights:
        _load_weights(backbone, directory / WEIGHTS_FILE, metadata.get("weights_sha256"), where)
    return backbone


def _load_registered(cls, name, load_weights):
    card = get_card(name)
    arch = card["architecture"]
    klass = _check_class(cls, arch["class_name"], f"preset {name!r}")
    weights = card.get("weights") or {}
    if load_weights and not weights.get("url"):  # say so before building a large model
        status = weights.get("status", "not published")
        raise ValueError(
            f"preset {name!r} has no published weights yet ({status}). Use load_weights=False "
            "for the architecture with random weights, or pass a local preset directory.")
    backbone = klass.from_config_name(arch["config_name"], name=name)
    if not load_weights:
        return backbone
    path = keras.utils.get_file(
        fname=f"{name}.weights.h5", origin=weights["url"], file_hash=weights["sha256"],
        hash_algorithm="sha256", cache_subdir=os.path.join("poa_keras", name))
    _load_weights(backbone, path, weights["sha256"], f"preset {name!r}")
    return backbone

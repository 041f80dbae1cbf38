"""Presets: their files, the zoo registry, checksums and downloads -- no model code.

A preset is a directory in the keras-hub layout::

    config.json        the backbone's serialized config ({"module", "class_name", "config",
                       "registered_name"}); ``config["preprocessing"]`` is how images enter
                       the network (``poa_keras.preprocessing.ImagePreprocessing``)
    metadata.json      versions, parameter count, sha256 of the weights, quantization mode, date
    model.weights.h5   the weights (Keras h5 weights format)

A task preset (``ImageClassifier.save_to_preset``) is a backbone preset of its fine-tuned
backbone plus (keras-hub's task files)::

    task.json          the task's serialized config without its backbone (that is config.json)
    task.weights.h5    the task's own variables (the head), one h5 dataset per variable path

A registered name resolves through the zoo cards (JSON files shipped as ``poa_keras.zoo``): a
card names the architecture (class and named configuration) and the weights (URL and sha256;
downloaded once into the Keras cache and checked).

This module never imports a backbone family: classes resolve through Keras' serialization
registry (``registered_class``; every family registers itself), and building, quantizing,
loading and extracting a size are ``Backbone.from_preset``'s (backbones/base.py). It reads only
JSON and h5 arrays: loading never runs pickled code.

Converters plug in here. A card whose weights are not a Keras h5 file gives their ``format``
(e.g. an official PyTorch checkpoint); ``register_converter(format, convert)`` registers the
function that turns such a file into a preset directory. Converter modules register themselves
when imported, so this module never imports them (no import circle); ``resolve`` converts the
downloaded file on first use and caches the converted preset beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import keras

from poa_keras.files import recover_directory, staged_directory
from poa_keras.preprocessing import ImagePreprocessing
from poa_keras.quantization import QUANTIZE_MODES
from poa_keras.version import __version__

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"
TASK_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
DECODER_FILE = "decoder.json"                # MAE's decoder, in converted full MAE presets
DECODER_WEIGHTS_FILE = "decoder.weights.h5"
KERAS_WEIGHTS = "keras_h5"   # the weights format of our own presets

_CONVERTERS = {}   # weights format -> convert(checkpoint_path, card, output_dir)


# -- the zoo ----------------------------------------------------------------------------------
def _card_dir():
    try:
        return resources.files("poa_keras.zoo")
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parent.parent / "zoo"


def sha256_of_text(text) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def list_presets() -> dict:
    """{name: card} of every registered preset (the zoo/ cards)."""
    cards = {}
    for entry in _card_dir().iterdir():
        if entry.name.endswith(".json"):
            card = json.loads(entry.read_text())
            cards[card["name"]] = card
    return dict(sorted(cards.items()))


def weights_status(card) -> str:
    """One line on where a card's weights come from: shipped in the package, downloaded (and
    converted from which format) on first load, or why there are none."""
    weights = card.get("weights") or {}
    if weights.get("file"):
        return "weights in the package"
    if weights.get("url"):
        fmt = weights.get("format", KERAS_WEIGHTS)
        return ("downloaded on first load" if fmt == KERAS_WEIGHTS
                else f"converted on first load ({fmt})")
    return weights.get("status", "not published").split(":")[0]


def get_card(name) -> dict:
    cards = list_presets()
    if name not in cards:
        raise ValueError(f"unknown preset {name!r}: it is neither a registered name nor a "
                         f"directory; known presets: {sorted(cards)}")
    return cards[name]


def sha256_of(path, chunk=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def registered_class(registered_name):
    """The class Keras' serialization registry holds under ``registered_name`` (e.g.
    "poa_keras>ElasticViT"), or None. Nothing is imported: an unregistered name stays unknown."""
    return keras.saving.get_registered_object(registered_name)


def registered_name_of(class_name):
    """The registry name of a poa_keras class: "poa_keras>" + class_name."""
    return f"poa_keras>{class_name}"


# -- converters -------------------------------------------------------------------------------
def register_converter(weights_format, convert):
    """Registers ``convert(checkpoint_path, card, output_dir)``, which writes the preset of a
    checkpoint in ``weights_format`` (a card's ``weights.format``) to ``output_dir``."""
    if not isinstance(weights_format, str) or not weights_format or \
            weights_format == KERAS_WEIGHTS:
        raise ValueError(f"a converter needs a format name other than {KERAS_WEIGHTS!r}, got "
                         f"{weights_format!r}")
    if not callable(convert):
        raise TypeError(f"convert must be callable, got {type(convert).__name__}")
    _CONVERTERS[weights_format] = convert


def weights_formats():
    """Every weights format a card may give: ours and those of the registered converters."""
    return [KERAS_WEIGHTS] + sorted(_CONVERTERS)


# -- saving -----------------------------------------------------------------------------------
def save_preset(model, preset_dir, metadata=None, write_extra=None):
    """Writes a preset directory atomically: into a temporary sibling, then renamed into place.

    ``metadata``: entries of metadata.json beside the ones written here (versions, backend,
    class, parameter count, weights sha256, date). ``write_extra(directory)``: writes more
    files into the staged directory (a task's ``task.json`` and ``task.weights.h5``) and
    returns more metadata entries. An existing preset at `preset_dir` is replaced; any other
    non-empty directory is refused.
    """
    target = Path(preset_dir).resolve()
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"cannot save a preset to {target}: it is a file")
        if any(target.iterdir()) and not (target / CONFIG_FILE).exists():
            raise ValueError(f"cannot save a preset to {target}: the directory is not empty "
                             f"and holds no preset ({CONFIG_FILE} missing)")
    with staged_directory(target) as tmp:
        model.save_weights(str(tmp / WEIGHTS_FILE))
        config = keras.saving.serialize_keras_object(model)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        written = {
            "poa_keras_version": __version__,
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
            "class_name": type(model).__name__,
            "parameter_count": int(model.count_params()),
        }
        written.update(metadata or {})
        if write_extra is not None:
            written.update(write_extra(tmp) or {})
        written.update(
            weights_sha256=sha256_of(tmp / WEIGHTS_FILE),
            date_saved=datetime.datetime.now(datetime.timezone.utc).isoformat())
        (tmp / METADATA_FILE).write_text(json.dumps(written, indent=2))
    return target


# -- resolving a preset -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PresetSource:
    """What a preset holds, read and checked, before any model is built.

    Either ``config`` (a directory's serialized config) or ``config_name`` (a card's named
    configuration, built with the name ``name``) is set. ``weights`` is the local h5 file
    (None when weights are not wanted), ``weights_sha256`` its expected digest (or None).
    ``preprocessing`` is the preset's ``ImagePreprocessing`` (None: it records none, a preset
    saved before the record existed; the backbone's ``default_preprocessing()`` applies)."""

    where: str                    # "preset 'name'" / "preset '/dir'", for messages
    class_name: str
    registered_name: str
    config: dict | None = None
    config_name: str | None = None
    name: str | None = None
    quantization: str | None = None
    weights: Path | None = None
    weights_sha256: str | None = None
    preprocessing: ImagePreprocessing | None = None
    directory: Path | None = None   # where the preset's files are (a converted one's too)


def resolve(preset, load_weights=True) -> PresetSource:
    """A preset directory or registered name -> its ``PresetSource``: files read and checked,
    registered weights downloaded (once, into the Keras cache, sha256 checked) and converted
    when they are another format."""
    preset = os.fspath(preset)
    recover_directory(preset)   # a save killed between its two renames left the old one aside
    if os.path.isdir(preset):
        return read_directory(preset, load_weights)
    return _resolve_registered(preset, load_weights)


def read_directory(directory, load_weights=True, where=None) -> PresetSource:
    """The ``PresetSource`` of a preset directory (config.json and metadata.json read and
    checked; the weights file's presence and digest are checked when it is loaded)."""
    directory = Path(directory)
    where = where or f"preset {str(directory)!r}"
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{where} has no {CONFIG_FILE}; a preset directory holds "
                         f"{CONFIG_FILE}, {METADATA_FILE} and {WEIGHTS_FILE}")
    config = _read_json(config_path, where)
    class_name = config.get("class_name") if isinstance(config, dict) else None
    if class_name is None or "config" not in config:
        raise ValueError(f"{where}: {CONFIG_FILE} is not a serialized backbone "
                         "(no 'class_name'/'config')")
    metadata = {}
    if (directory / METADATA_FILE).is_file():
        metadata = _read_json(directory / METADATA_FILE, where)
    mode = metadata.get("quantization")
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"{where}: {METADATA_FILE} says quantization={mode!r}; known modes: "
                         f"{', '.join(repr(m) for m in QUANTIZE_MODES)}")
    return PresetSource(
        where=where, class_name=class_name,
        registered_name=config.get("registered_name") or registered_name_of(class_name),
        config=config["config"], quantization=mode,
        weights=directory / WEIGHTS_FILE if load_weights else None,
        weights_sha256=metadata.get("weights_sha256"), directory=directory,
        preprocessing=read_preprocessing(config["config"].get("preprocessing"),
                                         f"{where}: {CONFIG_FILE}"))


def read_preprocessing(record, where):
    """An ``ImagePreprocessing`` from a preset's record (a config dict, or None: none
    recorded); a ValueError naming ``where`` for a bad one."""
    try:
        return ImagePreprocessing.coerce(record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} has an invalid preprocessing record: {error}") from error


def _read_json(path, where):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: {Path(path).name} is not valid JSON ({error})") from error


def _resolve_registered(name, load_weights):
    card = get_card(name)
    arch = card["architecture"]
    where = f"preset {name!r}"
    weights = card.get("weights") or {}
    source = PresetSource(where=where, class_name=arch["class_name"],
                          registered_name=registered_name_of(arch["class_name"]),
                          config_name=arch["config_name"], name=name,
                          preprocessing=read_preprocessing(card.get("preprocessing"),
                                                           f"{where} (its zoo card)"))
    if not load_weights:
        return source
    if not weights.get("url") and not weights.get("file"):  # say so before anything is built
        status = weights.get("status", "not published")
        raise ValueError(
            f"preset {name!r} has no published weights ({status}). Use load_weights=False "
            "for the architecture with random weights, or pass a local preset directory.")
    fmt = weights.get("format", KERAS_WEIGHTS)
    if fmt != KERAS_WEIGHTS and fmt not in _CONVERTERS:
        raise ValueError(f"{where}: its weights are a {fmt!r} checkpoint and no converter is "
                         f"registered for that format; known formats: {weights_formats()} "
                         "(converters register with poa_keras.presets.register_converter)")
    if weights.get("file"):   # shipped inside the package, beside the card
        path = Path(str(_card_dir().joinpath(weights["file"])))
        if fmt != KERAS_WEIGHTS:
            raise ValueError(f"{where}: a packaged weights file must be Keras h5 weights")
        return dataclasses.replace(source, weights=path, weights_sha256=weights.get("sha256"))
    suffix = "weights.h5" if fmt == KERAS_WEIGHTS else f"{fmt}.checkpoint"
    with cache_lock(name):
        path, digest, first_use = download(name, weights["url"], weights.get("sha256"), suffix)
        if fmt == KERAS_WEIGHTS:
            if first_use:
                trust(name, path, digest)
            # its digest was just checked; the load checks nothing more
            return dataclasses.replace(source, weights=path)
        # Converted once per checkpoint, card architecture and poa_keras version (a new
        # release, a changed card or a fixed converter converts anew), then read from the cache
        converted = path.parent / f"preset_{fmt}_{digest[:16]}_{_conversion_key(card)}"
        if not (converted / CONFIG_FILE).is_file():
            print(f"{where}: converting {path.name} (once; the preset is cached in "
                  f"{converted})")
            try:
                _CONVERTERS[fmt](path, card, converted)
            except Exception:
                if first_use:   # never trusted: the next load downloads it again
                    path.unlink(missing_ok=True)
                raise
        if first_use:
            trust(name, path, digest)
    result = read_directory(converted, load_weights, where=f"{where} (converted from {fmt})")
    if result.preprocessing is None:   # the card's record, if the converter wrote none
        result = dataclasses.replace(result, preprocessing=source.preprocessing)
    return result


def _conversion_key(card):
    spec = json.dumps([card["architecture"], card.get("preprocessing"),
                       card["weights"].get("format"), __version__], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


TRUST_ON_FIRST_USE = "trust-on-first-use"


def cache_folder(name):
    """``<cache>/poa_keras/<name>/``, created: where a registered preset's files go."""
    root = Path(os.path.expanduser(cache_dir() or os.path.join("~", ".keras")))
    folder = root / "poa_keras" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def cache_lock(name):
    """Holds an exclusive lock on a preset's cache folder (download, check, conversion and
    trust record are one step: two processes loading the same preset do not interleave);
    a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:   # not POSIX
        yield
        return
    with open(cache_folder(name) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record_path(path):
    return Path(path).with_name(Path(path).name + ".sha256")


def download(name, url, sha256, suffix, record=True):
    """``(path, digest, first_use)`` of a registered preset's file: downloaded once
    (``keras.utils.get_file``, with its progress bar) into ``<cache>/poa_keras/<name>/<name>.<suffix>``
    and checked. Call it under ``cache_lock(name)``.

    One rule for every file: the digest it must have is ``sha256`` (the card's) or, where the
    publisher gives none (``sha256: null``, ``digest: trust-on-first-use``), the one recorded at
    its first use (``<file>.sha256``, kept when the file is deleted). ``first_use`` is True when
    neither exists: the caller records the digest with ``trust`` once the file proved usable
    (converted), so a file that fails is never trusted. ``record=False``: no record is read
    (a file that is not the card's). The download goes to a unique staging name and is renamed
    into place only once complete and checked, so an interrupted download leaves nothing a
    later load would take. A file whose digest disagrees, downloaded or cached, is removed (no
    poisoned cache) and refused, naming the preset, the expected and the actual digest. Only
    https:// and file:// URLs are fetched."""
    import urllib.parse
    import uuid

    scheme = urllib.parse.urlparse(str(url)).scheme
    if scheme not in ("https", "file"):
        raise ValueError(f"preset {name!r}: {url} is not an https:// or file:// URL")
    folder = cache_folder(name)
    final = folder / f"{name}.{suffix}"
    recorded = _record_path(final)
    from_record = not sha256 and record and recorded.is_file()
    expected = sha256 or (recorded.read_text().strip() if from_record else None)
    where = f"preset {name!r}"
    if final.is_file():
        return final, _check_digest(final, expected, where, recorded if from_record else None), \
            expected is None and record
    for stale in folder.glob(f".{final.name}*.partial"):   # downloads killed before the end
        stale.unlink(missing_ok=True)
    staging = folder / f".{final.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        keras.utils.get_file(fname=staging.name, origin=url, cache_dir=str(folder.parent.parent),
                             cache_subdir=os.path.join("poa_keras", name))
    except Exception as error:
        # Keras raises a plain Exception for HTTP and URL errors (anything else passes)
        staging.unlink(missing_ok=True)
        if type(error) is not Exception and not isinstance(error, OSError):
            raise
        raise ConnectionError(
            f"{where}: cannot download its weights from {url} ({error}). Check the network "
            "connection and try again, or download the file yourself and either put it at "
            f"{final} (its digest is checked) or convert it with `poa-keras convert --source="
            f"{name} --checkpoint=FILE --output=DIR` and load DIR.") from error
    digest = _check_digest(staging, expected, where, recorded if from_record else None,
                           shown=final.name)
    os.replace(staging, final)
    return final, digest, expected is None and record


def trust(name, path, digest):
    """Records ``digest`` as the one ``path`` (a registered preset's file) must keep
    (trust-on-first-use; see ``download``) and says so."""
    recorded = _record_path(path)
    tmp = recorded.with_name(recorded.name + ".tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, recorded)
    print(f"preset {name!r}: no published digest; first use of {Path(path).name}, sha256 "
          f"{digest} (trust-on-first-use: recorded in {recorded}; later loads are checked "
          "against it; paste it into the zoo card's weights.sha256 to pin it)")


def _check_digest(path, expected, where, record, shown=None):
    """The sha256 of ``path`` (hashed at every load: a cached file is checked each time);
    when it differs from ``expected`` the file is removed and a ValueError names the preset
    and both digests (and ``record``, the trust-on-first-use record the expected one came
    from, if so)."""
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        Path(path).unlink()
        origin = (f"recorded at its first use in {record}; if the publisher re-released the "
                  "file, delete that record to trust the new one" if record is not None else
                  "the card's")
        raise ValueError(f"{where}: {shown or Path(path).name} has sha256 {actual}, expected "
                         f"{expected} ({origin}); the file was removed from the cache (a "
                         "corrupted or tampered download, or a new release)")
    return actual


def cache_dir():
    """Where downloads and converted presets are cached: ``$KERAS_HOME`` (read at every call,
    so it may be set after Keras was imported; Keras reads it once, at import), else None:
    Keras' own cache (``~/.keras``). Files go below ``poa_keras/<preset name>/``. A
    ``$KERAS_HOME`` that does not exist yet is created (Keras would silently use /tmp)."""
    home = os.environ.get("KERAS_HOME")
    if home:
        os.makedirs(os.path.expanduser(home), exist_ok=True)
    return home or None


# -- task presets -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskSource:
    """The task files of a preset directory, read before any model is built: ``config`` (the
    task's config without its backbone), ``weights`` (task.weights.h5, or None when weights
    are not wanted) and its expected digest."""

    where: str
    class_name: str
    registered_name: str
    config: dict
    weights: Path | None = None
    weights_sha256: str | None = None


def read_task(preset, load_weights=True) -> TaskSource | None:
    """The ``TaskSource`` of a task preset (a directory, or a registered name whose converted
    checkpoint holds a classification head); None for a backbone-only preset."""
    directory = Path(os.fspath(preset))
    if not directory.is_dir() and load_weights and str(preset) in list_presets():
        directory = resolve(preset).directory   # a converted classifier (TinyViT's heads)
    if directory is None or not (directory / TASK_FILE).is_file():
        return None
    where = f"preset {str(directory)!r}"
    task = _read_json(directory / TASK_FILE, where)
    class_name = task.get("class_name") if isinstance(task, dict) else None
    if class_name is None or not isinstance(task.get("config"), dict):
        raise ValueError(f"{where}: {TASK_FILE} is not a serialized task "
                         "(no 'class_name'/'config')")
    metadata = {}
    if (directory / METADATA_FILE).is_file():
        metadata = _read_json(directory / METADATA_FILE, where)
    return TaskSource(
        where=where, class_name=class_name,
        registered_name=task.get("registered_name") or registered_name_of(class_name),
        config=task["config"],
        weights=directory / TASK_WEIGHTS_FILE if load_weights else None,
        weights_sha256=(metadata.get("task") or {}).get("weights_sha256"))


def save_variables(arrays, path):
    """Writes ``{name: array}`` as an h5 file, one dataset per name ("head/kernel" nests)."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=np.asarray(value))


def load_variables(path, expected_sha256, where):
    """``{name: numpy array}`` of an h5 file written by ``save_variables``, after checking
    that it exists and matches its digest (a clear error naming the file otherwise)."""
    import h5py
    import numpy as np

    path = check_weights_file(path, expected_sha256, where)
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: arrays.__setitem__(name, np.asarray(item))
                         if isinstance(item, h5py.Dataset) else None)
    except OSError as error:
        raise ValueError(f"{where}: cannot read {path}: the file is corrupted or truncated "
                         f"({error})") from error
    return arrays


# -- loading weights --------------------------------------------------------------------------
def check_weights_file(path, expected_sha256, where):
    """``path`` as a Path, after checking that the file exists and (when a digest is given)
    matches its sha256; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: weights file {path} is missing")
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ValueError(
                f"{where}: weights file {path} is corrupted or truncated: its sha256 is "
                f"{actual}, expected {expected_sha256} ({path.stat().st_size} bytes)")
    return path


def load_weights(model, weights_path, expected_sha256, where):
    """``model.load_weights`` of an h5 file after checking that it exists and matches its
    digest; every failure is a clear error naming the file."""
    weights_path = check_weights_file(weights_path, expected_sha256, where)
    try:
        model.load_weights(str(weights_path))
    except Exception as error:  # h5py/Keras say "unable to open", "shape mismatch", ...
        raise ValueError(f"{where}: cannot load weights from {weights_path}: the file is "
                         f"corrupted, truncated or of another architecture ({error})") from error


__all__ = ["CONFIG_FILE", "DECODER_FILE", "DECODER_WEIGHTS_FILE", "KERAS_WEIGHTS",
           "TRUST_ON_FIRST_USE", "cache_folder", "cache_lock", "download", "trust",
           "weights_status", "METADATA_FILE", "PresetSource", "TASK_FILE",
           "TASK_WEIGHTS_FILE", "TaskSource", "WEIGHTS_FILE", "cache_dir", "get_card",
           "list_presets", "load_variables", "load_weights", "read_directory",
           "read_preprocessing", "read_task", "register_converter", "registered_class",
           "registered_name_of", "resolve", "save_preset", "save_variables", "sha256_of",
           "sha256_of_text",
           "weights_formats"]

"""Reading PyTorch checkpoints (``torch.save``'s zip format, since PyTorch 1.6) into numpy arrays
WITHOUT PyTorch and without running pickled code.

    state = read_torch_checkpoint("dino_vitbase16_pretrain.pth")   # {"cls_token": ndarray, ...}
    state = read_torch_checkpoint("checkpoint.pth")["teacher"]     # DINO's full checkpoints

A ``.pth`` file is a zip archive: ``<name>/data.pkl`` (a pickle of the object structure) and
``<name>/data/<key>`` (the raw little-endian bytes of each tensor storage). The pickle is read
by a restricted unpickler whose ``find_class`` admits exactly the globals a checkpoint of
tensors needs, each mapped to a numpy stand-in, never the real callable:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``: a numpy array viewed from its
  storage with the tensor's offset, size and stride (copied, C-contiguous);
* ``torch.<Type>Storage`` (Float, Half, BFloat16, Double, Long, Int, Short, Char, Byte, Bool):
  the storage's dtype, resolved through ``persistent_load`` to the archive's bytes;
* ``collections.OrderedDict``: a dict;
* ``argparse.Namespace`` (DINO's and MAE's full checkpoints keep their arguments in one): a
  dict of its attributes.

Anything else (a function, a class of another module, ``os.system``...) is refused with a
ValueError naming the global, before it is created: nothing is executed. bfloat16 tensors come
back as float32 (numpy has no bfloat16). The legacy (non-zip) format of PyTorch < 1.6 is
refused, saying how to re-save it. This is the project's answer to "convert where torch
exists": the reader needs only numpy, so any backend converts a checkpoint.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np

# torch storage type -> (numpy dtype of the bytes, numpy dtype returned)
_STORAGES = {
    "FloatStorage": ("<f4", "<f4"), "HalfStorage": ("<f2", "<f2"),
    "BFloat16Storage": ("<u2", "<f4"), "DoubleStorage": ("<f8", "<f8"),
    "LongStorage": ("<i8", "<i8"), "IntStorage": ("<i4", "<i4"),
    "ShortStorage": ("<i2", "<i2"), "CharStorage": ("i1", "i1"),
    "ByteStorage": ("u1", "u1"), "BoolStorage": ("?", "?"),
}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Storage:
    """A storage's bytes as a flat numpy array of its dtype (bfloat16 widened to float32)."""

    def __init__(self, raw, name):
        stored, returned = _STORAGES[name]
        values = np.frombuffer(raw, dtype=stored)
        if name == "BFloat16Storage":   # the high half of a float32
            values = (values.astype("<u4") << 16).view("<f4")
        self.values = values.astype(returned, copy=False)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor in this checkpoint is not backed by a storage of the archive")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    values = storage.values
    where = f"a tensor of size {size} and stride {stride} at offset {offset}"
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or \
            any(s < 0 for s in stride):
        raise ValueError(f"{where}: negative or mismatched sizes, strides or offset; the file "
                         "is damaged or crafted")
    count = int(np.prod(size, dtype=np.int64)) if size else 1
    if count > max(len(values), 1):
        # no weight of a checkpoint is a broadcast view larger than its storage; refusing it
        # bounds the memory a crafted file can ask for by the size of the file itself
        raise ValueError(f"{where} has {count} elements, more than its storage's "
                         f"{len(values)}: refused (the file is damaged or crafted)")
    if not size:
        if offset >= len(values):
            raise ValueError(f"{where} overruns its storage of {len(values)} elements: the "
                             "file is damaged")
        return np.array(values[offset])
    last = offset + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
    if count > 0 and last >= len(values):
        raise ValueError(f"{where} overruns its storage of {len(values)} elements: the file "
                         "is damaged")
    view = np.lib.stride_tricks.as_strided(
        values[int(offset):], shape=size, strides=[s * values.itemsize for s in stride],
        writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
    return data


def _ordered_dict(*args):
    return dict(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _NamespaceState(dict):
    """What ``argparse.Namespace`` unpickles into: its attributes (set by BUILD as a state)."""

    def __setstate__(self, state):
        self.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data, archive, prefix, path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if (module, name) == ("argparse", "Namespace"):
            return _NamespaceState
        found = _ALLOWED.get((module, name))
        if found is None:
            raise ValueError(f"{self.path}: the checkpoint's pickle asks for {module}.{name}, "
                             f"which a checkpoint of tensors does not need; refused, nothing "
                             f"was executed (admitted: torch tensors and storages, "
                             f"collections.OrderedDict, argparse.Namespace)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"{self.path}: unknown persistent id {pid!r:.80} in the pickle; "
                             "refused")
        key = str(pid[2])
        if key not in self.storages:
            entry = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(entry)
            except KeyError:
                raise ValueError(f"{self.path}: the archive lacks {entry}: the file is "
                                 "truncated or damaged") from None
            if info.compress_type != zipfile.ZIP_STORED:
                # torch.save stores tensors uncompressed; a compressed entry could expand to
                # any size (a zip bomb)
                raise ValueError(f"{self.path}: {entry} is compressed, which torch.save never "
                                 "does; refused")
            raw = self.archive.read(entry)
            self.storages[key] = _Storage(raw, pid[1].name)
        return self.storages[key]


def _plain(value):
    """Namespaces as plain dicts, recursively in dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def read_torch_checkpoint(path):
    """The object a ``torch.save`` zip file holds, tensors as numpy arrays (module docstring).

    Raises ValueError (a legacy or damaged file, a pickle asking for anything but tensors,
    storages, OrderedDict or argparse.Namespace) and FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (torch.save since PyTorch 1.6): "
                         "a truncated download, or the legacy format; re-save it once with "
                         "torch.save(torch.load(path, weights_only=True), path)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")
                       and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError(f"{path}: expected one <name>/data.pkl in the archive, found "
                                 f"{pickles or 'none'}")
            if archive.getinfo(pickles[0]).compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {pickles[0]} is compressed, which torch.save never "
                                 "does; refused")
            prefix = pickles[0][:-len("data.pkl")]
            unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, path)
            try:
                result = unpickler.load()
            except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as error:
                raise ValueError(f"{path}: the checkpoint's pickle does not load "
                                 f"({type(error).__name__}: {error})") from None
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path}: a damaged zip archive ({error})") from None
    return _plain(result)


__all__ = ["read_torch_checkpoint"]

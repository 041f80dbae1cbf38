"""Reading PyTorch checkpoints without PyTorch and without running pickled code
(poa_keras/convert/torch_checkpoint.py): every tensor dtype and layout against torch itself,
DINO's argparse.Namespace, and crafted or damaged files refused with nothing executed."""
import argparse
import collections
import zipfile

import numpy as np
import pytest

from poa_keras.convert import read_torch_checkpoint

torch = pytest.importorskip("torch", reason="torch writes the reference files (the reader "
                                            "itself needs numpy only)")


def test_tensors_of_every_dtype_and_layout_equal_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    state = collections.OrderedDict(
        w=base, t=base.t(), s=base[1:, ::2], p=torch.nn.Parameter(torch.randn(3, generator=g)),
        h=torch.randn(5, generator=g).half(), b=torch.randn(2, 3, generator=g).bfloat16(),
        i=torch.arange(12).reshape(3, 4)[:, 1], bo=torch.tensor([True, False]),
        u=torch.arange(5, dtype=torch.uint8), scalar=torch.tensor(2.5), empty=torch.zeros(0, 3))
    path = tmp_path / "ckpt.pth"
    args = argparse.Namespace(arch="vit_small", patch_size=16, lr=5e-4)
    torch.save({"model": state, "epoch": 7, "args": args, "nested": [base[0], (base[1],)]},
               path)
    got = read_torch_checkpoint(path)
    assert got["epoch"] == 7 and got["args"] == {"arch": "vit_small", "patch_size": 16,
                                                 "lr": 5e-4}
    want = torch.load(path, weights_only=False)["model"]
    assert list(got["model"]) == list(want)
    for key, tensor in want.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 \
            else tensor.detach().numpy()
        assert got["model"][key].dtype == expected.dtype, key
        np.testing.assert_array_equal(got["model"][key], expected, err_msg=key)
    np.testing.assert_array_equal(got["nested"][1][0], base[1].numpy())


def _archive(path, payload, storages=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ckpt/data.pkl", payload)
        for key, raw in (storages or {}).items():
            archive.writestr(f"ckpt/data/{key}", raw)


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"),
                                          ("posix", "system"), ("torch", "load"),
                                          ("numpy", "load")])
def test_a_pickle_asking_for_anything_else_is_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / "ran"
    # GLOBAL module.name, then call it with one string argument (REDUCE)
    payload = (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X"
               + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode()
               + b"\x85R.")
    path = tmp_path / "evil.pth"
    _archive(path, payload)
    with pytest.raises(ValueError, match=f"asks for {module}.{name}.*refused, nothing was "
                                         "executed"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_damaged_and_legacy_files_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint .*truncated download"):
        read_torch_checkpoint(cut)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy format; re-save it once"):
        read_torch_checkpoint(legacy)
    # a storage entry missing from the archive
    with zipfile.ZipFile(good) as archive:
        pkl = archive.read([n for n in archive.namelist() if n.endswith("data.pkl")][0])
    missing = tmp_path / "missing.pth"
    _archive(missing, pkl)
    with pytest.raises(ValueError, match="lacks ckpt/data/0: the file is truncated"):
        read_torch_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_torch_checkpoint(tmp_path / "none.pth")
    # a tensor claiming more elements than its storage holds
    short = tmp_path / "short.pth"
    _archive(short, pkl, {"0": np.zeros(10, np.float32).tobytes()})
    with pytest.raises(ValueError, match="4096 elements, more than its storage's 10"):
        read_torch_checkpoint(short)
    not_pickle = tmp_path / "junk.pth"
    _archive(not_pickle, b"\x80\x02junk")
    with pytest.raises(ValueError, match="does not load"):
        read_torch_checkpoint(not_pickle)


class _StorageRef:
    """Pickled as the persistent id of storage "0" (10 floats) in a crafted archive."""


class _CraftedTensor:
    def __init__(self, offset, size, stride):
        self.args = (_StorageRef(), offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def _crafted(path, tensor):
    import io
    import pickle

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", 10)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": tensor})
    _archive(path, buffer.getvalue(), {"0": np.arange(10, dtype=np.float32).tobytes()})


@pytest.mark.parametrize("offset, size, stride, message", [
    (-2, (8,), (1,), "negative or mismatched"),          # would read past the buffer's end
    (4, (4,), (-3,), "negative or mismatched"),          # would read before its start
    (0, (10 ** 12, 1), (0, 1), "more than its storage"),  # a broadcast asking for terabytes
    (0, (4,), (1, 1), "negative or mismatched"),
    (8, (3,), (1,), "overruns its storage of 10"),
])
def test_crafted_tensor_geometry_is_refused(tmp_path, offset, size, stride, message):
    path = tmp_path / "crafted.pth"
    _crafted(path, _CraftedTensor(offset, size, stride))
    with pytest.raises(ValueError, match=message):
        read_torch_checkpoint(path)
    _crafted(path, _CraftedTensor(2, (2, 3), (4, 1)))   # a legitimate strided view reads
    np.testing.assert_array_equal(read_torch_checkpoint(path)["w"],
                                  [[2, 3, 4], [6, 7, 8]])


def test_a_compressed_entry_is_refused(tmp_path):
    path = tmp_path / "zipped.pth"
    torch.save({"w": torch.randn(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, raw in entries.items():
            archive.writestr(name, raw)
    with pytest.raises(ValueError, match="is compressed, which torch.save never does"):
        read_torch_checkpoint(path)


def test_tinyvit_from_an_official_state_dict_equals_the_numpy_reference(tmp_path):
    # the state dict in the official layout comes from test_tinyvit's own mapping, whose numpy
    # forward of the reference code checks it; it goes through a .pth file and the reader
    from conftest import to_np
    from test_tinyvit import numpy_tinyvit, official_classifier_state

    from poa_keras.backbones.tinyvit import CONFIGS
    from poa_keras.convert import tinyvit_config, tinyvit_from_state_dict

    _, sd = official_classifier_state("tinyvit_test", 7)
    rng = np.random.default_rng(4)
    sd["layers.1.blocks.0.attn.attention_bias_idxs"] = np.zeros((9, 9), np.int64)   # dropped
    path = tmp_path / "tiny_vit.pth"
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                "epoch": 3}, path)
    checkpoint = read_torch_checkpoint(path)

    config, classes = tinyvit_config(checkpoint)
    reference = CONFIGS["tinyvit_test"]
    assert classes == 7 and config["embed_dims"] == reference["embed_dims"]
    assert config["depths"] == reference["depths"]
    assert config["num_heads"][1:] == reference["num_heads"][1:]
    assert config["window_sizes"][1:] == reference["window_sizes"][1:]
    model = tinyvit_from_state_dict(checkpoint, image_size=32)
    images = rng.uniform(-1, 1, (2, 27, 41, 3)).astype("float32")
    ref = numpy_tinyvit(sd, reference, images)
    want = ref["pooled"] @ sd["head.weight"].T + sd["head.bias"]
    np.testing.assert_allclose(to_np(model(images)), want, rtol=1e-4, atol=1e-4)

    # every key exactly once: a missing, an unknown or a misshapen one is named
    state = dict(checkpoint["model"])
    del state["layers.2.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 key\(s\).*layers.2.blocks.1.mlp.fc2.bias"):
        tinyvit_from_state_dict(state, image_size=32)
    with pytest.raises(ValueError, match="does not use: \\['layers.1.extra'\\]"):
        tinyvit_from_state_dict(dict(checkpoint["model"], **{"layers.1.extra": np.zeros(2)}),
                                image_size=32)
    state = dict(checkpoint["model"])
    state["norm_head.weight"] = np.ones(25, np.float32)
    with pytest.raises(ValueError, match=r"norm_head.weight: shape \(25,\) does not fit"):
        tinyvit_from_state_dict(state, image_size=32)
    with pytest.raises(ValueError, match="not a TinyViT state dict"):
        tinyvit_from_state_dict({"cls_token": np.zeros((1, 1, 8), np.float32)})

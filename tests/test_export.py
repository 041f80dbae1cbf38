"""poa_keras.export: artefacts reloaded with their own runtimes (tf.saved_model, onnxruntime,
torch.export, tf.lite) against subnets extracted and quantized here, sizes against the files,
the int8 accuracy report against a numpy k-NN, the format matrix and its errors, atomic writes.

Cost: one int8 ViT export (the backend's default formats, k-NN on 96 images), one float Swin
and one float ResNet export to one format each, and cheap checks that fail before any export."""
import gc
import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from poa_keras import Backbone
from poa_keras import export as ex
from poa_keras.backbones import from_config_name
from poa_keras.data import load_shapes

BACKEND = keras.backend.backend()
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


HAVE_ONNX_TORCH = _have("onnx", "onnxscript", "onnxruntime")
HAVE_ONNX_TF = _have("onnx", "tf2onnx", "onnxruntime")


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shapes():
    (x_train, y_train), (x_val, y_val), _ = load_shapes(64, 32, image_size=32, seed=0)
    return (x_train, y_train), (x_val, y_val)


def _normalise(images):
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def _reference(model, x):
    """The in-memory outputs, computed here: jitted on JAX, eager elsewhere."""
    if BACKEND == "jax":
        out = model.compiled_forward()(x)
    else:
        out = model(x, training=False)
    return {k: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for k, v in out.items()}


def _raw_outputs(path, fmt, x, names):
    """Runs an artefact with its runtime, written here independently of export.run_artifact."""
    if fmt == "tf_saved_model":
        import tensorflow as tf
        loaded = tf.saved_model.load(str(path))
        out = {k: v.numpy() for k, v in loaded.serve(tf.constant(x)).items()}
    elif fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(None, {session.get_inputs()[0].name: x})
        out = dict(zip([o.name for o in session.get_outputs()], values))
    elif fmt == "torch":
        import torch
        with torch.no_grad():
            result = torch.export.load(str(path)).module()(torch.from_numpy(x))
        out = {k: v.numpy() for k, v in result.items()}
    elif fmt == "litert":
        import tensorflow as tf
        interpreter = tf.lite.Interpreter(model_path=str(path))
        signature = interpreter.get_signature_list()["serving_default"]
        out = interpreter.get_signature_runner()(**{signature["inputs"][0]: x})
    else:
        raise AssertionError(fmt)
    if not set(names) <= set(out):   # unnamed outputs (ONNX from torch): the model's order
        assert len(out) == len(names), (list(out), names)
        out = dict(zip(names, out.values()))
    return {k: np.asarray(out[k], np.float64) for k in names}


def _assert_same(got, ref, float_ref=None):
    """Float: within 1e-5 + 1e-5 |ref|. Int8 (float_ref given): rounding flips of the on-the-fly
    input quantization allowed, but the mean |diff| must stay far below the int8 error."""
    for name, r in ref.items():
        diff = np.abs(got[name] - r)
        if float_ref is None:
            np.testing.assert_allclose(got[name], r, atol=1e-5, rtol=1e-5, err_msg=name)
        else:
            error = np.abs(float_ref[name] - r).mean()
            assert error > 0, f"{name}: the int8 model equals the float one"
            assert diff.mean() <= 0.1 * error, (name, diff.mean(), error)


def _disk_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


def _knn_top1(bank, bank_y, queries, query_y, k, temperature, num_classes):
    """Weighted k-NN (DINO): cosine similarities, votes exp(sim / T), plain numpy."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), num_classes))
    rows = np.arange(len(queries))[:, None]
    np.add.at(votes, (np.broadcast_to(rows, top.shape), bank_y[top]),
              np.exp(sims[rows, top] / temperature))
    return float((votes.argmax(1) == query_y).mean())


def _expected_default_formats(family, quantize):
    formats = {"jax": ["tf_saved_model"], "tensorflow": ["tf_saved_model"],
               "torch": (["onnx"] if HAVE_ONNX_TORCH else []) + ["torch"]}[BACKEND]
    if BACKEND == "tensorflow" and family == "ElasticResNet" and HAVE_ONNX_TF:
        formats.append("onnx")
    if BACKEND == "tensorflow" and not quantize:
        formats += ["litert"] + (["openvino"] if _have("openvino") else [])
    return sorted(formats + ["preset"])


# Each format this backend exports, once across the three families (CI time: an ONNX or a
# SavedModel export of a tiny model costs 5 to 15 s on 2 cores).
FORMATS_UNDER_TEST = {
    ("vit_elastic_test", "jax"): ["tf_saved_model"],      # int8
    ("vit_elastic_test", "tensorflow"): ["tf_saved_model"],
    ("vit_elastic_test", "torch"): ["torch"],
    ("swin_elastic_test", "jax"): [],                      # the ViT covers JAX's one format
    ("swin_elastic_test", "tensorflow"): ["litert"],
    ("swin_elastic_test", "torch"): ["onnx"],
    ("resnet_elastic_test", "jax"): ["tf_saved_model"],
    ("resnet_elastic_test", "tensorflow"): ["onnx"],      # tf2onnx: ResNet only
    ("resnet_elastic_test", "torch"): ["torch"],
}


def _assert_same_weights(loaded, model):
    """A reloaded preset holds exactly the model's configuration and weights (dtypes too)."""
    assert loaded.get_config() == model.get_config()
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(loaded.weights, model.weights):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _quantized(model):
    gc.freeze()   # Keras collects garbage per quantized layer: slow with three frameworks
    try:
        model.quantize("int8")
    finally:
        gc.unfreeze()
    return model


def test_int8_vit_export_round_trip_and_accuracy_report(tmp_path, shapes):
    keras.utils.set_random_seed(0)
    # LayerScale 1 (not 1e-5): a random ViT whose features differ between images, so that
    # the k-NN and the int8 error are not degenerate.
    teacher = from_config_name("vit_elastic_test", layer_scale_init=1.0)
    out = tmp_path / "deploy"
    formats = FORMATS_UNDER_TEST[("vit_elastic_test", BACKEND)]
    report = ex.export_subnet(teacher, subnet="small", output=out, quantize="int8",
                              formats=formats, eval_data=shapes, progress=False)
    assert sorted(report["artifacts"]) == sorted(["preset", "preset_int8"] + formats)
    assert json.loads((out / "report.json").read_text()) == report
    assert report["subnet"] == {"width": 32, "depth": 2} and report["subnet_name"] == "small"

    float_model = teacher.extract("small")
    int8_model = _quantized(teacher.extract("small"))
    assert report["parameters"] == sum(int(np.prod(w.shape)) for w in float_model.weights
                                       if w.name != "range")   # not the quantizer ranges
    # One forward per model of every image (one compiled program each on JAX): the bank and
    # the queries of the k-NN; the first rows are the reference of the artefact checks.
    (x_train, y_train), (x_val, y_val) = shapes
    x_all = _normalise(np.concatenate([x_val, x_train]))
    ref = {"float32": _reference(float_model, x_all), "int8": _reference(int8_model, x_all)}

    names = ["cls", "patch_tokens", "pooled"]
    for name, entry in report["artifacts"].items():
        path = out / entry["path"]
        assert entry["bytes"] == _disk_bytes(path), name
        if name == "preset":
            _assert_same_weights(Backbone.from_preset(path), float_model)
            continue
        if name == "preset_int8":
            _assert_same_weights(ex.load_preset(path), int8_model)
            continue
        assert entry["precision"] == "int8", name
        n = 1 if entry["batch"] == 1 else 3
        got = _raw_outputs(path, name, x_all[:n], names)
        _assert_same(got, {k: v[:n] for k, v in ref["int8"].items()},
                     {k: v[:n] for k, v in ref["float32"].items()})
    # int8 kernels: the int8 preset is smaller than the float one
    assert report["artifacts"]["preset_int8"]["bytes"] < report["artifacts"]["preset"]["bytes"]
    _assert_same_weights(Backbone.from_preset(out / "preset_int8"), int8_model)

    # the accuracy report against a numpy k-NN of the features computed here
    acc = report["accuracy"]
    n_val = len(y_val)
    feats = {k: (r["cls"][n_val:], r["cls"][:n_val]) for k, r in ref.items()}
    float_top1 = _knn_top1(*feats["float32"][:1], y_train, feats["float32"][1], y_val, 20,
                           0.07, 10)
    int8_top1 = _knn_top1(feats["int8"][0], y_train, feats["int8"][1], y_val, 20, 0.07, 10)
    assert acc["num_train"] == len(y_train) and acc["num_val"] == n_val
    assert acc["float_top1"] == pytest.approx(float_top1, abs=1e-9)
    assert acc["int8_top1"] == pytest.approx(int8_top1, abs=1.01 / n_val)   # one flip
    assert acc["top1_change"] == pytest.approx(acc["int8_top1"] - acc["float_top1"], abs=1e-12)
    f, q = feats["float32"][1], feats["int8"][1]
    cos = (f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))
    assert acc["max_abs_feature_diff"] == pytest.approx(np.abs(f - q).max(), rel=0.5)
    assert acc["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-3)
    assert 0.9 < acc["mean_cosine"] < 1 - 1e-7 and acc["min_cosine"] <= acc["mean_cosine"]
    text = ex.format_report(report)
    assert "int8" in text and "change" in text and "preset_int8" in text


@pytest.mark.parametrize("config", ["swin_elastic_test", "resnet_elastic_test"])
def test_swin_and_resnet_export_round_trip(tmp_path, config):
    formats = list(FORMATS_UNDER_TEST[(config, BACKEND)])
    if "onnx" in formats and not (HAVE_ONNX_TF if BACKEND == "tensorflow" else HAVE_ONNX_TORCH):
        formats.remove("onnx")   # the test extra installs it; without it the preset stays
    keras.utils.set_random_seed(1)
    teacher = from_config_name(config)
    spec = teacher.subnets()[0]
    out = tmp_path / config
    report = ex.export_subnet(teacher, subnet=spec, output=out, formats=formats,
                              progress=False)
    assert sorted(report["artifacts"]) == sorted(["preset"] + formats)
    model = teacher.extract(spec)
    _assert_same_weights(Backbone.from_preset(out / "preset"), model)
    assert report["family"] == type(teacher).__name__
    assert report["parameters"] == sum(int(np.prod(w.shape)) for w in model.weights
                                       if w.name != "range")   # not quantizer ranges
    if not formats:
        return
    x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ref = _reference(model, x)
    for name, entry in report["artifacts"].items():
        path = out / entry["path"]
        assert entry["bytes"] == _disk_bytes(path) > 0 and entry["precision"] == "float32"
        if name == "preset":
            continue
        n = 1 if entry["batch"] == 1 else 3
        _assert_same(_raw_outputs(path, name, x[:n], list(ref)),
                     {k: v[:n] for k, v in ref.items()})


def test_format_matrix_and_errors(tmp_path):
    assert set(ex.FORMAT_SUPPORT) == {"jax", "tensorflow", "torch"}
    for backend, table in ex.FORMAT_SUPPORT.items():
        assert set(table) == set(ex.FORMATS), backend
        assert all(s.works or s.note for s in table.values()), backend   # a reason for every no
    available = ex.available_formats()
    assert available["preset"] is None
    for family in ("ElasticViT", "ElasticSwin", "ElasticResNet"):
        for quantize in (None, "int8"):
            assert sorted(ex.default_formats(family=family, quantize=quantize)) == \
                _expected_default_formats(family, quantize), (family, quantize)
    teacher = from_config_name("vit_elastic_test")
    out = tmp_path / "x"

    def fails(match, error=ValueError, **kwargs):
        with pytest.raises(error, match=match):
            ex.export_subnet(teacher, **{"subnet": "small", "output": out, "progress": False,
                                         **kwargs})
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    fails(r"unknown export format 'zip'.*valid formats.*'onnx'", formats=["zip"])
    fails(r"unknown quantize mode 'int4'.*'int8'", quantize="int4")
    fails(r"needs an output directory", output=None)
    fails(r"unknown named size 'huge'", subnet="huge")
    not_here = {"jax": "litert", "tensorflow": "torch", "torch": "tf_saved_model"}[BACKEND]
    fails(rf"format '{not_here}' cannot export an ElasticViT on the {BACKEND} backend.*"
          r"formats that work here: \['preset'", formats=[not_here])
    if BACKEND == "tensorflow":
        fails(r"'onnx' cannot export an ElasticViT.*Erfc", formats=["onnx"])
        fails(r"'litert' cannot export an int8 ElasticViT.*BatchMatMul", formats=["litert"],
              quantize="int8")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists.*overwrite=True"):
        ex.export_subnet(teacher, output=out, progress=False)
    with pytest.raises(FileExistsError, match="holds no export"):
        ex.export_subnet(teacher, output=out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_writes_are_atomic_and_overwrite_replaces(tmp_path, monkeypatch):
    teacher = from_config_name("vit_elastic_test")
    out = tmp_path / "deploy"
    calls = []

    def broken(path):   # the preset is written; its reload check fails
        calls.append(sorted(p.name for p in path.iterdir()))
        raise RuntimeError("reload exploded")

    monkeypatch.setattr(ex, "load_preset", broken)
    with pytest.raises(RuntimeError, match="reload exploded"):
        ex.export_subnet(teacher, subnet="small", output=out, progress=False)
    assert calls == [["config.json", "metadata.json", "model.weights.h5"]]
    assert list(tmp_path.iterdir()) == []          # no output, no temporary directory left
    monkeypatch.undo()

    first = ex.export_subnet(teacher, subnet="small", output=out, formats=["preset"],
                             progress=False)
    second = ex.export_subnet(teacher, subnet="base", output=out, formats=["preset"],
                              overwrite=True, progress=False)
    assert first["subnet"] == {"width": 32, "depth": 2}
    assert json.loads((out / "report.json").read_text())["subnet"] == {"width": 64, "depth": 2}
    assert second["accuracy"] is None
    assert Backbone.from_preset(out / "preset").embed_dim == 64
    assert [p.name for p in tmp_path.iterdir()] == ["deploy"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask   # as mkdir, not mkdtemp's 0o700


@pytest.mark.skipif(not (BACKEND == "tensorflow" and _have("openvino")),
                    reason="OpenVINO exports these models from the tensorflow backend only "
                           "(JAX: XlaCallModule unconverted; torch: jit.trace refuses dict "
                           "outputs) and needs the openvino package (~180 MB, not in the test "
                           "extra)")
def test_openvino_float_export(tmp_path):
    teacher = from_config_name("vit_elastic_test")
    report = ex.export_subnet(teacher, subnet="small", output=tmp_path / "ov",
                              formats=["openvino"], progress=False)
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    got = ex.run_artifact(tmp_path / "ov" / "openvino" / "model.xml", "openvino", x)
    _assert_same({k: np.asarray(v, np.float64) for k, v in got.items()},
                 _reference(teacher.extract("small"), x))
    assert report["artifacts"]["openvino"]["bytes"] > 0

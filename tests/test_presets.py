"""Presets: keras-hub layout, round trips, registry, atomic saves and every promised error."""
import json
import os

import numpy as np
import pytest
from conftest import randomize, to_np

from poa_keras import Backbone, ElasticViT, ImagePreprocessing, ViTSubnet, presets
from poa_keras.quantization import quantization_mode, quantize


@pytest.fixture(scope="module")
def teacher():
    model = ElasticViT.from_config_name("vit_elastic_test", name="teacher")
    randomize(model, seed=5)
    return model


@pytest.fixture(scope="module")
def preset_dir(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "teacher"
    teacher.save_to_preset(path)
    return path


def _same(a, b):
    for key in ("cls", "patch_tokens"):
        np.testing.assert_array_equal(to_np(a[key]), to_np(b[key]))


def test_layout_is_keras_hub(preset_dir):
    assert sorted(os.listdir(preset_dir)) == ["config.json", "metadata.json", "model.weights.h5"]
    config = json.loads((preset_dir / "config.json").read_text())
    assert config["class_name"] == "ElasticViT"
    assert config["registered_name"] == "poa_keras>ElasticViT"
    assert config["config"]["embed_dim"] == 64
    metadata = json.loads((preset_dir / "metadata.json").read_text())
    assert metadata["parameter_count"] > 0 and len(metadata["weights_sha256"]) == 64
    assert metadata["num_subnets"] == 9
    assert metadata["quantization"] is None


def test_round_trip_full(teacher, preset_dir, images):
    for cls in (ElasticViT, Backbone):
        loaded = cls.from_preset(str(preset_dir))
        assert isinstance(loaded, ElasticViT)
        _same(loaded(images), teacher(images))


def test_round_trip_with_width_and_depth(teacher, preset_dir, images):
    sub = Backbone.from_preset(preset_dir, width=48, depth=3)
    assert (sub.embed_dim, sub.depth) == (48, 3)
    _same(sub(images), teacher.extract(ViTSubnet(48, 3))(images))
    only_width = ElasticViT.from_preset(preset_dir, width=32)
    assert (only_width.embed_dim, only_width.depth) == (32, 4)
    named = ElasticViT.from_preset(preset_dir, subnet="small")
    assert (named.embed_dim, named.depth) == (32, 2)


def test_extracted_subnet_saves_as_a_preset(teacher, tmp_path, images):
    sub = teacher.extract(ViTSubnet(48, 2))
    sub.save_to_preset(tmp_path / "sub")
    _same(ElasticViT.from_preset(tmp_path / "sub")(images), sub(images))


def test_registered_presets():
    cards = presets.list_presets()
    assert {"poa_vit_l", "poa_vit_demo"} <= set(cards)
    for card in cards.values():
        assert {"name", "architecture", "weights", "license"} <= set(card)
    demo = Backbone.from_preset("poa_vit_demo", load_weights=False)
    assert isinstance(demo, ElasticViT) and len(demo.subnets()) == 16   # 4 widths x 4 depths
    small = Backbone.from_preset("poa_vit_demo", load_weights=False, width=96, depth=4)
    assert (small.embed_dim, small.depth) == (96, 4)


def test_unpublished_weights_say_so():
    with pytest.raises(ValueError, match=r"'poa_vit_l' has no published weights \(never published.*"
                                         r"load_weights=False"):
        Backbone.from_preset("poa_vit_l")


def test_registered_weights_are_downloaded_and_checked(teacher, preset_dir, monkeypatch,
                                                       tmp_path, images):
    """A card with a weights URL: fetched once into the Keras cache, sha256 checked (file://
    URL, so no network)."""
    weights = preset_dir / "model.weights.h5"
    card = {"name": "local_test", "architecture": {"class_name": "ElasticViT",
                                                     "config_name": "vit_elastic_test"},
            "license": "test", "weights": {"url": weights.as_uri(),
                                           "sha256": presets.sha256_of(weights)}}
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(presets, "list_presets", lambda: {"local_test": card})
    loaded = Backbone.from_preset("local_test")
    _same(loaded(images), teacher(images))
    card["weights"]["sha256"] = "0" * 64
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home2"))
    with pytest.raises(Exception, match="(?i)hash|sha256|corrupt"):
        Backbone.from_preset("local_test")


def test_a_registered_converter_plugs_into_loading(teacher, tmp_path, monkeypatch, images):
    """A card whose weights are another format (an official checkpoint) is converted once, by
    the converter registered for that format, into a preset cached beside the download; then
    it loads like any preset. Here the "checkpoint" is an npz of the weights (no pickles)."""
    checkpoint = tmp_path / "checkpoint.npz"
    np.savez(checkpoint, *teacher.get_weights())
    card = {"name": "converted_test", "license": "test",
            "architecture": {"class_name": "ElasticViT", "config_name": "vit_elastic_test"},
            "weights": {"url": checkpoint.as_uri(), "sha256": presets.sha256_of(checkpoint),
                        "format": "npz_unregistered"}}
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(presets, "list_presets", lambda: {"converted_test": card})
    with pytest.raises(ValueError, match=r"'npz_unregistered' checkpoint and no converter is "
                                         r"registered.*known formats: \['keras_h5'"):
        Backbone.from_preset("converted_test")
    calls = []

    def convert(path, card, output_dir):
        calls.append(path)
        with np.load(path) as arrays:   # allow_pickle=False: arrays only
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        arch = card["architecture"]
        model = ElasticViT.from_config_name(arch["config_name"], name=card["name"])
        model.set_weights(values)
        model.save_to_preset(output_dir)

    presets.register_converter("npz_test", convert)
    assert "npz_test" in presets.weights_formats()
    card["weights"]["format"] = "npz_test"
    loaded = Backbone.from_preset("converted_test")
    _same(loaded(images), teacher(images))
    sub = Backbone.from_preset("converted_test", width=48, depth=3)   # from the cache
    _same(sub(images), teacher.extract(ViTSubnet(48, 3))(images))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="other than 'keras_h5'"):
        presets.register_converter("keras_h5", convert)


# -- bad input -------------------------------------------------------------------------------
def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'vit_nope'.*known presets: \[.*"
                                         r"'poa_vit_l'"):
        Backbone.from_preset("vit_nope")


def test_width_off_the_grid_and_depth_out_of_range(preset_dir):
    with pytest.raises(ValueError, match=r"width=40 .*valid widths: \[32, 48, 64\]"):
        Backbone.from_preset(preset_dir, width=40)
    with pytest.raises(ValueError, match=r"depth=9 .*valid depths: 2\.\.4"):
        Backbone.from_preset(preset_dir, depth=9)


def test_int8_preset_round_trip(teacher, tmp_path, images):
    """A quantized model saves as a preset that from_preset loads back quantized: the same int8
    kernels, scales and float weights, the same outputs."""
    sub = teacher.extract(ViTSubnet(48, 3))
    quantize(sub, "int8")
    sub.save_to_preset(tmp_path / "int8")
    metadata = json.loads((tmp_path / "int8" / "metadata.json").read_text())
    assert metadata["quantization"] == "int8"
    loaded = Backbone.from_preset(tmp_path / "int8")
    assert quantization_mode(loaded) == "int8"
    assert [w.path for w in loaded.weights] == [w.path for w in sub.weights]
    dtypes = set()
    for got, want in zip(loaded.weights, sub.weights):
        dtypes.add(str(got.dtype))
        assert got.dtype == want.dtype, got.path
        np.testing.assert_array_equal(to_np(got), to_np(want), err_msg=got.path)
    assert dtypes == {"float32", "int8"}
    _same(loaded(images), sub(images))
    with pytest.raises(ValueError, match="holds int8 weights: sub-networks are extracted"):
        Backbone.from_preset(tmp_path / "int8", width=32)
    # without the metadata entry the int8 weights do not fit the float architecture
    metadata["quantization"] = "int4"
    (tmp_path / "int8" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"quantization='int4'; known modes: 'int8'"):
        Backbone.from_preset(tmp_path / "int8")
    del metadata["quantization"]
    (tmp_path / "int8" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="another architecture"):
        Backbone.from_preset(tmp_path / "int8")


def test_quantize_names_the_valid_modes(teacher):
    with pytest.raises(ValueError, match=r"unknown quantization mode 'int3'; valid: 'int8'"):
        quantize(teacher.extract(ViTSubnet(32, 2)), "int3")


def _copy_preset(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())


def test_truncated_weights_file(preset_dir, tmp_path):
    bad = tmp_path / "truncated"
    _copy_preset(preset_dir, bad)
    data = (bad / "model.weights.h5").read_bytes()
    (bad / "model.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        Backbone.from_preset(bad)
    # without a recorded checksum the h5 reader itself must fail, with our message around it
    meta = json.loads((bad / "metadata.json").read_text())
    del meta["weights_sha256"]
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupted, truncated or of another architecture"):
        Backbone.from_preset(bad)


def test_corrupted_weights_file(preset_dir, tmp_path):
    bad = tmp_path / "corrupted"
    _copy_preset(preset_dir, bad)
    data = bytearray((bad / "model.weights.h5").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (bad / "model.weights.h5").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or truncated.*sha256"):
        Backbone.from_preset(bad)


def test_missing_weights_file(preset_dir, tmp_path):
    bad = tmp_path / "missing"
    _copy_preset(preset_dir, bad)
    os.remove(bad / "model.weights.h5")
    with pytest.raises(FileNotFoundError, match="weights file .* is missing"):
        Backbone.from_preset(bad)
    assert ElasticViT.from_preset(bad, load_weights=False).embed_dim == 64


def test_preset_of_another_architecture(preset_dir, tmp_path):
    foreign = tmp_path / "keras_hub_vit"
    _copy_preset(preset_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config.update(class_name="ViTBackbone", registered_name="keras_hub>ViTBackbone")
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'ViTBackbone', which is not a poa_keras backbone; "
                                         r"known architectures: \['ElasticResNet', "
                                         r"'ElasticSwin', 'ElasticViT', 'ResNet', "
                                         r"'TinyViT'\]"):
        Backbone.from_preset(foreign)
    # same class, other shapes: weights of a 64-wide ViT into a 96-wide one
    other = tmp_path / "other_shapes"
    _copy_preset(preset_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["config"].update(embed_dim=96, min_width=32)
    (other / "config.json").write_text(json.dumps(config))
    meta = json.loads((other / "metadata.json").read_text())
    with pytest.raises(ValueError, match="another architecture"):
        Backbone.from_preset(other)
    assert meta  # the checksum matched: the mismatch is caught by the loader


def test_not_a_preset_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        Backbone.from_preset(tmp_path / "empty")


def test_save_is_atomic(teacher, tmp_path, monkeypatch):
    target = tmp_path / "atomic"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(teacher, "save_weights", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        teacher.save_to_preset(target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind
    monkeypatch.undo()
    teacher.save_to_preset(target)
    before = (target / "metadata.json").read_text()
    teacher.save_to_preset(target)  # replacing an existing preset works
    assert sorted(os.listdir(tmp_path)) == ["atomic"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask   # not mkdtemp's owner-only 0o700
    assert json.loads(before)["weights_sha256"] == json.loads(
        (target / "metadata.json").read_text())["weights_sha256"]


def test_save_refuses_a_directory_that_is_not_a_preset(teacher, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no preset"):
        teacher.save_to_preset(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


# ----- the preprocessing record (how images enter the model) -------------------------------------

def test_preprocessing_record_round_trips(teacher, tmp_path):
    """A recorded rule is in config.json, comes back on load (full network, an extracted size,
    ``presets.resolve`` without building a model), and an extracted subnet inherits it."""
    record = ImagePreprocessing(image_size=32, resize="resize", interpolation="bicubic",
                                pixel_normalization="minus_one_one", crop_pct=1.0)
    vit = ElasticViT.from_config(dict(teacher.get_config(), preprocessing=record.get_config()))
    vit.set_weights(teacher.get_weights())
    assert vit.preprocessing == record and vit.extract((48, 3)).preprocessing == record
    vit.save_to_preset(tmp_path / "rec")
    saved = json.loads((tmp_path / "rec" / "config.json").read_text())["config"]
    assert saved["preprocessing"] == {
        "image_size": [32, 32], "pixel_normalization": "minus_one_one",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize": "resize", "crop_pct": 1.0,
        "interpolation": "bicubic", "antialias": True, "value_range": [0, 255]}
    assert Backbone.from_preset(tmp_path / "rec").preprocessing == record
    assert Backbone.from_preset(tmp_path / "rec", width=32, depth=2).preprocessing == record
    assert presets.resolve(tmp_path / "rec").preprocessing == record


def test_preset_without_a_record_loads_with_the_default(teacher, preset_dir, tmp_path, images):
    """Presets saved before the record existed: ImageNet mean / std at the configuration's
    image size (the behaviour of evaluation before)."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("metadata.json", "model.weights.h5"):
        (old / name).write_bytes((preset_dir / name).read_bytes())
    config = json.loads((preset_dir / "config.json").read_text())
    del config["config"]["preprocessing"]
    (old / "config.json").write_text(json.dumps(config))
    assert presets.resolve(old).preprocessing is None
    loaded = Backbone.from_preset(old)
    assert loaded.preprocessing == ImagePreprocessing(image_size=32)
    assert loaded.preprocessing.pixel_normalization == "imagenet"
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    _same(loaded(images), teacher(images))


def test_a_bad_preprocessing_record_names_the_preset(preset_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((preset_dir / "config.json").read_text())
    config["config"]["preprocessing"]["interpolation"] = "cubic"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'.*bad'.*config.json has an invalid preprocessing "
                                         r"record: interpolation must be one of \('bilinear', "
                                         r"'bicubic', 'nearest'\), got 'cubic'"):
        Backbone.from_preset(bad, load_weights=False)


def test_loading_during_a_killed_save_gives_the_old_or_the_new_preset(teacher, preset_dir,
                                                                     tmp_path, images):
    """A preset save killed (in a child process, os._exit) at every step of the directory swap:
    from_preset then loads the old preset or the new one, never "unknown preset"; the next save
    leaves nothing beside the preset."""
    from test_files import killed_save

    other = ElasticViT.from_config_name("vit_elastic_test", name="teacher")
    other.set_weights([np.asarray(to_np(w)) * 0.5 for w in teacher.weights])
    new_dir = tmp_path / "new"
    other.save_to_preset(new_dir)
    old_out, new_out = teacher(images), other(images)
    for kill_at, expected in ((1, old_out), (2, old_out), (3, new_out)):
        target = tmp_path / f"killed_{kill_at}"
        teacher.save_to_preset(target)
        assert killed_save(target, kill_at, copy_from=new_dir) == 9
        assert target.exists() == (kill_at != 2)
        _same(Backbone.from_preset(target)(images), expected)
        other.save_to_preset(target)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(
            f".killed_{kill_at}")) == []


def test_size_is_checked_before_the_network_is_built_or_its_weights_fetched(
        preset_dir, monkeypatch, tmp_path):
    """A bad size fails against the configuration: nothing is built (the family's build is
    never called) and no weights are downloaded."""
    def no_build(self, input_shape=None):
        raise AssertionError("the network was built before the size was checked")

    monkeypatch.setattr(ElasticViT, "build", no_build)
    with pytest.raises(ValueError, match=r"width=40 .*valid widths: \[32, 48, 64\]"):
        Backbone.from_preset(preset_dir, width=40)
    with pytest.raises(ValueError, match=r"width must be an integer, got 64.5"):
        Backbone.from_preset(preset_dir, width=64.5)   # not truncated to 64
    with pytest.raises(ValueError, match=r"width=400 .*valid widths: \[384, 448"):
        Backbone.from_preset("poa_vit_l", width=400)   # a ViT-L/16 teacher: never built
    card = {"name": "remote", "architecture": {"class_name": "ElasticViT",
                                                 "config_name": "vit_elastic_test"},
            "license": "test", "weights": {"url": (tmp_path / "gone.h5").as_uri()}}
    monkeypatch.setattr(presets, "list_presets", lambda: {"remote": card})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    with pytest.raises(ValueError, match="width=40"):   # before the download
        Backbone.from_preset("remote", width=40)


def test_an_unreachable_weights_url_is_a_clear_error(monkeypatch, tmp_path):
    url = (tmp_path / "gone.h5").as_uri()
    card = {"name": "remote", "architecture": {"class_name": "ElasticViT",
                                                 "config_name": "vit_elastic_test"},
            "license": "test", "weights": {"url": url}}
    monkeypatch.setattr(presets, "list_presets", lambda: {"remote": card})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    with pytest.raises(ConnectionError, match=r"preset 'remote': cannot download its weights "
                                              rf"from {url} .*keras_home/poa_keras/remote/"):
        Backbone.from_preset("remote")

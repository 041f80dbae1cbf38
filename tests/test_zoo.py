"""The zoo: every card, docs/zoo.md's table (generated from the cards, so it cannot drift), and
a registered official checkpoint end to end through a file:// URL (no network): downloaded
once, its digest trusted on first use or checked against the card, converted once, cached;
a tampered cache, an interrupted download, an unreachable URL; `poa-keras convert`."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import to_np
from poa_keras import Backbone, ImageClassifier, convert, presets
from poa_keras.cli import ZOO_TABLE_BEGIN, ZOO_TABLE_END, zoo_table

torch = pytest.importorskip("torch", reason="torch writes the official test checkpoints")
ROOT = Path(__file__).resolve().parent.parent


def test_every_card_is_complete_and_names_a_buildable_architecture():
    cards = presets.list_presets()
    assert len(cards) >= 24
    for name, card in cards.items():
        assert card["name"] == name and card["license"] and card["description"], name
        weights = card["weights"]
        fmt = weights.get("format", presets.KERAS_WEIGHTS)
        assert fmt in presets.weights_formats(), (name, fmt)
        url = weights.get("url")
        assert url is None or url.startswith("https://"), name
        if not (url or weights.get("file")):
            assert weights.get("status"), f"{name}: no weights and no status saying why"
        if weights.get("sha256") is None and (url or weights.get("file")):
            assert weights.get("digest") == presets.TRUST_ON_FIRST_USE, name
        presets.read_preprocessing(card.get("preprocessing"), name)
        arch = card["architecture"]
        klass = presets.registered_class(presets.registered_name_of(arch["class_name"]))
        assert arch["config_name"] in klass.configs, name
    # the architectures' sizes, against the published counts (REFERENCE.md §5b)
    for name, count in (("dino_vit_s16", 21_665_664), ("dino_vit_b16", 85_798_656)):
        arch = cards[name]["architecture"]
        vit = presets.registered_class("poa_keras>ElasticViT")
        assert vit.unbuilt(config_name=arch["config_name"]).subnet_params() == count


def test_docs_zoo_table_is_the_one_the_cards_give():
    text = (ROOT / "docs" / "zoo.md").read_text()
    start, end = text.index(ZOO_TABLE_BEGIN) + len(ZOO_TABLE_BEGIN), text.index(ZOO_TABLE_END)
    assert text[start:end].strip() == zoo_table(), (
        "docs/zoo.md's table is out of date: replace it with the output of "
        "`python -c 'from poa_keras.cli import zoo_table; print(zoo_table())'`")


# ------------------------------------------------------------- a registered checkpoint, e2e

def _official_checkpoint(path, seed=0):
    from test_converters import official_vit_state

    # vit_elastic_test in DINOv2's layout: width 64, 4 blocks, patch 8, 4 x 4 grid
    state = official_vit_state(np.random.default_rng(seed), 64, 4, 8, 4, layer_scale=True,
                               mask_token=True)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return state


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A card of format dinov2_pth whose URL is a local file (file://), in a fresh cache."""
    source = tmp_path / "published" / "ckpt.pth"
    source.parent.mkdir()
    state = _official_checkpoint(source)
    card = {"name": "zoo_test", "license": "test", "description": "test",
            "architecture": {"class_name": "ElasticViT", "config_name": "vit_elastic_test"},
            "weights": {"format": "dinov2_pth", "url": source.as_uri(), "sha256": None,
                        "digest": presets.TRUST_ON_FIRST_USE},
            "preprocessing": {"image_size": 40, "crop_pct": 0.8, "interpolation": "bicubic"}}
    monkeypatch.setattr(presets, "list_presets", lambda: {"zoo_test": card})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    folder = tmp_path / "keras_home" / "poa_keras" / "zoo_test"
    return card, source, state, folder


def test_trust_on_first_use_then_every_load_is_checked(registered, capsys):
    card, source, state, folder = registered
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    model = Backbone.from_preset("zoo_test")
    out = capsys.readouterr().out
    digest = presets.sha256_of(source)
    assert f"sha256 {digest}" in out and "trust-on-first-use" in out and "converting" in out
    record = folder / "zoo_test.dinov2_pth.checkpoint.sha256"
    assert record.read_text().strip() == digest
    want, _, _ = convert.convert_checkpoint(convert.read_torch_checkpoint(source), card)
    np.testing.assert_array_equal(to_np(model(x)["cls"]), to_np(want(x)["cls"]))
    np.testing.assert_array_equal(to_np(model.cls_token), state["cls_token"])
    assert model.preprocessing == presets.read_preprocessing(card["preprocessing"], "card")
    config = json.loads(next(folder.glob("preset_*/config.json")).read_text())
    assert config["config"]["preprocessing"]["crop_pct"] == 0.8   # the preset records it
    # a second load: from the cache, no download and no conversion; a size extracted
    small = Backbone.from_preset("zoo_test", width=32, depth=2)
    assert "converting" not in capsys.readouterr().out and small.embed_dim == 32

    # the cached file tampered with: refused by name and digests, removed (record kept)
    cached = folder / "zoo_test.dinov2_pth.checkpoint"
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match=rf"preset 'zoo_test': zoo_test.dinov2_pth.checkpoint "
                                         rf"has sha256 [0-9a-f]{{64}}, expected {digest}"):
        Backbone.from_preset("zoo_test")
    assert not cached.exists() and record.exists()
    # the published file changed: the new download disagrees with the digest first trusted
    _official_checkpoint(source, seed=2)
    with pytest.raises(ValueError, match=f"expected {digest}.*removed from the cache"):
        Backbone.from_preset("zoo_test")
    assert not cached.exists() and not list(folder.glob(".*partial"))


def test_an_interrupted_download_leaves_nothing_a_later_load_takes(registered):
    card, source, state, folder = registered
    folder.mkdir(parents=True)
    # a download killed half-way leaves its staging file: never taken as the checkpoint
    (folder / ".zoo_test.dinov2_pth.checkpoint.1f2e3d.partial").write_bytes(
        source.read_bytes()[:1000])
    model = Backbone.from_preset("zoo_test")
    np.testing.assert_array_equal(to_np(model.cls_token), state["cls_token"])
    assert not list(folder.glob(".*partial"))


def test_a_published_digest_is_checked_and_a_mismatch_is_not_cached(registered):
    card, source, state, folder = registered
    card["weights"]["sha256"] = "f" * 64
    with pytest.raises(ValueError, match=f"expected {'f' * 64}"):
        Backbone.from_preset("zoo_test")
    assert not [p for p in folder.iterdir() if p.name != ".lock"]   # nothing kept, no record
    card["weights"]["sha256"] = presets.sha256_of(source)
    Backbone.from_preset("zoo_test")


def test_a_first_download_that_fails_to_convert_is_never_trusted(registered, capsys):
    card, source, state, folder = registered
    from test_converters import official_vit_state

    wrong = official_vit_state(np.random.default_rng(0), 96, 4, 8, 4, layer_scale=True,
                               mask_token=True)
    torch.save({k: torch.from_numpy(v) for k, v in wrong.items()}, source)
    with pytest.raises(ValueError, match=r"cls_token: shape \(1, 1, 96\) does not fit"):
        Backbone.from_preset("zoo_test")
    # neither the file nor a digest stays: the corrected upstream file is taken next time
    assert not list(folder.glob("zoo_test.*"))
    _official_checkpoint(source)
    Backbone.from_preset("zoo_test")
    assert "trust-on-first-use" in capsys.readouterr().out
    assert (folder / "zoo_test.dinov2_pth.checkpoint.sha256").is_file()


def test_an_unreachable_url_says_how_to_provide_the_file(registered):
    card, source, state, folder = registered
    card["weights"]["url"] = (source.parent / "gone.pth").as_uri()
    with pytest.raises(ConnectionError, match=r"cannot download its weights from .*gone.pth.*"
                                              r"poa-keras convert --source=zoo_test"):
        Backbone.from_preset("zoo_test")


def test_a_converted_classifier_loads_with_its_head(tmp_path, monkeypatch):
    """TinyViT's 1k / 22k files hold a head: the converted preset is a task preset."""
    from test_tinyvit import official_classifier_state

    source, sd = official_classifier_state("tinyvit_test", 7)
    rng = np.random.default_rng(4)
    path = tmp_path / "tiny_vit.pth"
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
               path)
    card = {"name": "tinyvit_zoo_test", "license": "test", "description": "test",
            "architecture": {"class_name": "TinyViT", "config_name": "tinyvit_test"},
            "weights": {"format": "tinyvit_pth", "url": path.as_uri(), "sha256": None,
                        "digest": presets.TRUST_ON_FIRST_USE}}
    monkeypatch.setattr(presets, "list_presets", lambda: {"tinyvit_zoo_test": card})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    from test_converters import run_inference

    classifier = ImageClassifier.from_preset("tinyvit_zoo_test")
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    pooled = to_np(run_inference(source, x)["pooled"])
    want = pooled @ sd["head.weight"].T + sd["head.bias"]
    np.testing.assert_allclose(to_np(run_inference(classifier, x)), want, atol=1e-4,
                               rtol=1e-4)
    meta = json.loads(next((tmp_path / "keras_home").rglob("metadata.json")).read_text())
    assert meta["converted_from"]["sha256"] == presets.sha256_of(path) and "task" in meta
    backbone = Backbone.from_preset("tinyvit_zoo_test")
    np.testing.assert_allclose(to_np(run_inference(backbone, x)["pooled"]), pooled,
                               atol=1e-5)


# -------------------------------------------------------------------------- poa-keras convert

def test_convert_command_writes_the_preset_and_prints_the_digest(registered, cli, tmp_path):
    card, source, state, folder = registered
    code, out, err = cli("convert", "--source=zoo_test", f"--checkpoint={source}",
                         f"--output={tmp_path / 'out'}")
    assert code == 0, err
    assert f"sha256 of the checkpoint: {presets.sha256_of(source)}" in out
    assert "paste it into zoo/zoo_test.json" in out
    model = Backbone.from_preset(tmp_path / "out")
    np.testing.assert_array_equal(to_np(model.cls_token), state["cls_token"])
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["converted_from"]["sha256"] == presets.sha256_of(source)
    # from the card's URL (file://), through the cache
    code, out, err = cli("convert", "--source=zoo_test", f"--output={tmp_path / 'out2'}")
    assert code == 0, err


def test_convert_command_from_another_url_leaves_the_card_alone(registered, cli, tmp_path):
    card, source, state, folder = registered
    other = tmp_path / "mirror" / "copy.pth"
    other.parent.mkdir()
    other.write_bytes(source.read_bytes())
    code, out, err = cli("convert", "--source=zoo_test", f"--checkpoint={other.as_uri()}",
                         f"--output={tmp_path / 'out'}")
    assert code == 0, err
    assert not list(folder.glob("*.sha256"))   # a mirror's file is not the card's trust record
    assert not (folder / "zoo_test.dinov2_pth.checkpoint").exists()
    code, _, err = cli("convert", "--source=zoo_test", "--checkpoint=http://example.com/x.pth",
                       f"--output={tmp_path / 'out2'}")
    assert code == 1 and "not an https:// or file:// URL" in err
    code, _, err = cli("convert", "--source=zoo_test",
                       f"--checkpoint={(tmp_path / 'gone.pth').as_uri()}",
                       f"--output={tmp_path / 'out3'}")
    assert code == 1 and "cannot download its weights from" in err and \
        "--checkpoint=FILE" in err


def test_convert_command_bad_input(registered, cli, tmp_path):
    card, source, state, folder = registered
    out_dir = f"--output={tmp_path / 'out'}"
    code, _, err = cli("convert", "--source=dino_vit_z16", f"--checkpoint={source}", out_dir)
    assert code == 1 and "got 'dino_vit_z16'; valid: zoo_test" in err
    code, _, err = cli("convert", "--source=zoo_test", f"--checkpoint={tmp_path / 'no.pth'}",
                       out_dir)
    assert code == 1 and "no such file" in err
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.read_bytes()[:5000])
    code, _, err = cli("convert", "--source=zoo_test", f"--checkpoint={cut}", out_dir)
    assert code == 1 and "not a PyTorch zip checkpoint" in err and "truncated download" in err
    # a checkpoint of another architecture: the shape that disagrees is named
    other = tmp_path / "other.pth"
    from test_converters import official_vit_state

    sd = official_vit_state(np.random.default_rng(0), 96, 4, 8, 4, layer_scale=True,
                            mask_token=True)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, other)
    code, _, err = cli("convert", "--source=zoo_test", f"--checkpoint={other}", out_dir)
    assert code == 1 and "cls_token: shape (1, 1, 96) does not fit zoo_test" in err, err
    assert not (tmp_path / "out").exists()   # nothing half written


# ------------------------------------------------------- elastify, and training from a release

def _dense_preset(tmp_path, seed=0):
    """A small released-style DENSE ViT (DINO's layout: no LayerScale, no mask token), converted
    and saved as a preset: width 64, 2 blocks, patch 8, 32 x 32 images."""
    from test_converters import official_vit_state

    state = official_vit_state(np.random.default_rng(seed), 64, 2, 8, 4)
    card = {"name": "dense_test", "architecture": {"class_name": "ElasticViT",
                                                   "config_name": "vit_elastic_test"},
            "weights": {"format": "dino_pth"}}
    model, _, _ = convert.convert_checkpoint(
        state, card, depth=2, min_width=64, min_depth=2, layer_scale_init=None,
        use_mask_token=False, named_subnets=None)
    model.save_to_preset(tmp_path / "dense")
    return model, tmp_path / "dense"


def test_elastify_a_released_dense_model(tmp_path):
    from poa_keras import ElasticViT, ViTSubnet

    dense, path = _dense_preset(tmp_path)
    elastic = ElasticViT.elastify(path, min_width=32, min_depth=1, use_mask_token=True)
    assert elastic.widths == [32, 48, 64] and elastic.depths == [1, 2]
    x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(to_np(elastic(x)["cls"]), to_np(dense(x)["cls"]), atol=1e-6)
    np.testing.assert_array_equal(to_np(elastic.mask_token), np.zeros(64, np.float32))
    spec = ViTSubnet(32, 1)   # a slice of the released weights, standalone
    np.testing.assert_allclose(to_np(elastic.extract(spec)(x)["cls"]),
                               to_np(elastic(x, subnet=spec)["cls"]), atol=1e-5)
    with pytest.raises(ValueError, match=r"\['min_widht'\] are not ElasticViT arguments; "
                                         r"valid: \[.*'min_width'"):
        ElasticViT.elastify(path, min_widht=32)
    with pytest.raises(ValueError, match="holds a ElasticViT, not a TinyViT"):
        from poa_keras import TinyViT

        TinyViT.elastify(path)


def test_a_pretraining_recipe_starts_from_a_released_model(tmp_path):
    """backbone.init: POA's student (and so its EMA teacher) start from the release; the
    elastic grid is the recipe's."""
    from poa_keras.pretrain import build_trainer, load_recipe, validate_recipe

    dense, path = _dense_preset(tmp_path)
    recipe = load_recipe("demo", [
        "backbone.config='vit_elastic_test'", "backbone.depth=2", "backbone.min_depth=1",
        "backbone.layer_scale_init=None", f"backbone.init={str(path)!r}",
        "backbone.named_subnets=None"])
    validate_recipe(recipe)
    trainer = build_trainer(recipe, steps=2)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    for model in (trainer.backbone, trainer.teacher_backbone):
        np.testing.assert_allclose(to_np(model(x)["cls"]), to_np(dense(x)["cls"]), atol=1e-6)
    other = load_recipe("demo", [
        "backbone.config='vit_elastic_test'", "backbone.depth=2", "backbone.min_depth=1",
        "backbone.layer_scale_init=None", f"backbone.init={str(path)!r}",
        "backbone.named_subnets=None", "data.normalize='minus_one_one'"])
    with pytest.warns(UserWarning, match=r"mean \(0.485.*this recipe's data are normalised "
                                         r"with mean \(0.5, 0.5, 0.5\)"):
        build_trainer(validate_recipe(other), steps=2)
    bad = load_recipe("demo", [f"backbone.init={str(path)!r}"])   # 96 wide: does not fit
    with pytest.raises(ValueError, match=r"backbone.init=.* does not fit the recipe's "
                                         r"backbone: .*shape"):
        build_trainer(validate_recipe(bad), steps=2)


def test_mae_pretraining_continues_from_a_full_checkpoint(tmp_path):
    """head.init: the decoder of a converted full MAE file (its preset keeps it)."""
    from test_converters import official_mae_state

    from poa_keras.pretrain import build_trainer, load_recipe, validate_recipe

    state = official_mae_state(np.random.default_rng(0), 64, 4, 4, 8, decoder=(32, 1))
    path = tmp_path / "mae_full.pth"
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                          state.items()}}, path)
    card = {"name": "mae_full_test", "architecture": {
        "class_name": "ElasticViT", "config_name": "vit_mae_demo",
        "decoder": {"dim": 32, "depth": 1, "num_heads": 2}}, "weights": {"format": "mae_pth"}}
    convert.convert_file(path, card, tmp_path / "mae_preset")
    recipe = load_recipe("demo_mae", [f"backbone.init={str(tmp_path / 'mae_preset')!r}",
                                      f"head.init={str(tmp_path / 'mae_preset')!r}"])
    trainer = build_trainer(validate_recipe(recipe), steps=2)
    np.testing.assert_array_equal(to_np(trainer.decoder.mask_token), state["mask_token"])
    np.testing.assert_array_equal(to_np(trainer.decoder.decoder_pred.dense.kernel),
                                  state["decoder_pred.weight"].T)
    np.testing.assert_array_equal(to_np(trainer.backbone.cls_token), state["cls_token"])
    wrong = load_recipe("demo_mae", [f"head.init={str(tmp_path / 'mae_preset')!r}",
                                     "head.dim=48", "head.num_heads=3"])
    with pytest.raises(ValueError, match=r"its decoder \(dim 32, depth 1, num_heads 2\) does "
                                         r"not fit the recipe's head \(dim 48"):
        build_trainer(validate_recipe(wrong), steps=2)
    encoder = {k: v for k, v in state.items() if not k.startswith("decoder") and
               k != "mask_token"}
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                          encoder.items()}}, tmp_path / "mae_encoder.pth")
    card["architecture"].pop("decoder")
    convert.convert_file(tmp_path / "mae_encoder.pth", card, tmp_path / "encoder_preset")
    encoder_only = load_recipe("demo_mae", [f"head.init={str(tmp_path / 'encoder_preset')!r}"])
    with pytest.raises(ValueError, match="holds no MAE decoder.*convert a full MAE checkpoint"):
        build_trainer(validate_recipe(encoder_only), steps=2)


def test_the_shipped_demo_teacher_is_trained_and_loads_offline():
    from poa_keras.data import load_shapes
    from poa_keras.eval import knn_eval

    card = presets.get_card("poa_vit_demo")
    weights = presets.resolve("poa_vit_demo").weights
    assert presets.sha256_of(weights) == card["weights"]["sha256"]
    small = Backbone.from_preset("poa_vit_demo", width=64, depth=4)
    assert (small.embed_dim, small.depth) == (64, 4)
    # trained: k-NN of its smallest and intact subnets on held-out shapes images, far above
    # chance (10 classes); an untrained network of this configuration stays near it
    teacher = Backbone.from_preset("poa_vit_demo")
    untrained = Backbone.from_preset("poa_vit_demo", load_weights=False)
    (x_train, y_train), (x_val, y_val), _ = load_shapes(num_train=400, num_val=200,
                                                        image_size=32, seed=5)
    base = knn_eval(untrained, x_train, y_train, x_val, y_val, subnet="large", ks=(20,))[20]
    for spec in ("small", "large"):
        top1 = knn_eval(teacher, x_train, y_train, x_val, y_val, subnet=spec, ks=(20,))[20]
        assert top1["top1"] > 0.3 and top1["top1"] > base["top1"] + 0.15, (spec, top1, base)

"""preprocessing.py: the rule every preset records (size, resize and crop, interpolation,
mean / std), checked against numpy normalisation and tf.image.resize written out by hand; uint8
images through extract_features, the sweep and the export; the bare backbone's uint8 error;
bad values; the pretraining record."""
import keras
import numpy as np
import pytest
from conftest import randomize, to_np

from poa_keras import ElasticViT, ImagePreprocessing
from poa_keras.eval import extract_features, sweep
from poa_keras.export import export_subnet
from poa_keras.pretrain import data_preprocessing

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def by_hand(images, mean, std):
    """The documented normalisation, in float64: (x / 255 - mean) / std."""
    return ((images.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def vit():
    model = ElasticViT.from_config_name("vit_elastic_test", name="prep_vit")
    randomize(model, seed=3)
    return model


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3)).astype(np.uint8)


def test_uint8_features_equal_the_documented_normalisation(vit, pixels):
    """Images at the input size: only normalised, by the record of the backbone (default
    ImageNet; a recorded "minus_one_one" gives 2 x / 255 - 1)."""
    for record, (mean, std) in ((None, (IMAGENET_MEAN, IMAGENET_STD)),
                                ("minus_one_one", (0.5, 0.5))):
        vit.preprocessing = None if record is None else \
            ImagePreprocessing(32, pixel_normalization=record)
        try:
            manual = by_hand(pixels, mean, std)
            np.testing.assert_allclose(vit.preprocessing.numpy(pixels), manual, atol=1e-6)
            np.testing.assert_allclose(to_np(vit.preprocessing(pixels)), manual, atol=1e-6)
            got = extract_features(vit, pixels, subnet=(48, 3), batch_size=4, normalize=False)
            want = extract_features(vit, manual, subnet=(48, 3), batch_size=4,
                                    normalize=False)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        finally:
            vit.preprocessing = None


def test_resize_and_centre_crop_against_tf_image_resize():
    """timm's evaluation rule written out: cover floor(32 / 0.875) = 36, so the shorter side 40
    -> 36 and the longer 48 -> int(36 * 48 / 40) = 43; then the centred 32 x 32 crop, rows
    (36 - 32) / 2 = 2 and columns round(11 / 2) = 6 on."""
    import tensorflow as tf

    images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 48, 3)).astype(np.uint8)
    for interpolation in ("bilinear", "bicubic"):
        prep = ImagePreprocessing(32, crop_pct=0.875, interpolation=interpolation,
                                  pixel_normalization="minus_one_one")
        resized = tf.image.resize(images.astype(np.float32), (36, 43), method=interpolation,
                                  antialias=True).numpy()
        expected = (np.clip(resized, 0, 255)[:, 2:34, 6:38] / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(prep.numpy(images), expected, atol=1e-5)
        np.testing.assert_allclose(to_np(prep(images)), expected, atol=1e-5)
    # "resize": straight to the size (aspect not kept); grayscale repeated to RGB.
    gray = images[:, :24, :20, :1]
    prep = ImagePreprocessing(32, resize="resize", pixel_normalization=None)
    resized = tf.image.resize(gray.astype(np.float32), (32, 32), antialias=True).numpy()
    np.testing.assert_allclose(prep.numpy(gray), np.repeat(resized / 255.0, 3, axis=-1),
                               atol=1e-5)


def test_bare_backbone_refuses_uint8_and_names_its_preprocessing(vit, pixels):
    with pytest.raises(ValueError) as error:
        vit(pixels[:2])
    message = str(error.value)
    for part in ("prep_vit (ElasticViT) takes float images", "got uint8",
                 "resize_shorter_then_center_crop to 32x32", "pixel_normalization='imagenet'",
                 "mean (0.485, 0.456, 0.406)", "backbone.preprocessing(images)"):
        assert part in message, (part, message)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(interpolation="cubic"), ValueError,
     r"interpolation must be one of \('bilinear', 'bicubic', 'nearest'\), got 'cubic'"),
    (dict(resize="crop"), ValueError, r"resize must be one of \('resize_shorter_then_center_"
                                      r"crop', 'resize'\), got 'crop'"),
    (dict(pixel_normalization="zscore"), ValueError, r"pixel_normalization must be one of "
                                                     r"\('imagenet', 'minus_one_one', None, "
                                                     r"'custom'\), got 'zscore'"),
    (dict(pixel_normalization="custom", mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), ValueError,
     "mean and std must have one value or one per channel each, got 2 and 3"),
    (dict(pixel_normalization="custom", mean=0.5, std=(0.2, -0.1, 0.2)), ValueError,
     r"std must be > 0 for every channel, got \(0.2, -0.1, 0.2\)"),
    (dict(pixel_normalization="custom", mean=0.5), ValueError, "needs both mean and std"),
    (dict(mean=(0.5, 0.5, 0.5)), ValueError, "are not the 'imagenet' normalisation's .*"
                                             'pixel_normalization="custom"'),
    (dict(crop_pct=1.5), ValueError, r"crop_pct must be a number in \(0, 1\], got 1.5"),
    (dict(image_size=0), ValueError, "image_size must be an int >= 1, .* got 0"),
    (dict(value_range=(255, 0)), ValueError, "value_range must be .* low < high"),
])
def test_bad_values_name_the_valid_ones(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImagePreprocessing(**kwargs)


def test_config_round_trip_and_errors():
    prep = ImagePreprocessing((24, 32), pixel_normalization="custom", mean=0.5, std=0.25,
                              crop_pct=0.9, interpolation="nearest", value_range=(0, 1))
    assert ImagePreprocessing.from_config(prep.get_config()) == prep
    assert keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(prep)) == prep
    with pytest.raises(ValueError, match=r"unknown preprocessing fields \['size'\]"):
        ImagePreprocessing.from_config({"size": 32})
    with pytest.raises(ValueError, match="images have 2 channels; .* mean and std have 3"):
        ImagePreprocessing(32).numpy(np.zeros((1, 32, 32, 2), np.uint8))


def test_sweep_and_export_take_uint8_of_another_size(vit, tmp_path):
    """40 x 40 uint8 images are resized to the recorded 32 x 32 (FLOPs counted there) and
    give the features of the same images preprocessed by hand."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(8, 40, 40, 3)).astype(np.uint8)
    y = np.arange(8) % 2
    prep = vit.preprocessing
    result = sweep(vit, (x[:6], y[:6]), (x[6:], y[6:]), subnets=[(32, 2)], ks=(3,),
                   batch_size=2, measure_latency=False, progress=False)
    assert result.metadata["image_size"] == [32, 32]
    assert result.metadata["preprocessing"] == prep.get_config()
    assert result.rows[0]["flops"] == vit.subnet_flops(vit.resolve_subnet((32, 2)),
                                                       image_size=32)
    np.testing.assert_allclose(
        extract_features(vit, x, subnet=(32, 2), batch_size=2),
        extract_features(vit, prep.numpy(x), subnet=(32, 2), batch_size=2), atol=1e-6)
    report = export_subnet(vit, subnet=(32, 2), output=tmp_path / "deploy", formats=[],
                           check_images=x[:2], progress=False)
    assert report["preprocessing"] == prep.get_config()
    assert report["artifacts"]["preset"]["max_abs_diff"] <= 1e-5


def test_pretraining_records_its_data_pipeline():
    import inspect

    from poa_keras.data.multicrop import multicrop_dataset

    default = inspect.signature(multicrop_dataset).parameters
    record = data_preprocessing({"data": {}})
    assert record.image_size == (default["global_size"].default,) * 2
    assert record.pixel_normalization == default["normalize"].default == "imagenet"
    assert record.interpolation == "bilinear"
    assert data_preprocessing({"data": {"global_size": 16, "normalize": "minus_one_one"}}) == \
        ImagePreprocessing(16, pixel_normalization="minus_one_one")


def test_the_teacher_of_a_recipe_carries_its_record():
    from poa_keras.pretrain import build_trainer, load_recipe

    recipe = load_recipe(dict(
        method="dino", backbone=dict(config="vit_elastic_test", image_size=16, embed_dim=32,
                                     depth=1, head_dim=16, min_width=32, min_depth=1,
                                     named_subnets={}),
        head=dict(hidden_dim=16, bottleneck_dim=8, out_dim=10),
        data=dict(source="shapes", global_size=16, local_size=8, num_local=0,
                  normalize=None),
        train=dict(epochs=1, batch_size=2, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                   freeze_last_layer_epochs=0), seed=0))
    trainer = build_trainer(recipe, steps=1)
    assert trainer.teacher_backbone.preprocessing == ImagePreprocessing(
        16, pixel_normalization=None)

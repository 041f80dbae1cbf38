"""eval/: weighted k-NN against an independent brute-force numpy k-NN, hand-checked votes,
batching, k clipping, errors; feature extraction against direct backbone calls; knn_eval on a
trivially separable toy set."""
import keras
import numpy as np
import pytest
from conftest import forward, randomize

from poa_keras import ElasticViT
from poa_keras.eval import extract_features, knn_classify, knn_eval
from poa_keras.eval import features as features_module


# ----- the reference: brute force, float64, full similarity matrix, plain Python votes ---------

def brute_force_knn(train, train_y, test, test_y, num_classes, k, temperature):
    """(predictions, top-1 accuracy, top-5 accuracy) of DINO's weighted k-NN, written out.

    Top-5 counts only classes with a vote (at least one neighbour), ties to the lower class."""
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    k = min(k, len(train))
    preds, hit1, hit5 = [], 0, 0
    for i in range(len(test)):
        neighbours = sorted(range(len(train)), key=lambda j: -sim[i, j])[:k]
        votes = {}
        for j in neighbours:
            votes[train_y[j]] = votes.get(train_y[j], 0.0) + np.exp(sim[i, j] / temperature)
        ranked = sorted(votes, key=lambda c: (-votes[c], c))
        preds.append(ranked[0])
        hit1 += ranked[0] == test_y[i]
        hit5 += test_y[i] in ranked[:5]
    return np.array(preds), hit1 / len(test), hit5 / len(test)


def clustered(rng, n, num_classes, dim, spread):
    """Features around one random centre per class: accuracy well above chance, below 1."""
    centres = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype("float32"), labels


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 16))
    train_y = rng.integers(0, 7, 300)
    test_y = rng.integers(0, 7, 90)
    train = (centres[train_y] + 1.3 * rng.normal(size=(300, 16))).astype("float32")
    test = (centres[test_y] + 1.3 * rng.normal(size=(90, 16))).astype("float32")
    return train, train_y, test, test_y


# ----- knn_classify ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_brute_force_for_several_k(bank, temperature):
    train, train_y, test, test_y = bank
    ks = (1, 4, 20, 100)
    result = knn_classify(train, train_y, test, test_y, 7, ks=ks, temperature=temperature,
                          return_predictions=True)
    assert sorted(result) == sorted(ks)
    for k in ks:
        preds, top1, top5 = brute_force_knn(train, train_y, test, test_y, 7, k, temperature)
        np.testing.assert_array_equal(result[k]["predictions"], preds, err_msg=f"k={k}")
        assert result[k]["top1"] == pytest.approx(top1), k
        assert result[k]["top5"] == pytest.approx(top5), k
        assert result[k]["k_used"] == k
        assert result[k]["predictions"].dtype == np.int32
        assert 1 / 7 < top1 < 1.0, (k, top1)   # the data are neither trivial nor hopeless
        assert result[k]["top5"] >= result[k]["top1"]


def test_knn_with_fewer_than_five_classes_matches_brute_force():
    rng = np.random.default_rng(1)
    train, train_y = clustered(rng, 120, 3, 8, spread=2.0)
    test, test_y = clustered(rng, 40, 3, 8, spread=2.0)
    result = knn_classify(train, train_y, test, test_y, 3, ks=(1, 10))
    for k in (1, 10):
        _, top1, top5 = brute_force_knn(train, train_y, test, test_y, 3, k, 0.07)
        assert (result[k]["top1"], result[k]["top5"]) == pytest.approx((top1, top5))
    assert result[1]["top5"] == result[1]["top1"]   # one neighbour: one voted class only


def test_batched_equals_unbatched(bank):
    train, train_y, test, test_y = bank
    ks = (3, 20)
    whole = knn_classify(train, train_y, test, test_y, 7, ks=ks, batch_size=len(test),
                         return_predictions=True)
    for batch_size in (1, 7, 64, None):
        part = knn_classify(train, train_y, test, test_y, 7, ks=ks, batch_size=batch_size,
                            return_predictions=True)
        for k in ks:
            np.testing.assert_array_equal(part[k]["predictions"], whole[k]["predictions"])
            assert part[k]["top1"] == whole[k]["top1"]
            assert part[k]["top5"] == whole[k]["top5"]


def test_k_larger_than_the_bank_is_clipped():
    rng = np.random.default_rng(2)
    train, train_y = clustered(rng, 25, 4, 6, spread=1.5)
    test, test_y = clustered(rng, 30, 4, 6, spread=1.5)
    result = knn_classify(train, train_y, test, test_y, 4, ks=(10, 200),
                          return_predictions=True)
    assert result[200]["k_used"] == 25 and result[10]["k_used"] == 10
    preds, top1, top5 = brute_force_knn(train, train_y, test, test_y, 4, 25, 0.07)
    np.testing.assert_array_equal(result[200]["predictions"], preds)
    assert (result[200]["top1"], result[200]["top5"]) == pytest.approx((top1, top5))


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # Hand-checked: the test point is (1, 0). One class-0 neighbour at similarity 1, two class-1
    # neighbours at similarity 0.9. Class 1 / class 0 vote ratio = 2 exp(-0.1 / T):
    # T = 0.07 -> 0.48 (class 0 wins); T = 1 -> 1.81 (class 1 wins); k = 1 -> class 0.
    c = 0.9
    train = np.array([[1.0, 0.0], [c, np.sqrt(1 - c * c)], [c, -np.sqrt(1 - c * c)]], "float32")
    train_y = np.array([0, 1, 1])
    test = np.array([[2.0, 0.0]], "float32")   # not unit length: normalised inside
    for temperature, expected in ((0.07, 0), (1.0, 1)):
        result = knn_classify(train, train_y, test, np.array([0]), 2, ks=(1, 3),
                              temperature=temperature, return_predictions=True)
        assert result[3]["predictions"][0] == expected, temperature
        assert result[3]["top1"] == (1.0 if expected == 0 else 0.0)
        assert result[1]["predictions"][0] == 0


def test_top5_counts_only_classes_that_got_a_vote():
    # Two neighbours of classes 0 and 1 among 10 classes: a test label 7 got no vote, so it is
    # not a top-5 hit (DINO's sort would rank it among the zero-vote classes filling the list).
    train = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    test = np.array([[1.0, 0.2], [1.0, 0.2], [1.0, 0.2]], "float32")
    result = knn_classify(train, np.array([0, 1]), test, np.array([0, 1, 7]), 10, ks=2)
    assert result[2]["top1"] == pytest.approx(1 / 3)
    assert result[2]["top5"] == pytest.approx(2 / 3)


def test_predictions_without_test_labels_and_backend_tensors(bank):
    train, train_y, test, test_y = bank
    expected = knn_classify(train, train_y, test, test_y, 7, ks=(5,), return_predictions=True)
    result = knn_classify(keras.ops.convert_to_tensor(train), keras.ops.convert_to_tensor(train_y),
                          keras.ops.convert_to_tensor(test), None, 7, ks=5,
                          return_predictions=True)
    assert result[5]["top1"] is None and result[5]["top5"] is None
    np.testing.assert_array_equal(result[5]["predictions"], expected[5]["predictions"])


@pytest.mark.parametrize("change, error, match", [
    (dict(train_features=np.zeros((10, 4, 1), "float32")), ValueError,
     r"train_features must have shape \(num_samples, feature_dim\), got shape \(10, 4, 1\)"),
    (dict(test_features=np.ones((5, 3), "float32")), ValueError,
     "same feature dimension, got 4 and 3"),
    (dict(train_labels=np.zeros(9, int)), ValueError,
     "train_labels has 9 labels but train_features has 10 rows"),
    (dict(test_labels=np.zeros((5, 2), int)), ValueError, r"test_labels must have shape \(5,\)"),
    (dict(train_labels=np.full(10, 3)), ValueError,
     r"train_labels must lie in \[0, num_classes=3\), got label 3"),
    (dict(test_labels=np.full(5, -1)), ValueError, "got label -1"),
    (dict(train_labels=np.zeros(10, "float32")), TypeError, "train_labels must be integers"),
    (dict(ks=(10, 0)), ValueError, r"every k must be >= 1, got 0 in ks=\(10, 0\)"),
    (dict(ks=()), ValueError, "ks must hold at least one k"),
    (dict(ks=(2.5,)), TypeError, "every k must be an int, got 2.5"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1, got 0"),
    (dict(train_features=np.zeros((0, 4), "float32"), train_labels=np.zeros(0, int)),
     ValueError, "train_features is empty"),
    (dict(test_features=np.full((5, 4), np.nan, "float32")), ValueError,
     "test_features holds NaN or inf values"),
])
def test_knn_errors_name_the_wrong_value(change, error, match):
    args = dict(train_features=np.ones((10, 4), "float32"), train_labels=np.zeros(10, int),
                test_features=np.ones((5, 4), "float32"), test_labels=np.zeros(5, int),
                num_classes=3, ks=(1, 2))
    args.update(change)
    with pytest.raises(error, match=match):
        knn_classify(**args)


# ----- extract_features --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vit():
    keras.utils.set_random_seed(0)
    model = ElasticViT.from_config_name("vit_elastic_test", name="knn_vit")
    randomize(model, seed=3)
    return model


def imagenet_normalised(images_uint8):
    from poa_keras.data.multicrop import IMAGENET_MEAN, IMAGENET_STD  # the training pipeline's
    x = images_uint8.astype(np.float64) / 255.0
    return ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype("float32")


def test_extract_features_equals_a_direct_backbone_call(tiny_vit, monkeypatch):
    images = np.random.default_rng(4).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    spec = (32, 2)
    seen = []
    compiled = tiny_vit.compiled_forward

    def recording(subnet=None, training=False):
        fn = compiled(subnet, training)
        return lambda x: (seen.append(tuple(x.shape)), fn(x))[1]

    monkeypatch.setattr(tiny_vit, "compiled_forward", recording)
    raw = extract_features(tiny_vit, images, subnet=spec, batch_size=5, normalize=False)
    unit = extract_features(tiny_vit, images, subnet=spec, batch_size=5)
    # Three batches of 5 (the last padded from 3): one input shape, so one trace.
    assert seen == [(5, 32, 32, 3)] * 6
    expected = np.asarray(keras.ops.convert_to_numpy(
        forward(tiny_vit, imagenet_normalised(images), spec)["cls"]), np.float64)
    assert raw.shape == (13, 32) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_extract_features_float_images_are_fed_unchanged(tiny_vit):
    images = np.random.default_rng(5).uniform(-2, 2, (6, 32, 32, 3)).astype("float64")
    feats = extract_features(tiny_vit, images, batch_size=64, normalize=False)
    expected = keras.ops.convert_to_numpy(forward(tiny_vit, images.astype("float32"))["cls"])
    assert feats.shape == (6, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)


def test_pixel_normalisation_matches_the_training_pipeline():
    from poa_keras.data import multicrop
    assert features_module.IMAGENET_MEAN == multicrop.IMAGENET_MEAN
    assert features_module.IMAGENET_STD == multicrop.IMAGENET_STD
    x = np.array([[[[0, 128, 255]]]], np.uint8)
    np.testing.assert_allclose(features_module.preprocess_uint8(x), imagenet_normalised(x),
                               rtol=1e-6)
    np.testing.assert_allclose(features_module.preprocess_uint8(x, "minus_one_one"),
                               [[[[-1.0, 1 / 255, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(features_module.preprocess_uint8(x, None),
                               [[[[0.0, 128 / 255, 1.0]]]], rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(images=np.zeros((32, 32, 3), np.uint8)), ValueError,
     r"images must have shape \(num_images, height, width, channels\), got shape \(32, 32, 3\)"),
    (dict(images=np.zeros((2, 32, 32, 3), np.int32)), TypeError,
     "images must be uint8 .* or float .*, got dtype int32"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(pixel_normalization="zscore"), ValueError, "pixel_normalization must be one of"),
    (dict(subnet=(48, 7)), ValueError, "depth=7 is out of range"),
])
def test_extract_features_errors(tiny_vit, kwargs, error, match):
    args = dict(images=np.zeros((2, 32, 32, 3), np.uint8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        extract_features(tiny_vit, **args)


# ----- knn_eval ----------------------------------------------------------------------------------

def solid_colours(rng, per_class):
    """Four classes, each a distinct solid colour with a little pixel noise: separable."""
    colours = np.array([[230, 30, 30], [30, 200, 40], [40, 40, 220], [220, 220, 40]])
    labels = np.repeat(np.arange(4), per_class)
    noise = rng.integers(-12, 13, (labels.size, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(labels.size)
    return images[order], labels[order]


def test_knn_eval_separates_a_trivially_separable_set(tiny_vit):
    rng = np.random.default_rng(6)
    train_x, train_y = solid_colours(rng, 10)
    test_x, test_y = solid_colours(rng, 5)
    result = knn_eval(tiny_vit, train_x, train_y, test_x, test_y, subnet="small", ks=(1, 5),
                      batch_size=20, return_predictions=True)
    assert result[1]["top1"] >= 0.95 and result[5]["top1"] >= 0.95, result
    assert result[5]["predictions"].shape == (20,)
    # The same features with shuffled bank labels: the accuracy must collapse.
    shuffled = knn_eval(tiny_vit, train_x, rng.permutation(train_y), test_x, test_y,
                        subnet="small", ks=(5,), batch_size=20)
    assert shuffled[5]["top1"] <= 0.6, shuffled

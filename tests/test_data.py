"""poa_keras.data: the shapes data set, the DINO multi-crop pipeline, block-wise patch masks.

Reference values are independent of the code under test: label counts, numpy features and
classifiers written here, hand-checked formulas for the augmentations."""
import numpy as np
import pytest

from poa_keras.data import (SHAPE_CLASSES, block_mask, load_shapes, make_shapes, mask_batch,
                            train_val_split)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# ----- synthetic shapes --------------------------------------------------------------------------

def test_make_shapes_deterministic_and_balanced():
    images, labels, names = make_shapes(200, image_size=32, seed=3)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int32
    assert names == SHAPE_CLASSES and len(names) >= 8
    np.testing.assert_array_equal(np.bincount(labels, minlength=len(names)), 20)
    again, labels_again, _ = make_shapes(200, image_size=32, seed=3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    other, _, _ = make_shapes(200, image_size=32, seed=4)
    assert not np.array_equal(images, other)
    assert images.min() < 60 and images.max() > 200   # uses the range, not a flat grey


def test_make_shapes_sizes_and_class_subset():
    images, labels, names = make_shapes(31, image_size=48, seed=0,
                                        classes=("ring", "star", "bar"))
    assert images.shape == (31, 48, 48, 3) and names == ("ring", "star", "bar")
    counts = np.bincount(labels, minlength=3)
    assert counts.sum() == 31 and counts.max() - counts.min() <= 1
    assert make_shapes(0, image_size=16)[0].shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="classes"):
        make_shapes(4, classes=("circle", "blob"))
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(4, image_size=4)


def _accuracy_1nn(features, labels, n_train):
    f = features - features[:n_train].mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-9
    nearest = np.argmax(f[n_train:] @ f[:n_train].T, axis=1)
    return np.mean(labels[:n_train][nearest] == labels[n_train:])


def _accuracy_centroid(features, labels, n_train, num_classes):
    mu, sd = features[:n_train].mean(0), features[:n_train].std(0) + 1e-9
    f = (features - mu) / sd
    centroids = np.stack([f[:n_train][labels[:n_train] == k].mean(0)
                          for k in range(num_classes)])
    dist = ((f[n_train:, None] - centroids[None]) ** 2).sum(-1)
    return np.mean(np.argmin(dist, axis=1) == labels[n_train:])


@pytest.mark.parametrize("palette", ["light_on_dark", "any"])
def test_class_is_in_the_shape_not_the_colour(palette):
    """A translation-invariant shape feature (|FFT| of the grey image) separates the classes;
    the tint of an image (its mean colour over its mean brightness) is at chance: colours are
    drawn independently of the class. (On "light_on_dark" the mean BRIGHTNESS is not at chance:
    it grows with the shape's area, a property of the shape.)"""
    images, labels, names = make_shapes(3000, image_size=32, seed=1, palette=palette)
    x = images.astype(np.float32) / 255.0
    grey = x.mean(-1)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True))).reshape(len(x), -1)
    colour = x.mean((1, 2))
    tint = colour / colour.sum(1, keepdims=True)
    chance = 1.0 / len(names)
    assert _accuracy_1nn(spectrum, labels, 2000) > 5 * chance
    assert _accuracy_1nn(tint, labels, 2000) < 1.6 * chance
    assert _accuracy_centroid(tint, labels, 2000, len(names)) < 1.6 * chance


def test_palettes_keep_the_geometry_and_order_the_brightness():
    light, labels, _ = make_shapes(200, image_size=32, seed=3)
    anyc, labels_any, _ = make_shapes(200, image_size=32, seed=3, palette="any")
    np.testing.assert_array_equal(labels, labels_any)       # same stream: same shapes
    # light_on_dark: the brightest pixels (the shape) are lighter than the darkest (background)
    # by at least the palette's gap minus texture and noise, in every image
    grey = light.astype(np.float32).mean(-1).reshape(200, -1) / 255.0
    spread = np.sort(grey, 1)
    assert (spread[:, -20:].mean(1) - spread[:, :100].mean(1)).min() > 0.15
    with pytest.raises(ValueError, match="palette must be one of"):
        make_shapes(2, image_size=16, palette="rainbow")


def test_train_val_split_is_stratified_and_disjoint():
    _, labels, _ = make_shapes(100, image_size=16, seed=0)
    ids = np.arange(100)
    (tr_x, tr_y), (va_x, va_y) = train_val_split(ids, labels, val_fraction=0.2, seed=0)
    assert len(tr_x) == 80 and len(va_x) == 20
    assert not set(tr_x) & set(va_x)
    np.testing.assert_array_equal(labels[tr_x], tr_y)
    np.testing.assert_array_equal(np.bincount(va_y, minlength=10), 2)
    (tr, _), (va, val), names = load_shapes(num_train=80, num_val=20, image_size=16, seed=2)
    assert tr.shape == (80, 16, 16, 3) and va.shape == (20, 16, 16, 3)
    assert len(names) == 10 and np.bincount(val, minlength=10).tolist() == [2] * 10
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(ids, labels, val_fraction=1.5)


# ----- block masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (6, 10)])
def test_block_mask_masks_the_requested_fraction_in_blocks(grid):
    rng = np.random.default_rng(0)
    total = grid[0] * grid[1]
    for ratio in (0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0):
        mask = block_mask(*grid, ratio, rng)
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() == round(ratio * total)
    # block-like: nearly every masked patch has a masked 4-neighbour (random masks would not)
    mask = block_mask(14, 14, 0.4, rng)
    padded = np.pad(mask, 1)
    neighbour = (padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
    assert (mask & neighbour).sum() >= 0.9 * mask.sum()
    np.testing.assert_array_equal(block_mask(14, 14, 0.3, 5), block_mask(14, 14, 0.3, 5))
    with pytest.raises(ValueError, match="ratio"):
        block_mask(4, 4, 1.5, rng)


def test_mask_batch_respects_mask_prob_and_ratio_range():
    masks = mask_batch(64, 14, mask_prob=0.5, ratio_range=(0.1, 0.5), rng=0)
    assert masks.shape == (64, 14, 14) and masks.dtype == bool
    ratios = masks.reshape(64, -1).mean(1)
    masked = ratios > 0
    assert masked.sum() == 32
    tol = 1.0 / 196   # rounding to whole patches
    assert ratios[masked].min() >= 0.1 - tol and ratios[masked].max() <= 0.5 + tol
    # stratified: the 32 ratios cover the range evenly (one per sub-range of width 1/80)
    np.testing.assert_allclose(np.sort(ratios[masked]), np.linspace(0.1, 0.5, 33)[:-1] + 0.00625,
                               atol=0.00625 + tol)
    assert masked[:32].sum() not in (0, 32)   # the masked images are shuffled in the batch
    np.testing.assert_array_equal(masks, mask_batch(64, 14, 0.5, (0.1, 0.5), rng=0))
    flat = mask_batch(10, (3, 5), mask_prob=1.0, ratio_range=(0.2, 0.2), rng=1, flat=True)
    assert flat.shape == (10, 15) and (flat.sum(1) == 3).all()
    assert not mask_batch(8, 4, mask_prob=0.0, rng=0).any()


# ----- multi-crop ----------------------------------------------------------------------------

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(48, image_size=32, seed=0)[0]


def _take(ds, n):
    return list(ds.take(n).as_numpy_iterator())


def test_multicrop_structure_shapes_dtype_and_range(shapes):
    from poa_keras.data import multicrop_dataset
    kw = dict(batch_size=8, global_size=24, local_size=(12, 10), num_local=3, seed=0)
    ds = multicrop_dataset(shapes, **kw)
    spec = ds.element_spec
    assert set(spec) == {"global", "local"}
    assert spec["global"].shape == (2, 8, 24, 24, 3) and spec["local"].shape == (3, 8, 12, 10, 3)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 6   # 48 images / 8, one pass
    raw = _take(multicrop_dataset(shapes, normalize=None, **kw), 2)   # same seed, in [0, 1]
    for batch, unnormalised in zip(batches, raw):
        for key in ("global", "local"):
            v, r = batch[key], unnormalised[key]
            assert v.dtype == np.float32 and r.dtype == np.float32
            assert r.min() >= 0.0 and r.max() <= 1.0 and r.std() > 0.05   # real content
            np.testing.assert_allclose(v, (r - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)


def test_multicrop_is_seeded(shapes):
    from poa_keras.data import multicrop_dataset
    kw = dict(batch_size=8, global_size=16, local_size=8, num_local=2)
    ds_a = multicrop_dataset(shapes, seed=7, **kw)
    ds_b = multicrop_dataset(shapes, seed=7, **kw)
    a, b = _take(ds_a, 3), _take(ds_b, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["global"], y["global"])
        np.testing.assert_array_equal(x["local"], y["local"])
    c = _take(multicrop_dataset(shapes, seed=8, **kw), 1)
    assert not np.allclose(a[0]["global"], c[0]["global"])
    # a second epoch over the same dataset draws new crops, still reproducibly
    second_a, second_b = _take(ds_a, 1)[0], _take(ds_b, 1)[0]
    assert not np.allclose(a[0]["global"], second_a["global"])
    np.testing.assert_array_equal(second_a["local"], second_b["local"])


def test_multicrop_routes_per_view_probabilities(shapes):
    """Whole-image crops and every augmentation off except solarisation on global view 2 and
    blur on the local view: global 1 is the image, global 2 its solarisation, the local view a
    blurred copy (the probabilities reach the right views)."""
    from poa_keras.data import multicrop_dataset
    ds = multicrop_dataset(shapes, batch_size=8, global_size=32, local_size=32, num_local=1,
                           global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           supersample=1, shuffle=False, normalize=None, flip_prob=0.0,
                           jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 1.0),
                           solarize_prob=(0.0, 1.0, 0.0), seed=0)
    batch = _take(ds, 1)[0]
    x = shapes[:8].astype(np.float32) / 255.0
    np.testing.assert_allclose(batch["global"][0], x, atol=1e-5)
    np.testing.assert_allclose(batch["global"][1], np.where(x >= 0.5, 1.0 - x, x), atol=1e-5)
    local = batch["local"][0]
    assert not np.allclose(local, x, atol=1e-3)
    np.testing.assert_allclose(local.mean((1, 2)), x.mean((1, 2)), atol=0.02)


def test_multicrop_from_tfds_like_dataset_of_mixed_sizes():
    """Dict elements (as TFDS gives them), images of different sizes, one grey channel,
    float values in [0, 255]; no local views."""
    from poa_keras.data import multicrop_dataset
    rng = np.random.default_rng(0)
    sizes = [(20, 30), (40, 24), (33, 33), (16, 50)] * 2

    def gen():
        for h, w in sizes:
            yield {"image": rng.uniform(0, 255, (h, w, 1)).astype(np.float32), "label": 1}

    source = tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec((None, None, 1), tf.float32), "label": tf.TensorSpec((), tf.int64)})
    ds = multicrop_dataset(source, batch_size=4, global_size=16, local_size=8, num_local=0,
                           value_range=(0, 255), normalize=None, seed=0)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2
    assert batches[0]["global"].shape == (2, 4, 16, 16, 3)
    assert batches[0]["local"].shape == (0, 4, 8, 8, 3)
    assert 0.0 <= batches[0]["global"].min() and batches[0]["global"].max() <= 1.0
    with pytest.raises(ValueError, match="image_key"):
        multicrop_dataset(source, batch_size=2, image_key="img")


def test_images_from_directory(tmp_path, shapes):
    from poa_keras.data import images_from_directory, multicrop_dataset
    for k, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            png = tf.io.encode_png(shapes[3 * k + i])
            tf.io.write_file(str(tmp_path / cls / f"{i}.png"), png)
    ds, names = images_from_directory(tmp_path, with_labels=True)
    items = list(ds.as_numpy_iterator())
    assert names == ["a", "b"] and [int(y) for _, y in items] == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(items[4][0], shapes[4])   # lossless round trip, sorted order
    resized = next(iter(images_from_directory(tmp_path, image_size=20)))
    assert resized.shape == (20, 20, 3) and resized.dtype == tf.uint8
    batch = _take(multicrop_dataset(str(tmp_path), batch_size=3, global_size=16, local_size=8,
                                    num_local=1, seed=0), 1)[0]
    assert batch["global"].shape == (2, 3, 16, 16, 3)
    with pytest.raises(ValueError, match="not a directory"):
        images_from_directory(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        images_from_directory(tmp_path / "empty")


def test_undecodable_image_files_are_named_or_skipped_with_a_count(tmp_path, shapes):
    """Every file is decoded once up front: a bad one stops with its name and the decoder's
    reason (not a TensorFlow traceback half way through a pass), or is left out with
    on_bad_image="skip" and a warning that counts it."""
    from poa_keras.data import images_from_directory
    from poa_keras.data.multicrop import unreadable_images
    for k, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            tf.io.write_file(str(tmp_path / cls / f"{i}.png"),
                             tf.io.encode_png(shapes[2 * k + i]))
    good_png = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "notes.png").write_text("not an image")
    (tmp_path / "b" / "cut.png").write_bytes(good_png[:40])   # a truncated download
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    bad = [str(tmp_path / p) for p in ("a/notes.png", "b/cut.png", "b/empty.jpg")]
    paths = sorted(str(p) for p in tmp_path.rglob("*.*g"))
    assert [paths[i] for i in unreadable_images(paths)] == sorted(bad)
    with pytest.raises(ValueError) as error:
        images_from_directory(tmp_path, with_labels=True)
    message = str(error.value)
    assert message.startswith(f"3 of the 7 image files under {str(tmp_path)!r} cannot be "
                              "decoded")
    for path, reason in zip(bad, ("Unknown image file format", "Invalid PNG", "Input is empty")):
        assert f"{path} ({reason}" in message, message
    assert "on_bad_image='skip'" in message and "{{function_node" not in message
    with pytest.warns(UserWarning, match=r"skipped 3 of the 7 image files"):
        ds, names = images_from_directory(tmp_path, with_labels=True, on_bad_image="skip")
    assert [int(y) for _, y in ds.as_numpy_iterator()] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"on_bad_image must be one of \['error', 'skip'\]"):
        images_from_directory(tmp_path, on_bad_image="ignore")
    only_bad = tmp_path / "b"
    for name in ("0.png", "1.png"):
        (only_bad / name).unlink()
    with pytest.raises(ValueError, match=r"2 of the 2 image files .* cannot be decoded"):
        images_from_directory(only_bad, on_bad_image="skip")   # nothing left to train on


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    from poa_keras.data.multicrop import crop_boxes
    scales = np.array([(0.32, 1.0)] * 50 + [(0.05, 0.32)] * 50, np.float32)
    height, width = 90, 120
    for s in range(4):
        boxes = crop_boxes(tf.constant([s, 0], tf.int64), height, width, scales,
                            (3 / 4, 4 / 3)).numpy()
        y1, x1, y2, x2 = (boxes[:, i] for i in range(4))
        ch = np.round((y2 - y1) * (height - 1)) + 1
        cw = np.round((x2 - x1) * (width - 1)) + 1
        area = ch * cw / (height * width)
        assert (y1 >= 0).all() and (x1 >= 0).all()
        assert (y2 <= 1 + 1e-6).all() and (x2 <= 1 + 1e-6).all()
        # rounding crop sides to whole pixels moves the area by up to about one pixel row/column
        slack = (ch + cw + 1) / (height * width)
        assert (area >= scales[:, 0] - slack).all() and (area <= scales[:, 1] + slack).all()
        aspect = cw / ch
        assert (aspect > 3 / 4 * 0.9).all() and (aspect < 4 / 3 * 1.1).all()


def test_photometric_operations_match_their_formulas():
    from poa_keras.data.multicrop import photometric
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    # six images = three views of two images (view-major); probabilities are per view
    off = dict(flip_prob=0.0, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.0, grayscale_prob=0.0,
               blur_prob=(0.0, 0.0, 0.0), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.0, 0.0),
               normalize=None)
    seed = tf.constant([1, 2], tf.int64)

    def run(**kw):
        return photometric(tf.constant(x), seed, **{**off, **kw}).numpy()

    np.testing.assert_allclose(run(), x, atol=1e-6)
    np.testing.assert_allclose(run(flip_prob=1.0), x[:, :, ::-1], atol=1e-6)
    grey = x @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(run(grayscale_prob=1.0), np.repeat(grey[..., None], 3, -1),
                               atol=1e-3)
    solarised = np.where(x >= 0.5, 1.0 - x, x)
    np.testing.assert_allclose(run(solarize_prob=(1.0, 1.0, 1.0)), solarised, atol=1e-6)
    np.testing.assert_allclose(run(solarize_prob=(0.0, 1.0, 0.0)),
                               np.concatenate([x[:2], solarised[2:4], x[4:]]), atol=1e-6)
    np.testing.assert_allclose(run(normalize="imagenet"), (x - IMAGENET_MEAN) / IMAGENET_STD,
                               atol=1e-5)
    # brightness only: every image is scaled by one factor in [0.6, 1.4] (then clipped)
    bright = run(jitter_prob=1.0, jitter=(0.4, 0.0, 0.0, 0.0))
    inside = bright < 0.999
    factors = bright[inside] / x[inside]
    for i in range(6):
        f = (bright[i] / x[i])[inside[i]]
        assert 0.6 - 1e-4 <= f.min() and f.max() <= 1.4 + 1e-4 and np.ptp(f) < 1e-3
    assert np.ptp(factors) > 0.01   # ...a different factor per image
    # blur: keeps the mean of a constant image, smooths noise, per image sigma in range
    blurred = run(blur_prob=(1.0, 1.0, 1.0))
    assert blurred.std() < x.std()
    flat = np.full_like(x, 0.3)
    out = photometric(tf.constant(flat), seed, **{**off, "blur_prob": (1.0, 1.0, 1.0)})
    np.testing.assert_allclose(out.numpy(), flat, atol=1e-5)
    # hue only: grey pixels stay grey, colours keep their HSV value (max channel)
    hued = run(jitter_prob=1.0, jitter=(0.0, 0.0, 0.0, 0.1))
    np.testing.assert_allclose(hued.max(-1), x.max(-1), atol=1e-5)
    assert not np.allclose(hued, x, atol=1e-3)
    # every operation copes with no selected image (small batches, low probabilities)
    from poa_keras.data.multicrop import apply_to, color_jitter, gaussian_blur
    nothing = tf.zeros(6, bool)
    for fn in (lambda v: color_jitter(v, seed, 0.4, 0.4, 0.2, 0.1),
               lambda v: gaussian_blur(v, seed, (0.1, 2.0))):
        np.testing.assert_array_equal(apply_to(tf.constant(x), nothing, fn).numpy(), x)


def test_gaussian_blur_matches_a_numpy_reference():
    """Separable Gaussian, radius ceil(3 sigma), weights renormalised inside the image."""
    from poa_keras.data.multicrop import gaussian_blur
    x = np.random.default_rng(1).uniform(0, 1, (3, 9, 11, 3)).astype(np.float32)
    sigma = 1.3
    radius = int(np.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2))

    def blur_axis(a, axis):
        out = np.zeros_like(a)
        length = a.shape[axis]
        for i in range(length):
            acc, norm = 0.0, 0.0
            for t, wt in zip(taps, weights):
                if 0 <= i + t < length:
                    acc = acc + wt * np.take(a, i + t, axis=axis)
                    norm += wt
            index = [slice(None)] * a.ndim
            index[axis] = i
            out[tuple(index)] = acc / norm
        return out

    expected = blur_axis(blur_axis(x, 1), 2)
    got = gaussian_blur(tf.constant(x), tf.constant([3, 4], tf.int64), (sigma, sigma)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)

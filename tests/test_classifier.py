"""classifier.py: ImageClassifier fine-tuning with fit (loss falls, callbacks), evaluate and
predict against numpy formulas, pooling choices, .keras round trip, mixed_bfloat16, uint8
images through the backbone's preprocessing, presets (save_to_preset / from_preset); the
per-variable lr optimizer against a hand-written numpy AdamW, inside fit as layer decay."""
import os

import keras
import numpy as np
import pytest
from conftest import forward, to_np

import poa_keras
from poa_keras import ElasticViT
from poa_keras.classifier import ImageClassifier, LRMultiplierOptimizer
from poa_keras.data.synthetic import load_shapes
from poa_keras.eval.features import preprocess_uint8

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist")  # the mask token

LR = 3e-2
LAYER_DECAY = 0.5
SUBNET = (32, 2)   # of vit_elastic_test (depth 4): extracted, a depth-2 ViT of width 32


@pytest.fixture(scope="module")
def raw_shapes():
    """uint8 images (0..255) and labels: train, val."""
    classes = ("circle", "square", "triangle", "cross")
    (x, y), (x_val, y_val), _ = load_shapes(num_train=32, num_val=8, image_size=32, seed=0,
                                            classes=classes)
    return x, y, x_val, y_val


@pytest.fixture(scope="module")
def shapes(raw_shapes):
    """The same, normalised by hand (float32): what the backbone takes."""
    x, y, x_val, y_val = raw_shapes
    return preprocess_uint8(x), y, preprocess_uint8(x_val), y_val


@pytest.fixture(scope="module")
def tuned(shapes, tmp_path_factory):
    """One fine-tuning run shared by the tests below: a single step first (to read the layer-
    decay scaled update), then 14 epochs with callbacks, then an early-stopped run."""
    x, y, _, _ = shapes
    # Seeded without keras.utils.set_random_seed, which imports TensorFlow on every backend:
    # the backbone's initialisers draw from numpy's global generator, the head is set here.
    np.random.seed(0)
    vit = ElasticViT.from_config_name("vit_elastic_test", name="clf_vit").extract(SUBNET)
    clf = ImageClassifier(vit, num_classes=4, pooling="avg", dropout=0.1, name="clf")
    clf.head.kernel.assign(np.random.default_rng(0).normal(0, 0.02, (32, 4)).astype("float32"))
    optimizer = clf.layer_decay_optimizer(
        keras.optimizers.AdamW(LR, weight_decay=0.0, epsilon=1e-14), layer_decay=LAYER_DECAY)
    clf.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    before = {v.path: to_np(v) for v in clf.trainable_variables}
    first = clf.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    after_one = {v.path: to_np(v) for v in clf.trainable_variables}

    checkpoint = tmp_path_factory.mktemp("ckpt") / "best.weights.h5"
    seen = []
    history = clf.fit(x, y, batch_size=32, epochs=14, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="loss", save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch)),
    ]).history
    # No epoch improves the loss by 10: EarlyStopping stops after 1 + patience epochs.
    stopper = keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
    stopped = clf.fit(x, y, batch_size=32, epochs=20, verbose=0, callbacks=[stopper]).history
    return dict(clf=clf, vit=vit, before=before, after_one=after_one, first=first,
                history=history, seen=seen, checkpoint=checkpoint, stopped=stopped)


def expected_multiplier(path, depth=2):
    """Layer decay written out for a ViT of `depth` blocks: embeddings depth + 1 layers below
    the top, block i depth - i below, the final norm and the head at the top."""
    parts = path.split("/")
    if parts[0] == "clf":   # the classifier's own head
        return 1.0
    if any(p in ("patch_embed", "cls_token", "pos_embed", "mask_token") for p in parts):
        return LAYER_DECAY ** (depth + 1)
    blocks = [p for p in parts if p.startswith("blocks_")]
    if blocks:
        return LAYER_DECAY ** (depth - int(blocks[0].split("_")[1]))
    return 1.0


def test_layer_decay_multipliers_follow_the_layer_ids(tuned):
    clf = tuned["clf"]
    multipliers = clf.lr_multipliers(LAYER_DECAY)
    assert sorted(multipliers) == sorted(v.path for v in clf.trainable_variables)
    for path, m in multipliers.items():
        assert m == pytest.approx(expected_multiplier(path)), path
    assert multipliers["clf/head/kernel"] == 1.0
    assert multipliers["clf_vit_w32_d2/patch_embed/proj/kernel"] == pytest.approx(0.5 ** 3)
    assert multipliers["clf_vit_w32_d2/blocks_0/attn/qkv/dense/kernel"] == 0.25
    assert multipliers["clf_vit_w32_d2/norm/norm/gamma"] == 1.0
    assert clf.optimizer.multipliers == multipliers


def test_fit_scales_every_update_by_its_layer_multiplier(tuned):
    # AdamW's first step moves every entry with a gradient by lr * g / (|g| + eps'), eps' =
    # 1e-14 / sqrt(1 - beta_2): by lr, even for the small gradients of the cls token (LayerScale
    # 1e-5). With multiplier m the largest move must be m * lr. (A much smaller eps would let
    # round-off gradients, e.g. of the key bias, whose v underflows to 0, move by more than lr.)
    checked = set()
    for path, old in tuned["before"].items():
        move = np.abs(tuned["after_one"][path] - old).max()
        if move == 0:   # no gradient: the mask token
            continue
        assert move / LR == pytest.approx(expected_multiplier(path), rel=1e-3), path
        checked.add(path)
    assert sorted(checked) == sorted(set(tuned["before"]) - {"clf_vit_w32_d2/mask_token"})


def test_fine_tuning_lowers_the_loss_and_runs_callbacks(tuned):
    first_loss = tuned["first"]["loss"][0]          # the fixed batch before any update
    losses = tuned["history"]["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * first_loss, (first_loss, losses)
    assert tuned["seen"] == list(range(14))
    assert tuned["checkpoint"].exists()
    assert len(tuned["stopped"]["loss"]) == 2       # EarlyStopping ended the 20-epoch run


def test_predict_and_evaluate_match_numpy(tuned, shapes):
    clf, vit = tuned["clf"], tuned["vit"]
    _, _, x_val, y_val = shapes
    logits = clf.predict(x_val, batch_size=8, verbose=0)
    assert logits.shape == (8, 4) and logits.dtype == np.float32
    # pooling="avg": the mean patch token through the head.
    tokens = to_np(forward(vit, x_val)["patch_tokens"])
    kernel, bias = (to_np(w) for w in clf.head.weights)
    np.testing.assert_allclose(logits, tokens.mean(axis=1) @ kernel + bias, rtol=1e-4,
                               atol=1e-4)
    loss, accuracy = clf.evaluate(x_val, y_val, batch_size=8, verbose=0)
    z = logits.astype(np.float64)
    log_softmax = z - z.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    assert loss == pytest.approx(-log_softmax[np.arange(8), y_val].mean(), rel=1e-4)
    assert accuracy == pytest.approx(np.mean(np.argmax(z, 1) == y_val))


def test_keras_file_round_trip_gives_identical_outputs(tuned, shapes, tmp_path):
    clf = tuned["clf"]
    _, _, x_val, _ = shapes
    path = tmp_path / "clf.keras"
    clf.save(str(path))
    loaded = keras.saving.load_model(str(path))
    assert isinstance(loaded, ImageClassifier)
    assert (loaded.pooling, loaded.num_classes, loaded.dropout) == ("avg", 4, 0.1)
    assert loaded.subnet is None
    assert isinstance(loaded.optimizer, LRMultiplierOptimizer)
    assert loaded.optimizer.multipliers == clf.optimizer.multipliers
    assert int(to_np(loaded.optimizer.iterations)) == int(to_np(clf.optimizer.iterations)) > 1
    np.testing.assert_array_equal(infer(loaded, x_val), infer(clf, x_val))
    # The configuration alone rebuilds the same architecture.
    rebuilt = ImageClassifier.from_config(clf.get_config())
    assert rebuilt.get_config() == clf.get_config()


def test_uint8_images_go_through_the_backbone_preprocessing(tuned, raw_shapes, shapes):
    """fit / predict take raw images: uint8 is preprocessed inside the call, as the manual
    normalisation does (images at the input size: mean / std only)."""
    clf = tuned["clf"]
    assert clf.preprocessing == tuned["vit"].preprocessing
    np.testing.assert_allclose(infer(clf, raw_shapes[2]), infer(clf, shapes[2]), rtol=1e-5,
                               atol=1e-5)
    _, accuracy = clf.evaluate(raw_shapes[2], raw_shapes[3], batch_size=8, verbose=0)
    assert accuracy == pytest.approx(np.mean(infer(clf, shapes[2]).argmax(1) == shapes[3]))


def test_fine_tuned_classifier_preset_reloads_as_one_object(tuned, raw_shapes, tmp_path):
    clf = tuned["clf"]
    x_val = raw_shapes[2]
    clf.save_to_preset(tmp_path / "clf")
    assert sorted(os.listdir(tmp_path / "clf")) == [
        "config.json", "metadata.json", "model.weights.h5", "task.json", "task.weights.h5"]
    loaded = ImageClassifier.from_preset(tmp_path / "clf")
    assert isinstance(loaded, ImageClassifier) and loaded.name == "clf"
    assert (loaded.pooling, loaded.num_classes, loaded.dropout) == ("avg", 4, 0.1)
    assert loaded.preprocessing == clf.preprocessing
    np.testing.assert_array_equal(infer(loaded, x_val), infer(clf, x_val))
    # The preset's backbone is the fine-tuned one; a size or another num_classes: a new head.
    backbone = poa_keras.Backbone.from_preset(tmp_path / "clf")
    x_float = preprocess_uint8(x_val)
    np.testing.assert_array_equal(to_np(forward(backbone, x_float)["cls"]),
                                  to_np(forward(tuned["vit"], x_float)["cls"]))
    other = ImageClassifier.from_preset(tmp_path / "clf", num_classes=3)
    assert tuple(other.head.kernel.shape) == (32, 3) and other.pooling == "avg"
    sized = ImageClassifier.from_preset(tmp_path / "clf", width=32, depth=2)
    assert (sized.backbone.embed_dim, sized.num_classes) == (32, 4)
    assert not np.array_equal(to_np(sized.head.kernel), to_np(clf.head.kernel))


def test_classifier_from_a_backbone_preset(small_backbone, tmp_path):
    small_backbone.save_to_preset(tmp_path / "backbone")
    clf = ImageClassifier.from_preset(tmp_path / "backbone", num_classes=3, width=48, depth=3,
                                      pooling="avg")
    assert (clf.backbone.embed_dim, clf.backbone.depth, clf.pooling) == (48, 3, "avg")
    assert tuple(clf.head.kernel.shape) == (48, 3)
    with pytest.raises(ValueError, match="holds a backbone only: give num_classes="):
        ImageClassifier.from_preset(tmp_path / "backbone")


def infer(model, x):
    """Inference logits as numpy: one compiled predict step on JAX (eager JAX compiles op by
    op), an eager call elsewhere (cheaper than tracing a new program for a tiny model)."""
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict_on_batch(x))
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_mixed_bfloat16_fine_tunes_with_float32_logits(shapes):
    x, y, _, _ = shapes
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        # A one-block, width-32 ViT: every layer type of the family, a cheap compile.
        vit = ElasticViT.from_config_name("vit_elastic_test", embed_dim=32, depth=1,
                                          min_depth=1, named_subnets={}, name="bf16_vit")
        clf = ImageClassifier(vit, num_classes=4)
        assert vit.compute_dtype == "bfloat16" and vit.variable_dtype == "float32"
        assert clf.head.compute_dtype == "float32"
        clf.compile(optimizer=keras.optimizers.AdamW(LR),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = clf.train_on_batch(x[:8], y[:8], return_dict=True)
        assert np.isfinite(logs["loss"])
        logits = infer(clf, x[:8])
        assert logits.dtype == np.float32 and np.isfinite(logits).all()
        assert all(v.dtype == "float32" for v in clf.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ----- pooling on other backbones ----------------------------------------------------------------

class _TokensBackbone(keras.Model):
    """patch tokens = the 4 pixels, cls = first pixel + 1, pooled = first pixel - 1."""

    def feature_dim(self, subnet=None):
        return 3

    def call(self, images, training=None):
        tokens = keras.ops.reshape(images, (-1, 4, 3))
        return {"cls": tokens[:, 0] + 1.0, "patch_tokens": tokens, "pooled": tokens[:, 0] - 1.0}


class _PooledBackbone(_TokensBackbone):
    def call(self, images, training=None):
        return {"pooled": keras.ops.reshape(images, (-1, 4, 3))[:, 1]}


class _ElasticBackbone(_TokensBackbone):
    """Scales its tokens by the subnet's factor: shows which subnet the classifier ran."""

    def resolve_subnet(self, subnet):
        if subnet not in (None, (2.0,), (3.0,)):
            raise ValueError(f"unknown subnet {subnet}")
        return subnet

    def call(self, images, subnet=None, training=None):
        outputs = super().call(images)
        scale = 1.0 if subnet is None else subnet[0]
        return {k: v * scale for k, v in outputs.items()}


@pytest.mark.parametrize("backbone_class, pooling, features", [
    (_ElasticBackbone, "cls", lambda t: 3.0 * (t[:, 0] + 1.0)),
    (_TokensBackbone, "cls", lambda t: t[:, 0] + 1.0),
    (_TokensBackbone, "avg", lambda t: t.mean(axis=1)),
    (_PooledBackbone, "cls", lambda t: t[:, 1]),
    (_PooledBackbone, "avg", lambda t: t[:, 1]),
])
def test_pooling_reads_cls_mean_patch_tokens_or_pooled(backbone_class, pooling, features):
    images = np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype("float32")
    subnet = (3.0,) if backbone_class is _ElasticBackbone else None
    clf = ImageClassifier(backbone_class(), num_classes=2, pooling=pooling, subnet=subnet)
    kernel, bias = (to_np(w) for w in clf.head.weights)
    expected = features(images.reshape(5, 4, 3).astype(np.float64)) @ kernel + bias
    np.testing.assert_allclose(to_np(clf(images)), expected, rtol=1e-5, atol=1e-6)


def test_fit_works_without_compile_and_dropout_acts_in_training_only():
    images = np.random.default_rng(1).normal(size=(8, 2, 2, 3)).astype("float32")
    labels = np.arange(8) % 2
    clf = ImageClassifier(_TokensBackbone(), num_classes=2, dropout=0.5)
    assert isinstance(clf.optimizer, keras.optimizers.AdamW)   # compiled at construction
    assert clf.loss.get_config()["from_logits"]
    history = clf.fit(images, labels, batch_size=8, epochs=2, verbose=0).history
    assert sorted(history) == ["accuracy", "loss"]
    kernel, bias = (to_np(w) for w in clf.head.weights)
    cls = images.reshape(8, 4, 3)[:, 0].astype(np.float64) + 1.0
    np.testing.assert_allclose(to_np(clf(images, training=False)), cls @ kernel + bias,
                               rtol=1e-5, atol=1e-6)
    dropped = to_np(clf(images, training=True))
    assert np.abs(dropped - (cls @ kernel + bias)).max() > 1e-3


def test_fit_creates_the_optimizer_state_before_the_first_step_is_traced():
    # Keras' TensorFlow trainer (no tf.distribute strategy) would create the optimizer's
    # variables inside the first trace of the step, and TensorFlow then traces it twice.
    images = np.random.default_rng(2).normal(size=(8, 2, 2, 3)).astype("float32")
    labels = np.arange(8) % 2
    clf = ImageClassifier(_TokensBackbone(), num_classes=2)
    clf.compile(optimizer=keras.optimizers.AdamW(1e-3))
    assert not clf.optimizer.built   # compile keeps no optimizer state (inference-only use)
    seen, traces = [], []
    if keras.backend.backend() == "tensorflow":
        train_step = clf.train_step

        def counting_step(data):
            traces.append(1)   # runs once per trace of the step
            return train_step(data)

        clf.train_step = counting_step
    clf.fit(images, labels, batch_size=4, epochs=1, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(
            (clf.optimizer.built, len(clf.optimizer.variables))))])
    assert seen[0][0] and seen[0][1] > 2 * len(clf.trainable_variables)
    if keras.backend.backend() == "tensorflow":
        assert len(traces) == 1


# ----- the per-variable lr optimizer -------------------------------------------------------------

def numpy_adamw(param, grads, lr, weight_decay, beta_1=0.9, beta_2=0.999, eps=1e-12):
    """PyTorch's AdamW for one parameter group of learning rate `lr` (float64)."""
    p = np.array(param, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1 ** t)
        v_hat = v / (1 - beta_2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_lr_multipliers_match_numpy_adamw_param_groups():
    # eps is tiny so that Keras' eps placement (on sqrt(v), not on sqrt(v_hat)) cannot matter.
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))}
    grads = {k: [rng.normal(size=v.shape) for _ in range(3)] for k, v in init.items()}
    multipliers = {"b": 0.25}   # "a" is not listed: 1
    lr, wd = 0.1, 0.05
    expected = {k: numpy_adamw(init[k], grads[k], lr * multipliers.get(k, 1.0), wd)
                for k in init}

    def make():
        variables = [keras.Variable(init[k].astype("float32"), name=k) for k in init]
        inner = keras.optimizers.AdamW(lr, weight_decay=wd, epsilon=1e-12)
        return variables, LRMultiplierOptimizer(inner, multipliers)

    variables, optimizer = make()
    assert [v.path for v in variables] == ["a", "b"]
    for step in range(3):
        optimizer.apply([keras.ops.convert_to_tensor(grads[k][step].astype("float32"))
                         for k in init], variables)
    for k, variable in zip(init, variables):
        np.testing.assert_allclose(to_np(variable), expected[k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert int(to_np(optimizer.iterations)) == 3
    assert float(to_np(optimizer.learning_rate)) == pytest.approx(lr)

    if keras.backend.backend() == "jax":   # fit's path on JAX: stateless_apply
        variables, optimizer = make()
        optimizer.build(variables)
        values = [v.value for v in variables]
        state = [v.value for v in optimizer.variables]
        for step in range(3):
            values, state = optimizer.stateless_apply(
                state, [keras.ops.convert_to_tensor(grads[k][step].astype("float32"))
                        for k in init], values)
        for k, value in zip(init, values):
            np.testing.assert_allclose(to_np(value), expected[k], rtol=1e-5, atol=1e-6,
                                       err_msg=k)


def test_lr_multiplier_optimizer_config_round_trip():
    optimizer = LRMultiplierOptimizer(keras.optimizers.AdamW(0.01), {"x/kernel": 0.5},
                                      name="ld")
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LRMultiplierOptimizer) and restored.name == "ld"
    assert restored.multipliers == {"x/kernel": 0.5}
    assert isinstance(restored.inner_optimizer, keras.optimizers.AdamW)
    assert float(to_np(restored.learning_rate)) == pytest.approx(0.01)
    restored.learning_rate = 0.002   # what lr callbacks do
    assert float(to_np(restored.inner_optimizer.learning_rate)) == pytest.approx(0.002)


# ----- errors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_backbone():
    return ElasticViT.from_config_name("vit_elastic_test", name="err_vit")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pooling="max"), ValueError,
     r"pooling must be one of \('cls', 'avg', 'avg_norm'\), got 'max'"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1, got 0"),
    (dict(num_classes=2.5), TypeError, "num_classes must be an int, got 2.5"),
    (dict(num_classes=True), TypeError, "num_classes must be an int, got True"),
    (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(subnet=(48, 7)), ValueError, "depth=7 is out of range"),
    (dict(subnet="huge"), ValueError, "unknown named size 'huge'"),
])
def test_classifier_errors(small_backbone, kwargs, error, match):
    args = dict(num_classes=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ImageClassifier(small_backbone, **args)


def test_config_round_trip_of_a_sliced_subnet_classifier(small_backbone):
    clf = ImageClassifier(small_backbone, num_classes=3, pooling="avg", subnet=(48, 3),
                          dropout=0.2, name="sliced")
    config = clf.get_config()
    assert config["subnet"] == [48, 3] and config["pooling"] == "avg"
    rebuilt = ImageClassifier.from_config(config)
    assert rebuilt.subnet == small_backbone.resolve_subnet((48, 3))
    assert rebuilt.get_config() == config
    assert tuple(rebuilt.head.kernel.shape) == (48, 3)
    # Layer ids of the full network (depth 4), whatever the subnet.
    multipliers = clf.lr_multipliers(0.5)
    assert multipliers["err_vit/blocks_3/mlp/fc1/dense/kernel"] == 0.5
    assert multipliers["err_vit/cls_token"] == 0.5 ** 5


def test_classifier_needs_a_keras_backbone():
    with pytest.raises(TypeError, match="backbone must be a Keras backbone"):
        ImageClassifier(object(), num_classes=3)


def test_lr_multiplier_errors(small_backbone):
    clf = ImageClassifier(small_backbone, num_classes=3)
    with pytest.raises(ValueError, match="layer_decay must be a finite number >= 0, got -0.5"):
        clf.lr_multipliers(-0.5)
    with pytest.raises(ValueError, match=r"multipliers\['a'\] must be a finite number >= 0"):
        LRMultiplierOptimizer(keras.optimizers.SGD(0.1), {"a": float("nan")})
    with pytest.raises(ValueError, match="1 multiplier path\\(s\\) name no variable this "
                                         "optimizer updates, e.g. \\['nope/kernel'\\]"):
        LRMultiplierOptimizer(keras.optimizers.SGD(0.1), {"nope/kernel": 0.5}).build(
            [keras.Variable(np.zeros(2, "float32"), name="w")])
    built = keras.optimizers.SGD(0.1)
    built.build([keras.Variable(np.zeros(2, "float32"), name="w")])
    with pytest.raises(ValueError, match="is already built"):
        LRMultiplierOptimizer(built, {})
    with pytest.raises(ValueError, match="use_ema=True"):
        LRMultiplierOptimizer(keras.optimizers.SGD(0.1, use_ema=True), {})
    with pytest.raises(ValueError, match="takes no optimizer arguments"):
        LRMultiplierOptimizer(keras.optimizers.SGD(0.1), {}, weight_decay=0.1)


def test_exported_at_the_top_level():
    assert poa_keras.ImageClassifier is ImageClassifier

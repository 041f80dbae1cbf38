"""eval/linear.py: probe features (CLS, + CLS of earlier blocks, + mean patch token) against
direct backbone calls and an independently built one-block ViT; the lr grid on separable
features and on a colour task seen by a frozen random ViT (best = the per-lr maximum, labels
followed); divergence; argument errors."""
import keras
import numpy as np
import pytest
from conftest import forward, randomize, to_np

from poa_keras import ElasticViT
from poa_keras.eval.features import preprocess_uint8
from poa_keras.eval.linear import linear_probe, probe_features, train_linear_classifier


@pytest.fixture(scope="module")
def probe_vit():
    model = ElasticViT.from_config_name("vit_elastic_test", name="probe_vit")
    randomize(model, seed=3)   # every weight from a seeded numpy generator
    return model


def best_by_rule(result, lrs):
    """The documented choice, written out: highest top-1, then top-5, then the earlier lr."""
    runs = result["per_learning_rate"]
    finite = [lr for lr in lrs if not runs[lr]["diverged"]]
    return sorted(finite, key=lambda lr: (-runs[lr]["top1"], -runs[lr]["top5"],
                                          lrs.index(lr)))[0]


# ----- features ----------------------------------------------------------------------------------

def one_block_vit(model):
    """A depth-1 ViT holding `model`'s embeddings, block 0 and final norm: its CLS output is
    block 0's CLS after the final norm, computed without the per-block output code path."""
    config = model.get_config()
    config.update(depth=1, min_depth=1, named_subnets={}, name="probe_vit_block0")
    one = ElasticViT.from_config(config)
    one.patch_embed.set_weights(model.patch_embed.get_weights())
    one.cls_token.assign(model.cls_token)
    one.pos_embed.assign(model.pos_embed)
    one.blocks[0].set_weights(model.blocks[0].get_weights())
    one.norm.set_weights(model.norm.get_weights())
    return one


def test_probe_features_concatenate_block_cls_and_mean_patch_token(probe_vit):
    images = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    spec = (64, 2)   # runs blocks [0, 3] of 4
    kwargs = dict(subnet=spec, batch_size=4)   # 6 images: one full and one padded batch
    cls = probe_features(probe_vit, images, **kwargs)
    avg = probe_features(probe_vit, images, avgpool=True, **kwargs)
    last2 = probe_features(probe_vit, images, last_blocks=2, **kwargs)
    both = probe_features(probe_vit, images, avgpool=True, last_blocks=2, **kwargs)
    assert cls.shape == (6, 64) and avg.shape == (6, 128)
    assert last2.shape == (6, 128) and both.shape == (6, 192)
    assert all(f.dtype == np.float32 for f in (cls, avg, last2, both))

    x = preprocess_uint8(images)
    out = forward(probe_vit, x, spec)
    mean_patch = to_np(out["patch_tokens"]).mean(axis=1)
    block0 = to_np(forward(one_block_vit(probe_vit), x)["cls"])
    assert np.abs(block0 - to_np(out["cls"])).max() > 0.1   # the two blocks really differ
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cls, to_np(out["cls"]), **tol)
    np.testing.assert_allclose(avg, np.concatenate([cls, mean_patch], axis=1), **tol)
    np.testing.assert_allclose(last2, np.concatenate([block0, cls], axis=1), **tol)
    np.testing.assert_allclose(both, np.concatenate([block0, cls, mean_patch], axis=1), **tol)


def plain_and_with_blocks(model, x, subnet):
    """model(x, subnet) and model(x, subnet, return_blocks=True); jitted together on JAX."""
    def both(call):
        return call(x, subnet=subnet), call(x, subnet=subnet, return_blocks=True)

    if keras.backend.backend() != "jax":
        return both(model)
    import jax

    def stateless(trainable, non_trainable, x):
        def call(images, **kwargs):
            return model.stateless_call(trainable, non_trainable, images, **kwargs)[0]
        return call(x, subnet=subnet), call(x, subnet=subnet, return_blocks=True)

    return jax.jit(stateless)([v.value for v in model.trainable_variables],
                              [v.value for v in model.non_trainable_variables], x)


def test_return_blocks_leaves_the_default_outputs_unchanged(probe_vit):
    x = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    plain, extra = plain_and_with_blocks(probe_vit, x, (32, 2))
    assert sorted(plain) == ["cls", "patch_tokens", "pooled"]
    assert sorted(extra) == ["blocks", "cls", "patch_tokens", "pooled"]
    for key in plain:
        np.testing.assert_array_equal(to_np(extra[key]), to_np(plain[key]))
    assert [tuple(b.shape) for b in extra["blocks"]] == [(2, 17, 32)] * 2
    np.testing.assert_array_equal(to_np(extra["blocks"][-1][:, 0]), to_np(plain["cls"]))


# ----- the classifier grid -----------------------------------------------------------------------

def separable(rng, n, num_classes=3, dim=8):
    centres = 4.0 * np.eye(num_classes, dim)
    labels = np.arange(n) % num_classes
    return (centres[labels] + 0.5 * rng.normal(size=(n, dim))).astype("float32"), labels


def test_grid_on_separable_features_picks_the_best_and_reports_progress(capsys):
    rng = np.random.default_rng(0)
    train, train_y = separable(rng, 60)
    val, val_y = separable(rng, 30)
    lrs = [1e-4, 0.3, 0.1]
    result = train_linear_classifier(train, train_y, val, val_y, 3, learning_rates=lrs,
                                     epochs=4, batch_size=16, verbose=2)
    runs = result["per_learning_rate"]
    assert sorted(runs) == sorted(lrs)
    assert result["best_learning_rate"] == best_by_rule(result, lrs)
    # 0.3 and 0.1 both separate the classes perfectly: the tie goes to the earlier (0.3).
    assert runs[0.3]["top1"] == runs[0.1]["top1"] == 1.0
    assert result["best_learning_rate"] == 0.3 and result["top1"] == 1.0
    assert all(r["top5"] == 1.0 for r in runs.values())   # 3 classes: top-5 is top-3
    assert result["feature_dim"] == 8 and result["num_classes"] == 3
    assert runs[0.1]["train_loss"] < runs[1e-4]["train_loss"]
    out = capsys.readouterr().out
    for lr in lrs:
        assert f"linear probe lr={lr:g}:" in out
    # The chosen classifier is a Keras model on the features: its predictions give the top-1.
    logits = result["classifier"].predict(val, batch_size=30, verbose=0)
    assert logits.shape == (30, 3)
    assert np.mean(np.argmax(logits, axis=1) == val_y) == result["top1"]


def plain_sgd_run(train, train_y, lr, epochs, batch_size, seed=0):
    """One classifier of learning rate `lr` trained the ordinary way (a plain Keras SGD, no
    grid, no per-variable multipliers) on the documented batch stream and initial weights."""
    n, dim = train.shape
    kernel0 = np.random.default_rng(seed).normal(0.0, 0.01, (dim, 3)).astype("float32")
    rng = np.random.default_rng(seed)   # the batch order: one permutation per epoch
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    model = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(3)])
    model.layers[0].set_weights([kernel0, np.zeros(3, "float32")])
    steps = epochs * n // batch_size
    model.compile(optimizer=keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps), momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train[order], train_y[order], batch_size=batch_size, epochs=1, shuffle=False,
              verbose=0)
    return [to_np(w) for w in model.layers[0].weights]


def test_each_head_of_the_grid_equals_its_own_plain_sgd_run():
    rng = np.random.default_rng(2)
    train, train_y = separable(rng, 48)
    val, val_y = separable(rng, 12)
    result = train_linear_classifier(train, train_y, val, val_y, 3, learning_rates=(0.5, 0.05),
                                     epochs=2, batch_size=16)
    best = result["best_learning_rate"]
    kernel, bias = plain_sgd_run(train, train_y, best, epochs=2, batch_size=16)
    assert np.abs(kernel - np.random.default_rng(0).normal(0.0, 0.01, kernel.shape)).max() > 0.1
    got = [to_np(w) for w in result["classifier"].get_layer("linear").weights]
    np.testing.assert_allclose(got[0], kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], bias, rtol=1e-4, atol=1e-5)


def test_a_diverging_learning_rate_is_never_chosen():
    rng = np.random.default_rng(1)
    train, train_y = separable(rng, 24)
    val, val_y = separable(rng, 12)
    train = train * 1e3
    result = train_linear_classifier(train, train_y, val * 1e3, val_y, 3,
                                     learning_rates=(1e36, 0.1), epochs=3, batch_size=8)
    runs = result["per_learning_rate"]
    assert runs[1e36]["diverged"] and runs[1e36]["top1"] is None
    assert not runs[0.1]["diverged"] and result["best_learning_rate"] == 0.1
    with pytest.raises(RuntimeError, match="every learning rate of the grid"):
        train_linear_classifier(train, train_y, val * 1e3, val_y, 3, learning_rates=1e36,
                                epochs=3, batch_size=8)


def solid_colours(rng, per_class):
    """Four classes, each a distinct solid colour with a little pixel noise."""
    colours = np.array([[230, 30, 30], [30, 200, 40], [40, 40, 220], [220, 220, 40]])
    labels = np.repeat(np.arange(4), per_class)
    noise = rng.integers(-12, 13, (labels.size, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(labels.size)
    return images[order], labels[order]


def test_linear_probe_of_a_frozen_random_vit_learns_colours(probe_vit, capsys):
    rng = np.random.default_rng(6)
    train_x, train_y = solid_colours(rng, 10)
    val_x, val_y = solid_colours(rng, 5)
    lrs = [1e-5, 0.03, 0.3]
    result = linear_probe(probe_vit, train_x, train_y, val_x, val_y, subnet="small",
                          learning_rates=lrs, epochs=5, batch_size=16, feature_batch_size=20)
    assert capsys.readouterr().out == ""   # quiet by default
    runs = result["per_learning_rate"]
    assert result["best_learning_rate"] == best_by_rule(result, lrs)
    assert result["top1"] >= 0.95, runs
    assert runs[1e-5]["top1"] < result["top1"]
    assert result["subnet"] == probe_vit.resolve_subnet("small")
    assert result["feature_dim"] == 32 and not result["avgpool"] and result["last_blocks"] == 1

    # The classifier follows the training labels: trained on colour k labelled (k + 1) % 4,
    # it must miss every true validation label.
    kwargs = dict(subnet="small", batch_size=20)
    train_f = probe_features(probe_vit, train_x, verbose=1, **kwargs)
    assert "2/2" in capsys.readouterr().out   # a progress bar over the 2 batches
    val_f = probe_features(probe_vit, val_x, **kwargs)
    moved = train_linear_classifier(train_f, (train_y + 1) % 4, val_f, val_y, 4,
                                    learning_rates=result["best_learning_rate"], epochs=5,
                                    batch_size=16)
    assert moved["top1"] <= 0.1, moved["per_learning_rate"]
    assert moved["top5"] == 1.0


# ----- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, match", [
    (dict(learning_rates=()), ValueError, "learning_rates must hold at least one"),
    (dict(learning_rates=(0.1, -1.0)), ValueError,
     r"every learning rate must be a finite number > 0, got -1.0"),
    (dict(learning_rates=("fast",)), TypeError, "every learning rate must be a number"),
    (dict(epochs=0), ValueError, "epochs must be >= 1, got 0"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(momentum=1.0), ValueError, r"momentum must be a number in \[0, 1\), got 1.0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1, got 0"),
    (dict(verbose=3), ValueError, "verbose must be 0, 1 or 2, got 3"),
    (dict(val_features=np.ones((5, 3), "float32")), ValueError,
     "same feature dimension, got 4 and 3"),
    (dict(train_labels=np.zeros(9, int)), ValueError,
     "train_labels has 9 labels but train_features has 10 rows"),
    (dict(val_labels=np.full(5, 3)), ValueError,
     r"val_labels must lie in \[0, num_classes=3\), got label 3"),
    (dict(val_features=np.zeros((0, 4), "float32"), val_labels=np.zeros(0, int)), ValueError,
     "val_features is empty"),
])
def test_train_linear_classifier_errors(change, error, match):
    args = dict(train_features=np.ones((10, 4), "float32"), train_labels=np.zeros(10, int),
                val_features=np.ones((5, 4), "float32"), val_labels=np.zeros(5, int),
                num_classes=3)
    args.update(change)
    with pytest.raises(error, match=match):
        train_linear_classifier(**args)


class _NoBlockOutputs:
    """A backbone-like object whose call cannot return per-block outputs."""
    name = "flat"
    in_channels = 3

    def resolve_subnet(self, subnet):
        return None

    def feature_dim(self, subnet=None):
        return 4

    def call(self, images, subnet=None, training=None):
        raise AssertionError("never called: the arguments are checked first")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(last_blocks=0), ValueError, "last_blocks must be >= 1, got 0"),
    (dict(last_blocks=3, subnet=(64, 2)), ValueError,
     r"last_blocks=3 but probe_vit runs 2 blocks .* valid: 1..2"),
    (dict(last_blocks=1.5), TypeError, "last_blocks must be an int"),
    (dict(avgpool="yes"), TypeError, "avgpool must be True or False, got 'yes'"),
    (dict(subnet=(48, 7)), ValueError, "depth=7 is out of range"),
    (dict(pixel_normalization="zscore"), ValueError, "pixel_normalization must be one of"),
])
def test_probe_feature_errors(probe_vit, kwargs, error, match):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(error, match=match):
        probe_features(probe_vit, images, **kwargs)
    with pytest.raises(error, match=match):
        linear_probe(probe_vit, images, np.zeros(2, int), images, np.zeros(2, int), **kwargs)


def test_last_blocks_needs_a_backbone_with_block_outputs():
    with pytest.raises(ValueError, match="last_blocks=2 needs per-block outputs, which "
                                         "_NoBlockOutputs does not provide"):
        probe_features(_NoBlockOutputs(), np.zeros((2, 32, 32, 3), np.uint8), last_blocks=2)

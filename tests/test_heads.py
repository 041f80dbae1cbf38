"""DINO / multi-projection heads against an independent numpy forward written from REFERENCE.md
(§1 "Heads and losses", §2 DINO): Linear-GELU-Linear-GELU-Linear, L2-normalise, then the
weight-normalised last layer W = g * v / ||v|| (norm per prototype over the bottleneck axis);
the first linear elastic with alpha = in_dim / w."""
import keras
import numpy as np
import pytest
from conftest import to_np
from scipy.special import erf

from poa_keras.heads import DINOHead, MultiProjectionHead

TINY = dict(in_dim=32, out_dim=50, hidden_dim=64, bottleneck_dim=16)


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _randomize(layer, seed):
    """Moderate random values in every weight, including a gain g far from 1 (assigned even when
    it is non-trainable), so that a missing normalisation or scale shows."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if v.path.endswith("weight_g"):
            v.assign(rng.uniform(0.5, 2.0, size=tuple(v.shape)).astype("float32"))
        else:
            v.assign(rng.normal(0.0, 0.3, size=tuple(v.shape)).astype("float32"))


def numpy_head(head, x, width=None):
    """The reference head forward in float64 numpy, reading the head's raw weights."""
    width = head.in_dim if width is None else width
    kernels = [to_np(head.mlp[0].dense.kernel)] + [to_np(d.kernel) for d in head.mlp[1:]]
    biases = [to_np(head.mlp[0].dense.bias)] + [to_np(d.bias) for d in head.mlp[1:]]
    h = (x.astype(np.float64) * (head.in_dim / width)) @ kernels[0][:width] + biases[0]
    for k, b in zip(kernels[1:], biases[1:]):
        h = _gelu(h) @ k + b
    z = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v, g = to_np(head.last_layer.weight_v), to_np(head.last_layer.weight_g)
    w = g[None, :] * v / np.linalg.norm(v, axis=0, keepdims=True)  # (bottleneck, out_dim)
    return z @ w


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(4, 32)).astype("float32")


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_output_shapes(num_layers):
    head = DINOHead(**TINY, num_layers=num_layers)
    assert tuple(head(np.zeros((4, 32), "float32")).shape) == (4, 50)
    assert tuple(head(np.zeros((2, 3, 32), "float32")).shape) == (2, 3, 50)  # tokens
    assert tuple(head(np.zeros((4, 16), "float32")).shape) == (4, 50)  # elastic width
    assert len(head.mlp) == num_layers
    expected = (TINY["bottleneck_dim"],) if num_layers == 1 else \
        (TINY["hidden_dim"],) * (num_layers - 1) + (TINY["bottleneck_dim"],)
    assert tuple(int(layer.units) for layer in head.mlp) == expected


def test_multi_projection_head_shapes():
    mph = MultiProjectionHead(32, out_dims=(50, 70, 90), hidden_dim=64, bottleneck_dim=16)
    outs = mph(np.zeros((4, 32), "float32"))
    assert [tuple(o.shape) for o in outs] == [(4, 50), (4, 70), (4, 90)]
    outs = mph(np.zeros((4, 16), "float32"), active_in=16)
    assert [tuple(o.shape) for o in outs] == [(4, 50), (4, 70), (4, 90)]


def test_variable_paths_are_nested_and_unique():
    """Paths name the owner, the head and the layer, so that two heads (or a student's and a
    teacher's) never share one, and trainers can find the last layers by path."""
    mph = MultiProjectionHead(32, out_dims=(50, 70), hidden_dim=64, bottleneck_dim=16,
                              name="student_heads")
    paths = [v.path for v in mph.weights]
    assert len(paths) == len(set(paths)) == 2 * (6 + 2)
    assert all(p.startswith("student_heads/head_") for p in paths)
    assert "student_heads/head_1/last_layer/weight_v" in paths
    assert "student_heads/head_0/mlp_0/dense/kernel" in paths
    head = DINOHead(**TINY, name="dino_head")
    assert {v.path for v in head.last_layer_variables()} == {"dino_head/last_layer/weight_v"}


@pytest.mark.parametrize("num_layers", [1, 3])
def test_full_forward_against_numpy(x, num_layers):
    head = DINOHead(**TINY, num_layers=num_layers, norm_last_layer=False)
    _randomize(head, seed=1)
    np.testing.assert_allclose(to_np(head(x)), numpy_head(head, x), rtol=1e-4, atol=1e-4)


def test_weight_normalised_last_layer_against_numpy():
    head = DINOHead(**TINY)
    _randomize(head, seed=2)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5, 16))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)  # an L2-normalised bottleneck
    v, g = to_np(head.last_layer.weight_v), to_np(head.last_layer.weight_g)
    expected = np.stack([[g[j] * z[b] @ v[:, j] / np.sqrt(np.sum(v[:, j] ** 2))
                          for j in range(50)] for b in range(5)])
    np.testing.assert_allclose(to_np(head.last_layer(z.astype("float32"))), expected,
                               rtol=1e-4, atol=1e-5)
    # the L2-normalised bottleneck of the head itself
    bottleneck = to_np(head.bottleneck(rng.normal(size=(3, 32)).astype("float32")))
    np.testing.assert_allclose(np.linalg.norm(bottleneck, axis=-1), 1.0, rtol=1e-5)


def test_fresh_last_layer_has_unit_norm_prototypes(x):
    """g starts at 1, so every prototype direction has norm 1 and |logit| <= 1 (cosine)."""
    head = DINOHead(**TINY)
    np.testing.assert_array_equal(to_np(head.last_layer.weight_g), np.ones(50))
    np.testing.assert_allclose(np.linalg.norm(to_np(head.last_layer.effective_kernel()), axis=0),
                               1.0, rtol=1e-5)
    assert np.all(np.abs(to_np(head(x))) <= 1.0 + 1e-5)


@pytest.mark.parametrize("width", [8, 16, 24])
def test_elastic_input_against_numpy_slicing(x, width):
    head = DINOHead(**TINY, norm_last_layer=False)
    _randomize(head, seed=4)
    xw = x[:, :width]
    expected = numpy_head(head, xw, width)  # first `width` kernel rows, times 32 / width
    np.testing.assert_allclose(to_np(head(xw, active_in=width)), expected, rtol=1e-4, atol=1e-4)
    # the active width defaults to the width of the input
    np.testing.assert_allclose(to_np(head(xw)), expected, rtol=1e-4, atol=1e-4)


def test_multi_projection_head_against_numpy(x):
    mph = MultiProjectionHead(32, out_dims=(50, 70), hidden_dim=64, bottleneck_dim=16)
    _randomize(mph, seed=5)
    for width in (32, 16):
        outs = mph(x[:, :width], active_in=width)
        for out, head in zip(outs, mph.heads):
            np.testing.assert_allclose(to_np(out), numpy_head(head, x[:, :width], width),
                                       rtol=1e-4, atol=1e-4)
    # each head has its own MLP
    assert len({id(h.mlp[0].dense.kernel) for h in mph.heads}) == 2


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_gain_trainable_per_norm_last_layer(norm_last_layer):
    head = DINOHead(**TINY, norm_last_layer=norm_last_layer)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    trainable = {w.path for w in head.trainable_weights}
    assert (g.path in trainable) is (not norm_last_layer)
    assert v.path in trainable
    assert (g.path in {w.path for w in head.non_trainable_weights}) is norm_last_layer
    expected = {v.path} if norm_last_layer else {v.path, g.path}
    assert {w.path for w in head.last_layer_variables()} == expected
    # MLP (3 kernels + 3 biases) + v (+ g)
    assert len(head.trainable_weights) == 7 + (0 if norm_last_layer else 1)


def test_multi_projection_head_last_layer_variables():
    mph = MultiProjectionHead(32, out_dims=(50, 70), hidden_dim=64, bottleneck_dim=16)
    paths = [w.path for w in mph.last_layer_variables()]
    assert len(paths) == 4  # POA's heads train the gain: v and g per head
    assert all("last_layer" in p for p in paths)
    frozen = MultiProjectionHead(32, out_dims=(50, 70), hidden_dim=64, bottleneck_dim=16,
                                 norm_last_layer=True)
    assert len(frozen.last_layer_variables()) == 2


def test_get_config_round_trip(x):
    head = DINOHead(**TINY, num_layers=2, norm_last_layer=False, name="dino_head")
    _randomize(head, seed=6)
    config = head.get_config()
    clone = DINOHead.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(head.get_weights())
    np.testing.assert_allclose(to_np(clone(x[:, :16])), to_np(head(x[:, :16])), rtol=1e-6,
                               atol=1e-6)
    # through Keras' registry (package "poa_keras")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert isinstance(restored, DINOHead) and restored.get_config() == config
    assert restored.last_layer.weight_g.trainable

    mph = MultiProjectionHead(32, out_dims=(50, 70), hidden_dim=64, bottleneck_dim=16)
    config = mph.get_config()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(mph))
    assert isinstance(clone, MultiProjectionHead) and clone.get_config() == config
    assert [h.out_dim for h in clone.heads] == [50, 70]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        DINOHead(**TINY, num_layers=0)
    head = DINOHead(**TINY)
    with pytest.raises(ValueError, match=r"active input width 40 must lie in \[1, 32\]"):
        head(np.zeros((2, 40), "float32"))
    with pytest.raises(ValueError, match="active_in=8 but the input has 16 channels"):
        head(np.zeros((2, 16), "float32"), active_in=8)
    with pytest.raises(ValueError, match="out_dims"):
        MultiProjectionHead(32, out_dims=())

"""Fake quantization (quantization/fake.py, observer.py, sampler.py) against numpy written from
REFERENCE.md §5, and its place in the elastic layers: quantized elastic forward == quantized
extracted subnet on every family."""
import json

import keras
import numpy as np
import pytest
from conftest import to_np
from keras import ops

from poa_keras.elastic.layers import ElasticDense, ElasticPatchEmbed
from poa_keras.quantization import (BitSampler, QuantConfig, fake_quant_activation,
                                    fake_quant_weight, parse_bits_pair, quantization_scope,
                                    quantize)
from poa_keras.quantization.fake import clamped_round_ste

BACKEND = keras.backend.backend()


# -- numpy references (REFERENCE.md §5) -------------------------------------------------------
def np_weight(w, b):
    """Symmetric per output channel (last axis): s = max|w| / ((2^b - 1) / 2),
    q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1); a zero channel stays zero. In float32, as
    the reference computes (w / s lands on a rounding tie or just below it alike)."""
    w = np.asarray(w, np.float32)
    axes = tuple(range(w.ndim - 1))
    s = np.abs(w).max(axis=axes) / np.float32((2.0 ** b - 1) / 2)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.round(w / safe), -2.0 ** (b - 1), 2.0 ** (b - 1) - 1)
    return np.where(s > 0, q * safe, w), s


def np_activation(x, b, low, high):
    """Asymmetric per tensor: s = (high - low) / (2^b - 1), zp = -round(low / s),
    q = clamp(round(x / s) + zp, 0, 2^b - 1), x_hat = (q - zp) s. In float32."""
    x = np.asarray(x, np.float32)
    low, high = np.float32(low), np.float32(high)
    s = (high - low) / np.float32(2.0 ** b - 1)
    if s == 0:
        return x
    zp = -np.round(low / s)
    q = np.clip(np.round(x / s) + zp, 0, 2.0 ** b - 1)
    return (q - zp) * s


def grad(fn, x):
    """d sum(fn(x)) / dx on the current backend."""
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: fn(v).sum())(x))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        v = tf.Variable(x)
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(fn(v))
        return tape.gradient(y, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    fn(v).sum().backward()
    return v.grad.numpy()


# -- the quantizers ----------------------------------------------------------------------------
def test_reference_worked_example_weight_b2():
    # REFERENCE.md §5: b = 2, w = [1.5, -1.5, 0.2] -> scale 1, q = [1, -2, 0] (+max clipped)
    w = np.array([[1.5], [-1.5], [0.2]], np.float32)
    out = to_np(fake_quant_weight(w, 2))
    np.testing.assert_array_equal(out[:, 0], [1.0, -2.0, 0.0])


def test_reference_worked_example_activation():
    # range [-1, 3] at 2 bits: s = 4/3, zp = -round(-0.75) = 1; levels (q - 1) * 4/3
    x = np.array([-2.0, -1.0, 0.5, 0.7, 1.9, 3.0, 5.0], np.float32)
    out = to_np(fake_quant_activation(x, 2, -1.0, 3.0))
    s = 4.0 / 3.0
    np.testing.assert_allclose(out, [-s, -s, 0.0, s, s, 2 * s, 2 * s], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantizer_matches_numpy_per_channel(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 3, 5, 6)).astype(np.float32)
    w[..., 2] *= 10.0    # a channel of another scale: per-channel scales differ
    ref, scale = np_weight(w, bits)
    out = to_np(fake_quant_weight(w, bits))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # every channel lies on its own grid of at most 2^b levels
    for c in range(w.shape[-1]):
        levels = np.unique(np.round(out[..., c] / scale[c]))
        assert len(levels) <= 2 ** bits
        assert levels.min() >= -2 ** (bits - 1) and levels.max() <= 2 ** (bits - 1) - 1
    # per channel, not per tensor: one scale for the whole tensor would differ
    per_tensor = np_weight(w.reshape(-1, 1), bits)[0].reshape(w.shape)
    assert np.abs(per_tensor - out).max() > 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantizer_matches_numpy_per_tensor(bits):
    rng = np.random.default_rng(10 + bits)
    x = rng.normal(size=(4, 7, 9)).astype(np.float32) * 3 + 0.5
    low, high = float(np.quantile(x, 0.05)), float(np.quantile(x, 0.9))   # clamps both ends
    out = to_np(fake_quant_activation(x, bits, low, high))
    np.testing.assert_allclose(out, np_activation(x, bits, low, high), rtol=1e-5, atol=1e-5)
    assert len(np.unique(np.round(out, 5))) <= 2 ** bits


def test_bits_as_runtime_tensors_and_float():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    x = rng.normal(size=(16,)).astype(np.float32)
    for b in (3, 5):
        bits = ops.convert_to_tensor(float(b))
        np.testing.assert_array_equal(to_np(fake_quant_weight(w, bits)),
                                      to_np(fake_quant_weight(w, b)))
        np.testing.assert_array_equal(to_np(fake_quant_activation(x, bits, -1.0, 1.0)),
                                      to_np(fake_quant_activation(x, b, -1.0, 1.0)))
    float_bits = ops.convert_to_tensor(32.0)
    np.testing.assert_array_equal(to_np(fake_quant_weight(w, float_bits)), w)
    np.testing.assert_array_equal(to_np(fake_quant_activation(x, float_bits, -1.0, 1.0)), x)
    np.testing.assert_array_equal(to_np(fake_quant_weight(w, 32)), w)


def test_zero_scale_channel_and_empty_range():
    # the reference returns the whole tensor unquantized when one channel's scale is zero;
    # here only that channel is left (it is all zeros), the others are quantized
    w = np.array([[0.0, 0.3], [0.0, -0.7], [0.0, 0.1]], np.float32)
    out = to_np(fake_quant_weight(w, 2))
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(out[:, 1], np_weight(w[:, 1:], 2)[0][:, 0], rtol=1e-6)
    x = np.full((5,), 0.37, np.float32)
    np.testing.assert_array_equal(to_np(fake_quant_activation(x, 4, 0.37, 0.37)), x)


def test_ste_gradient_activation_one_inside_zero_outside():
    x = np.linspace(-3, 3, 25).astype(np.float32)
    g = grad(lambda v: fake_quant_activation(v, 4, -1.0, 2.0), x)
    s = 3.0 / 15
    zp = -np.round(-1.0 / s)
    rounded = np.round(x / s) + zp
    inside = (rounded >= 0) & (rounded <= 15)
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    assert inside.any() and (~inside).any()


def test_ste_gradient_weight():
    # b = 2, one channel: w / s for s = 2 / 1.5 -> q = round(...) clipped to [-2, 1]
    w = np.array([[2.0], [-2.0], [0.4], [-0.9], [1.2]], np.float32)
    s = 2.0 / 1.5
    rounded = np.round(w[:, 0] / s)
    inside = (rounded >= -2) & (rounded <= 1)
    assert not inside[0]     # +max rounds to 2 and is clipped
    g = grad(lambda v: fake_quant_weight(v, 2, detach_scale=True), w)
    np.testing.assert_array_equal(g[:, 0], inside.astype(np.float32))
    # the reference's default: the scale is not detached, so the largest |w| also receives
    # gradient through the scale; every other weight's gradient is still the STE's
    g = grad(lambda v: fake_quant_weight(v, 2), w)
    np.testing.assert_allclose(g[2:, 0], inside[2:].astype(np.float32), atol=1e-6)
    assert np.abs(g[:2, 0] - inside[:2]).max() > 1e-3


def test_clamp_gradient_at_the_bound_is_one():
    # a value that rounds ONTO the bound is inside (torch.clamp's rule, on every backend)
    x = np.array([0.9, 1.0, 1.4, 1.6], np.float32)
    g = grad(lambda v: clamped_round_ste(v, -2.0, 1.0), x)
    np.testing.assert_array_equal(g, [1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("bad", [1, 9, 33, 4.5, "4", True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="valid: 2..8 or 32"):
        fake_quant_weight(np.ones((2, 2), np.float32), bad)
    with pytest.raises(ValueError, match="valid: 2..8 or 32"):
        QuantConfig(bad, 8)


def test_bad_range_and_pairs():
    with pytest.raises(ValueError, match="low end exceeds the high end"):
        fake_quant_activation(np.ones(3, np.float32), 4, 2.0, 1.0)
    assert parse_bits_pair("4/4") == (4, 4) and parse_bits_pair(" 2/4 ") == (2, 4)
    assert parse_bits_pair("32") == (32, 32)
    for bad in ("4/x", "4", "4/4/4", "", "x"):
        with pytest.raises(ValueError, match="malformed bit-width pair"):
            parse_bits_pair(bad)
    with pytest.raises(ValueError, match="weight bit-width in '9/4'.*2..8"):
        parse_bits_pair("9/4")
    with pytest.raises(ValueError, match="activation bit-width in '4/1'.*2..8"):
        parse_bits_pair("4/1")
    with pytest.raises(ValueError, match="unknown activation range mode 'minmax'"):
        QuantConfig(4, 4, ranges="minmax")


# -- the bit sampler ---------------------------------------------------------------------------
def test_bit_sampler_uniform_resumable_and_checked():
    sampler = BitSampler(seed=3)
    draws = [sampler.next() for _ in range(3000)]
    w, a = np.array(draws).T
    assert set(w) == set(range(2, 9)) and set(a) == set(range(4, 9))
    # uniform: every value within 20 % of its expected count
    for values, n in ((w, 7), (a, 5)):
        counts = np.bincount(values)[values.min():]
        assert np.all(np.abs(counts - len(values) / n) < 0.2 * len(values) / n)
    state = json.loads(json.dumps(sampler.get_state()))
    expected = [sampler.next() for _ in range(5)]
    other = BitSampler(seed=99)
    other.set_state(state)
    assert [other.next() for _ in range(5)] == expected
    mixed = BitSampler(seed=0, float_probability=0.5)
    assert 0.4 < np.mean([mixed.next() == (32, 32) for _ in range(2000)]) < 0.6
    with pytest.raises(ValueError, match="valid: 2..8"):
        BitSampler(weight_bits=(1, 2))
    with pytest.raises(ValueError, match="at least one"):
        BitSampler(activation_bits=())
    with pytest.raises(ValueError, match="32 is not supported; valid: 2..8$"):
        BitSampler(weight_bits=(4, 32))   # float steps come from float_probability
    with pytest.raises(ValueError, match="bit sampler state is for weight_bits"):
        BitSampler(weight_bits=(4, 8)).set_state(state)


# -- in the elastic layers ---------------------------------------------------------------------
def test_elastic_dense_quantizes_input_and_kernel_in_a_scope():
    keras.utils.set_random_seed(0)
    layer = ElasticDense(6, 5, quantize_input=True)
    layer.build()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    kernel, bias = (to_np(v) for v in (layer.dense.kernel, layer.dense.bias))
    bias = rng.normal(size=bias.shape).astype(np.float32)
    layer.dense.bias.assign(bias)
    np.testing.assert_allclose(to_np(layer(x)), x @ kernel + bias, rtol=1e-5, atol=1e-6)
    with quantization_scope(QuantConfig(3, 5, ranges="batch")):
        out = to_np(layer(x))
        sliced = to_np(layer(x[:, :4], active_in=4, active_out=2))
    xq = np_activation(x, 5, x.min(), x.max())
    np.testing.assert_allclose(out, xq @ np_weight(kernel, 3)[0] + bias, rtol=1e-4, atol=1e-5)
    # sliced: the first 4 inputs and 2 outputs, alpha = 6 / 4 folded in BEFORE quantizing
    x4 = x[:, :4]
    xq4 = np_activation(x4, 5, x4.min(), x4.max())
    kq = np_weight(kernel[:4, :2] * 1.5, 3)[0]
    np.testing.assert_allclose(sliced, xq4 @ kq + bias[:2], rtol=1e-4, atol=1e-5)
    # a fixed-bits policy ignores the scope's width; None never quantizes
    fixed = ElasticDense(6, 5, weight_bits=8)
    fixed.build()
    fixed.dense.kernel.assign(kernel)
    with quantization_scope(QuantConfig(2, 4, ranges="batch")):
        np.testing.assert_allclose(to_np(fixed(x)), x @ np_weight(kernel, 8)[0],
                                   rtol=1e-4, atol=1e-5)
    never = ElasticDense(6, 5, weight_bits=None)
    never.build()
    never.dense.kernel.assign(kernel)
    with quantization_scope(QuantConfig(2, 4, ranges="batch")):
        np.testing.assert_allclose(to_np(never(x)), x @ kernel, rtol=1e-5, atol=1e-6)


def test_patch_embedding_is_8_bit_and_float_scope_is_exact():
    keras.utils.set_random_seed(0)
    layer = ElasticPatchEmbed(2, 4, in_channels=3)
    layer.build()
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    plain = to_np(layer(x))
    with quantization_scope(QuantConfig(32, 32, ranges="batch")):
        np.testing.assert_allclose(to_np(layer(x)), plain, rtol=1e-5, atol=1e-6)
    kernel, bias = to_np(layer.proj.kernel), to_np(layer.proj.bias)
    with quantization_scope(QuantConfig(2, 2, ranges="batch")):
        out = to_np(layer(x))
    xq = np_activation(x, 8, x.min(), x.max())
    patches = xq.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 12)
    ref = patches @ np_weight(kernel, 8)[0].reshape(12, 4) + bias
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def _outputs(model, images, **kwargs):
    out = model(images, training=False, **kwargs)
    return {k: to_np(v) for k, v in out.items() if k in ("cls", "patch_tokens", "pooled")}


@pytest.mark.parametrize("family", ["small_vit", "tiny_swin", "tiny_resnet"])
def test_quantized_elastic_forward_equals_quantized_extracted(family, request):
    if family == "tiny_swin" and BACKEND == "jax":
        pytest.skip("eager JAX compiles every op of a Swin forward (44 s in CI); the Swin's "
                    "quantized layers are the ViT's elastic layers, checked here on jax, and "
                    "this Swin check runs on tensorflow and torch")
    teacher = request.getfixturevalue(family)
    size = teacher.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    spec = teacher.subnets()[0]
    sub = teacher.extract(spec)
    # eager JAX compiles every op of a new forward (a minute for the Swin under load): the
    # three pairs on the ViT, one on the others (the quantizers are the same code)
    pairs = ((4, 4), (2, 4), (8, 8)) if family == "small_vit" else ((3, 4),)
    for bits in pairs:
        quant = QuantConfig(*bits, ranges="batch")
        elastic = _outputs(teacher, images, subnet=spec, quant=quant)
        extracted = _outputs(sub, images, quant=quant)
        plain = _outputs(sub, images)
        for key in elastic:
            step = np.abs(elastic[key] - plain[key]).max()
            assert step > 1e-4, (key, bits)    # quantization did something
            close = np.isclose(elastic[key], extracted[key], rtol=1e-4, atol=1e-4)
            # exact rounding ties may flip one level in rare elements (float summation order)
            assert close.mean() >= 0.99, (key, bits, close.mean())


def test_quantizing_an_int8_model_is_refused(small_vit):
    sub = small_vit.extract(small_vit.subnets()[0])
    quantize(sub, "int8")
    images = np.zeros((1, sub.image_size, sub.image_size, 3), np.float32)
    with pytest.raises(ValueError, match="already quantized \\(int8\\).*float weights"):
        sub(images, quant=QuantConfig(4, 4))


def test_preset_round_trip_keeps_calibrated_ranges(small_vit, tmp_path):
    sub = small_vit.extract(small_vit.subnets()[0])
    quantizers = [q for q in sub._flatten_layers() if type(q).__name__ == "ActivationQuantizer"]
    assert quantizers and not any(q.is_calibrated for q in quantizers)
    for i, q in enumerate(quantizers):
        q.set_range(-1.0 - i, 2.0 + i)
    sub.save_to_preset(tmp_path / "p")
    from poa_keras import Backbone

    loaded = Backbone.from_preset(tmp_path / "p")
    got = [to_np(q.range) for q in loaded._flatten_layers()
           if type(q).__name__ == "ActivationQuantizer"]
    np.testing.assert_array_equal(np.array(got), [[-1.0 - i, 2.0 + i] for i in range(len(got))])
    with pytest.raises(ValueError, match="low <= high"):
        quantizers[0].set_range(3.0, 1.0)


def test_preset_saved_before_quantizers_loads_uncalibrated(small_vit, tmp_path):
    """A weights file without the quantizers' entries (presets written before they existed)
    loads: the network's weights are all there, the ranges stay uncalibrated."""
    import h5py

    from poa_keras import Backbone
    from poa_keras.presets import sha256_of

    sub = small_vit.extract(small_vit.subnets()[0])
    sub.save_to_preset(tmp_path / "old")
    weights = tmp_path / "old" / "model.weights.h5"
    removed = []
    with h5py.File(weights, "a") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "input_quantizer":
                removed.append(name)
        f.visititems(visit)
        for name in removed:
            del f[name]
    assert removed
    metadata_path = tmp_path / "old" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["weights_sha256"] = sha256_of(weights)
    metadata_path.write_text(json.dumps(metadata))
    loaded = Backbone.from_preset(tmp_path / "old")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(to_np(loaded(images)["cls"]), to_np(sub(images)["cls"]))
    assert not any(q.is_calibrated for q in loaded._flatten_layers()
                   if type(q).__name__ == "ActivationQuantizer")

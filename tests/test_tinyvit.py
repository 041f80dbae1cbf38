"""TinyViT (poa_keras/backbones/tinyvit.py): the published models' parameter counts, the forward
of the tiny configuration against an independent numpy forward written from REFERENCE.md §4
(on the official state-dict keys, so the documented key mapping is checked on the way), the
attention-bias table's indexing, output shapes at 224 and at sizes that are multiples of
nothing, and the errors. The shared contract (presets, extraction, int8, export, DINO, ...)
runs in tests/test_family_contract.py."""
import itertools

import keras
import numpy as np
import pytest
from conftest import forward, randomize, randomize_bn_variances, to_np
from scipy.special import erf

from poa_keras import ImageClassifier, TinyViT
from poa_keras.backbones import config_names, from_config_name
from poa_keras.backbones.tinyvit import CONFIGS, EXPECTED_PARAMS, attention_bias_index
from poa_keras.elastic.layers import HostInitializer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- the official state dict of a Keras TinyViT (the module docstring's mapping) -----------
def _to_torch(path, value):
    """(official key, array in torch layout) of one Keras variable path (below the model's
    name)."""
    parts = path.split("/")
    top, rest = parts[0], parts[1:]
    if top.startswith("patch_embed_seq_"):
        prefix = "patch_embed.seq." + top.rsplit("_", 1)[1]
    elif top.startswith("layers_"):
        _, i, kind, *j = top.split("_")
        prefix = f"layers.{i}.{kind}" + (f".{j[0]}" if j else "")
    else:
        prefix = top
    leaf = rest[-1]
    names = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
             "moving_variance": "running_var", "bias": "bias"}
    if leaf == "kernel":   # the conv / linear weight
        if value.ndim == 2:            # Dense (in, out) -> (out, in), or (out, in, 1, 1) conv
            value = value.T
            if rest[-3] == "c":
                value = value[:, :, None, None]
        elif rest[-2] == "conv":       # (k, k, in, out) -> (out, in, k, k)
            value = value.transpose(3, 2, 0, 1)
        else:                          # depthwise (k, k, C, 1) -> (C, 1, k, k)
            value = value.transpose(2, 3, 0, 1)
        key = ".".join([prefix] + [p for p in rest[:-1] if p not in ("dense", "conv")]
                       + ["weight"])
    elif leaf == "attention_biases":
        key = ".".join([prefix] + rest)
    else:
        key = ".".join([prefix] + [p for p in rest[:-1] if p != "dense"] + [names[leaf]])
    return key, value


def state_dict(model):
    out = {}
    for v in model.weights:
        key, value = _to_torch(v.path.split("/", 1)[1], to_np(v))
        assert key not in out, key
        out[key] = value
    return out


def official_classifier_state(config_name, num_classes, seed=0, head_scale=0.2):
    """(source TinyViT with random weights and BatchNorm statistics, its state dict in the
    official layout with a random ``head.*`` of ``num_classes``): what a released file of
    that configuration holds."""
    keras.utils.set_random_seed(seed)
    source = TinyViT.from_config_name(config_name, name="source")
    randomize(source, seed=seed + 1)
    randomize_bn_variances(source, seed=seed + 2)
    sd = state_dict(source)
    rng = np.random.default_rng(seed + 3)
    dim = CONFIGS[config_name]["embed_dims"][-1]
    sd["head.weight"] = rng.normal(0, head_scale, (num_classes, dim)).astype("float32")
    sd["head.bias"] = rng.normal(0, head_scale, num_classes).astype("float32")
    return source, sd


# ----- an independent numpy forward (NCHW, as the reference) ------------------------------------
def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def conv2d(x, w, stride, pad, groups=1):
    """PyTorch's Conv2d without bias: x (B, C, H, W), w (O, C / groups, k, k)."""
    k = w.shape[-1]
    x = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    h = (x.shape[2] - k) // stride + 1
    wd = (x.shape[3] - k) // stride + 1
    out = 0.0
    for i, j in itertools.product(range(k), range(k)):
        patch = x[:, :, i:i + stride * (h - 1) + 1:stride, j:j + stride * (wd - 1) + 1:stride]
        if groups == 1:
            out = out + np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
        else:   # depthwise
            out = out + patch * w[:, 0, i, j][None, :, None, None]
    return out


def conv_bn(sd, name, x, stride=1, groups=1):
    w = sd[name + ".c.weight"]
    y = conv2d(x, w, stride, w.shape[-1] // 2, groups)
    shape = (1, -1, 1, 1)
    return ((y - sd[name + ".bn.running_mean"].reshape(shape))
            / np.sqrt(sd[name + ".bn.running_var"].reshape(shape) + 1e-5)
            * sd[name + ".bn.weight"].reshape(shape) + sd[name + ".bn.bias"].reshape(shape))


def layer_norm(sd, name, x):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def official_bias_idxs(ws):
    """The reference's construction: offsets numbered in the order they are first met."""
    points = list(itertools.product(range(ws), range(ws)))
    offsets, idxs = {}, []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    return np.array(idxs).reshape(len(points), len(points))


def attention(sd, name, x, heads, ws):
    b, n, c = x.shape
    hd = c // heads
    x = layer_norm(sd, name + ".norm", x)
    qkv = linear(sd, name + ".qkv", x).reshape(b, n, heads, 3 * hd)
    q, k, v = (qkv[..., i * hd:(i + 1) * hd].transpose(0, 2, 1, 3) for i in range(3))
    bias = sd[name + ".attention_biases"][:, official_bias_idxs(ws)]
    attn = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5 + bias[None]
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    return linear(sd, name + ".proj", (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c))


def tinyvit_block(sd, name, x, heads, ws):
    """x: (B, C, H, W)."""
    b, c, h, w = x.shape
    tokens = x.transpose(0, 2, 3, 1)                        # (B, H, W, C)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    t = np.pad(tokens, [(0, 0), (0, pad_b), (0, pad_r), (0, 0)])
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // ws, pw // ws
    t = t.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    t = attention(sd, name + ".attn", t, heads, ws)          # no mask
    t = t.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    tokens = tokens + t[:, :h, :w]
    x = conv_bn(sd, name + ".local_conv", tokens.transpose(0, 3, 1, 2), groups=c)
    tokens = x.transpose(0, 2, 3, 1)
    m = linear(sd, name + ".mlp.fc2", gelu(linear(sd, name + ".mlp.fc1",
                                                 layer_norm(sd, name + ".mlp.norm", tokens))))
    return (tokens + m).transpose(0, 3, 1, 2)


def numpy_tinyvit(sd, config, images):
    """{"pooled": (B, C), "maps": [(B, H_i, W_i, C_i)]} of images (B, H, W, 3)."""
    x = images.transpose(0, 3, 1, 2).astype(np.float64)
    x = gelu(conv_bn(sd, "patch_embed.seq.0", x, 2))
    x = conv_bn(sd, "patch_embed.seq.2", x, 2)
    maps = []
    for i, depth in enumerate(config["depths"]):
        for j in range(depth):
            name = f"layers.{i}.blocks.{j}"
            if i == 0:
                y = gelu(conv_bn(sd, name + ".conv1", x))
                y = gelu(conv_bn(sd, name + ".conv2", y, groups=y.shape[1]))
                x = gelu(conv_bn(sd, name + ".conv3", y) + x)
            else:
                x = tinyvit_block(sd, name, x, config["num_heads"][i],
                                  config["window_sizes"][i])
        maps.append(x.transpose(0, 2, 3, 1))
        if i + 1 < len(config["depths"]):
            name = f"layers.{i}.downsample"
            y = gelu(conv_bn(sd, name + ".conv1", x))
            y = gelu(conv_bn(sd, name + ".conv2", y, 2, groups=y.shape[1]))
            x = conv_bn(sd, name + ".conv3", y)
    pooled = layer_norm(sd, "norm_head", x.mean(axis=(2, 3)))
    return {"pooled": pooled, "maps": maps}


@pytest.fixture(scope="module")
def tiny():
    """The tiny configuration with every weight random: the attention biases, the MBConv's
    zero-initialised BN scale and the BN statistics (variances positive) included."""
    keras.utils.set_random_seed(0)
    model = TinyViT.from_config_name("tinyvit_test", name="tiny_tinyvit")
    randomize(model, seed=1)
    randomize_bn_variances(model, seed=2)
    return model


# ----- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (27, 41)], ids=["32px", "27x41"])
def test_forward_equals_a_numpy_forward_of_the_reference(tiny, size):
    """32 px: stage maps 8, 4, 2, 1 with windows 3, 3, 2 (padded, several windows in stage 1,
    a window larger than the map in stages 2 and 3); 27 x 41: odd maps everywhere."""
    sd = state_dict(tiny)
    assert len(sd) == len(tiny.weights)
    assert sd["layers.1.blocks.0.attn.attention_biases"].shape == (2, 9)
    images = np.random.default_rng(3).uniform(-1, 1, size=(2,) + size + (3,)).astype("float32")
    out = forward(tiny, images, return_feature_maps=True)
    ref = numpy_tinyvit(sd, CONFIGS["tinyvit_test"], images)
    got = [to_np(m) for m in out["feature_maps"]]
    assert [g.shape[1:3] for g in got] == tiny.stage_sizes(size)
    for g, r in zip(got, ref["maps"]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(out["pooled"]), ref["pooled"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(to_np(out["cls"]), to_np(out["pooled"]))


def test_attention_bias_index_matches_the_reference_construction():
    for ws in (1, 2, 3, 7):
        np.testing.assert_array_equal(attention_bias_index(ws), official_bias_idxs(ws))
    index = attention_bias_index(7)
    assert index.max() == 48 and index[0, 8] == 1 * 7 + 1   # (0, 0) vs (1, 1)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_of_the_published_models(name):
    """Trainable parameters with our 1000-class ImageClassifier (pooled feature -> Dense) are
    the official models' exactly; built without random draws (zeros), no forward."""
    assert config_names()[name] == "TinyViT"
    expected = EXPECTED_PARAMS[name]
    assert TinyViT.unbuilt(config_name=name).trainable_params(1000) == expected
    with HostInitializer.skipped():
        backbone = TinyViT.from_config_name(name)
    assert backbone.count_params() == backbone.subnet_params()
    clf = ImageClassifier(backbone, 1000, pooling="avg")
    count = sum(int(np.prod(v.shape)) for v in clf.trainable_weights)
    assert count == expected, (name, count, expected)


def test_flops_of_the_published_models():
    """The paper's multiply-adds at 224 (1.3 / 2.0 / 4.3 G, one decimal) within rounding; the
    padded windows of a size that is not a multiple of them cost more than the map."""
    for name, macs in (("tinyvit_5m", 1.3), ("tinyvit_11m", 2.0), ("tinyvit_21m", 4.3)):
        model = TinyViT.unbuilt(config_name=name)
        terms = model.subnet_flops(breakdown=True)
        assert abs(terms["total"] / 2e9 - macs) <= 0.06, (name, terms["total"])
        assert terms["total"] == sum(v for k, v in terms.items() if k != "total")
        assert model.subnet_flops(include_norms=True) > terms["total"]
    tiny = TinyViT.unbuilt(config_name="tinyvit_test")
    # stage 1 at 32 px: 4 x 4 tokens padded to 6 x 6 (windows of 3)
    qkv = tiny.subnet_flops(breakdown=True)["qkv"]
    assert qkv == 2 * 16 * 3 * 16 * (36 + 2 * 9) + 2 * 24 * 3 * 24 * 4


def test_output_shapes_at_224_and_at_other_sizes():
    """The published windows (7, 7, 14, 7) on narrow stages: no padding at 224 (maps 56, 28,
    14, 7); at 200 x 150 every stage pads."""
    keras.utils.set_random_seed(0)
    model = from_config_name("tinyvit_5m", embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), name="narrow")
    assert model.stage_sizes() == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert model.stage_sizes((200, 150)) == [(50, 38), (25, 19), (13, 10), (7, 5)]
    for size in ((224, 224), (200, 150)):
        images = np.zeros((1,) + size + (3,), "float32")
        out = forward(model, images, return_feature_maps=True)
        assert [tuple(m.shape[1:]) for m in out["feature_maps"]] == [
            s + (c,) for s, c in zip(model.stage_sizes(size), (8, 16, 16, 16))]
        assert tuple(out["pooled"].shape) == (1, 16)
        assert np.isfinite(to_np(out["pooled"])).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(embed_dims=(8, 16, 16)), (r"one entry per stage.*embed_dims=\(8, 16, 16\), "
                                    r"depths=\(1, 1, 2, 1\)")),
    (dict(num_heads=(1, 3, 2, 3)), r"embed_dims\[1\]=16 is not a multiple of num_heads\[1\]=3"),
    (dict(window_sizes=(3, 0, 3, 2)), r"window_sizes must be .*positive ints, got \(3, 0, 3, 2\)"),
    (dict(depths=(1, "two", 1, 1)), r"depths must be a sequence of positive ints"),
    (dict(embed_dims=(1, 16, 16, 24)), r"embed_dims\[0\]=1.*at least 2"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\), got 1.0"),
    (dict(mlp_ratio=0), r"mlp_ratio must be positive, got 0"),
])
def test_bad_configuration_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TinyViT.from_config_name("tinyvit_test", **overrides)
    with pytest.raises(ValueError, match=r"unknown TinyViT configuration 'tinyvit_6m'.*"
                                         r"tinyvit_11m.*tinyvit_5m"):
        TinyViT.from_config_name("tinyvit_6m")


def test_bad_images_are_refused(tiny):
    with pytest.raises(ValueError, match=r"expects 3 channels .* got shape \(1, 32, 32, 1\)"):
        tiny(np.zeros((1, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match=r"takes float images.*uint8"):
        tiny(np.zeros((1, 32, 32, 3), "uint8"))
    if keras.backend.backend() == "tensorflow":   # a traced call with unknown image sizes
        import tensorflow as tf

        traced = tf.function(lambda x: tiny(x)["cls"],
                             input_signature=[tf.TensorSpec((None, None, None, 3))])
        with pytest.raises(ValueError, match=r"needs a static image height .*"
                                             r"\(None, None, None, 3\)"):
            traced.get_concrete_function()
    with pytest.raises(ValueError, match=r"is not elastic.*takes no \['width'\]"):
        tiny.subnet_from_kwargs(width=8)


def test_layer_decay_follows_the_reference(tiny):
    """``set_layer_lr_decay`` of the reference: block k (over all stages) gets decay **
    (depth - 1 - k), the stem block 0's scale, a patch merging its stage's last block's,
    norm_head 1 (depths (1, 1, 2, 1): 5 blocks)."""
    def mult(part):
        path = next(v.path for v in tiny.weights if f"/{part}/" in v.path)
        return tiny.lr_multiplier(path, layer_decay=0.5)

    assert tiny.max_layer_id == 4
    assert mult("patch_embed_seq_0") == mult("layers_0_blocks_0") == 0.5 ** 4
    assert mult("layers_1_blocks_0") == mult("layers_1_downsample") == 0.5 ** 3
    assert mult("layers_2_blocks_1") == mult("layers_2_downsample") == 0.5 ** 1
    assert mult("layers_3_blocks_0") == mult("norm_head") == 1.0
    with pytest.raises(ValueError, match=r"no block 1 in stage 3 .*depths \(1, 1, 2, 1\)"):
        tiny.layer_id("x/layers_3_blocks_1/attn/qkv/dense/kernel")


def test_fine_tuning_leaves_the_attention_bias_tables_undecayed(tiny):
    # the reference's no_weight_decay_keywords: {"attention_biases"} (2-D tables, so the
    # "at most one dimension" rule alone would decay them)
    from poa_keras.finetune import no_weight_decay

    tables = [v for v in tiny.trainable_variables if v.path.endswith("attention_biases")]
    kernels = [v for v in tiny.trainable_variables if v.path.endswith("qkv/dense/kernel")]
    assert tables and kernels and all(len(v.shape) == 2 for v in tables)
    assert all(no_weight_decay(v) for v in tables)
    assert not any(no_weight_decay(v) for v in kernels)


@pytest.mark.parametrize("strides, size", [(1, 9), (2, 9), (2, 10)])
def test_depthwise_taps_equal_keras_depthwise_conv(strides, size):
    # JAX on the CPU runs TinyViT's depthwise convs as a sum of shifted products (XLA's grouped
    # convolution is 10-30x slower there); the function must be the convolution on any backend
    from poa_keras.backbones.tinyvit import depthwise_taps

    rng = np.random.default_rng(strides + size)
    x = rng.normal(size=(2, size, size + 1, 5)).astype("float32")
    conv = keras.layers.DepthwiseConv2D(3, strides=strides, padding="valid", use_bias=False)
    conv.build(x.shape)
    conv.kernel.assign(rng.normal(size=(3, 3, 5, 1)).astype("float32"))
    want = keras.ops.convert_to_numpy(conv(x))
    got = keras.ops.convert_to_numpy(depthwise_taps(keras.ops.convert_to_tensor(x),
                                                    keras.ops.convert_to_tensor(conv.kernel),
                                                    strides))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

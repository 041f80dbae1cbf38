"""ElasticResNet: an independent numpy bottleneck and stem, stage shapes at odd sizes, errors,
the sampler rule, layer ids, parameter and FLOP counts. Forward == extract, round trips,
presets, int8, export, bfloat16, stochastic depth and the POA / DINO steps: the family contract
(tests/test_family_contract.py).

On JAX every forward goes through one jitted program per (architecture, subnet), shared by
all models of that architecture (backbones/compiled.py): compiling is what costs time on a
small CPU."""
import keras
import numpy as np
import pytest
from conftest import forward, randomize, to_np

from poa_keras import ElasticResNet, ResNetSubnet
from poa_keras.backbones.resnet import CONFIGS
from poa_keras.elastic.conv import ElasticBottleneck

BACKEND = keras.backend.backend()
TINY = dict(CONFIGS["resnet_elastic_test"])   # widths 8 / 12 (groups 4), depths (1, 1-2, 2-3, 1)


def run(model, images, subnet=None):
    """{"cls", "maps"} of ``model(images, subnet=subnet, return_feature_maps=True)`` as numpy."""
    out = forward(model, images, subnet, return_feature_maps=True)
    return {"cls": to_np(out["cls"]), "maps": [to_np(m) for m in out["feature_maps"]]}


def call_layer(layer, *args, **kwargs):
    """layer(*args, **kwargs), jitted on JAX (eager JAX compiles op by op: slower)."""
    if BACKEND != "jax":
        return layer(*args, **kwargs)
    import jax

    fn = jax.jit(lambda tv, ntv, *a: layer.stateless_call(tv, ntv, *a, **kwargs)[0])
    return fn([v.value for v in layer.trainable_variables],
              [v.value for v in layer.non_trainable_variables], *args)


@pytest.fixture(scope="module")
def tiny(tiny_resnet):
    return tiny_resnet   # conftest: the contract's ResNet teacher (compiled programs are shared)


@pytest.fixture(scope="module")
def odd_images():
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 33, 45, 3)).astype("float32")


# -- stage shapes (forward == extraction: the family contract) ----------------------------------
def test_stage_shapes_for_odd_input_sizes(tiny, odd_images):
    # PyTorch's rule, floor((n + 2p - k) / s) + 1, by hand: 33 x 45 -> stem conv 17 x 23 ->
    # max pool 9 x 12 -> stages 9 x 12, 5 x 6, 3 x 3, 2 x 2 (the 1 x 1/2 shortcut agrees).
    out = run(tiny, odd_images, tiny.subnets()[0])
    assert [m.shape for m in out["maps"]] == [(2, 9, 12, 32), (2, 5, 6, 64), (2, 3, 3, 128),
                                             (2, 2, 2, 256)]
    assert out["cls"].shape == (2, 256) == (2, tiny.feature_dim())
    np.testing.assert_allclose(out["cls"], out["maps"][-1].mean(axis=(1, 2)), atol=1e-6)


# -- an independent numpy reference ------------------------------------------------------------
def _np_conv(x, kernel, stride, pad):
    """Cross-correlation with symmetric zero padding, NHWC x HWIO (PyTorch's Conv2d)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    h = (x.shape[1] - k) // stride + 1
    w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i: i + stride * (h - 1) + 1: stride, j: j + stride * (w - 1) + 1: stride]
            out += patch @ kernel[i, j]
    return out


def _np_group_norm(x, gamma, beta, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def test_sliced_bottleneck_matches_numpy():
    """Mid width 24 of 48 (groups of 3 of 6 channels), stride 2, odd input: conv1 keeps the
    first 24 outputs; conv2 the first 24 in/out; conv3 the first 24 inputs; alpha = 48 / 24 on
    the inputs of conv2 and conv3; GroupNorm(8) over the 24 active channels."""
    keras.utils.set_random_seed(0)
    block = ElasticBottleneck(16, 48, 64, strides=2, groups=8, name="block")
    block.build()
    randomize(block, seed=2)
    x = np.random.default_rng(1).normal(size=(2, 7, 9, 16))
    w = {v.path.split("/", 1)[1]: to_np(v) for v in block.weights}
    m, alpha = 24, 48 / 24
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    y = x @ w["conv1/dense/kernel"][:, :m]
    y = relu(_np_group_norm(y, w["norm1/norm/gamma"][:m], w["norm1/norm/beta"][:m], 8))
    y = _np_conv(alpha * y, w["conv2/conv/kernel"][:, :, :m, :m], 2, 1)
    y = relu(_np_group_norm(y, w["norm2/norm/gamma"][:m], w["norm2/norm/beta"][:m], 8))
    y = (alpha * y) @ w["conv3/dense/kernel"][:m]
    y = _np_group_norm(y, w["norm3/norm/gamma"], w["norm3/norm/beta"], 8)
    shortcut = _np_conv(x, w["downsample/dense/kernel"][None, None], 2, 0)
    shortcut = _np_group_norm(shortcut, w["downsample_norm/norm/gamma"],
                              w["downsample_norm/norm/beta"], 8)
    expected = relu(y + shortcut)
    out = to_np(call_layer(block, x.astype("float32"), active=m))
    assert out.shape == expected.shape == (2, 4, 5, 64)
    np.testing.assert_allclose(out, expected, atol=1e-4 * np.abs(expected).max())


def test_stem_matches_numpy(tiny, odd_images):
    w = {v.path.split("/", 1)[1]: to_np(v) for v in tiny.weights if "stem" in v.path}
    x = odd_images.astype(np.float64)
    y = _np_conv(x, w["stem_conv/conv/kernel"], 2, 3)
    y = np.maximum(_np_group_norm(y, w["stem_norm/norm/gamma"], w["stem_norm/norm/beta"], 4), 0)
    y = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, wd = (y.shape[1] - 3) // 2 + 1, (y.shape[2] - 3) // 2 + 1
    expected = np.max([y[:, i: i + 2 * h - 1: 2, j: j + 2 * wd - 1: 2]
                       for i in range(3) for j in range(3)], axis=0)
    out = to_np(tiny.stem(odd_images))
    assert out.shape == expected.shape == (2, 9, 12, 8)
    np.testing.assert_allclose(out, expected, atol=1e-4 * np.abs(expected).max())


# -- the grid, the sampler, the hooks ----------------------------------------------------------
def test_grid_order_block_ids_and_sampler_counts(tiny):
    # depth combinations by total depth (ties lexicographic), width-major
    assert [s.depths for s in tiny.subnets()[:4]] == [(1, 1, 2, 1), (1, 1, 3, 1), (1, 2, 2, 1),
                                                      (1, 2, 3, 1)]
    assert [s.width for s in tiny.subnets()] == [8] * 4 + [12] * 4
    assert tiny.block_ids(ResNetSubnet(8, (1, 1, 2, 1))) == [[0], [0], [0, 2], [0]]
    assert tiny.block_ids() == [[0], [0, 1], [0, 1, 2], [0]]
    # reference rule: round(linspace(scale, 1, #depth combinations)), widths unweighted:
    # scale 2 -> [2, 1.67, 1.33, 1] -> [2, 2, 1, 1]; scale 3 -> [3, 2.33, 1.67, 1] -> [3, 2, 2, 1]
    assert tiny.sampling_counts() == [2, 2, 1, 1] * 2
    assert tiny.sampling_counts(3) == [3, 2, 2, 1] * 2
    freq = tiny.sampler(seed=0).frequencies()
    assert tiny.full_subnet not in freq
    assert freq[ResNetSubnet(8, (1, 1, 2, 1))] == pytest.approx(2 / 11)
    assert freq[ResNetSubnet(12, (1, 2, 2, 1))] == pytest.approx(1 / 11)
    demo = ElasticResNet.from_config_name("resnet_elastic_demo")
    # 6 depth combinations: linspace(2, 1, 6) = [2, 1.8, 1.6, 1.4, 1.2, 1] -> [2, 2, 2, 1, 1, 1]
    assert len(demo.subnets()) == 18 and demo.sampling_counts() == [2, 2, 2, 1, 1, 1] * 3


def test_family_hooks(tiny):
    spec = ResNetSubnet(8, (1, 2, 2, 1))
    assert tiny.feature_dim() == tiny.feature_dim(spec) == 256
    assert tiny.head_active_in(spec) is None   # every subnet's feature is 256 wide
    assert tiny.subnet_log_values(spec) == {"width": 8.0, "depth_1": 1.0, "depth_2": 2.0,
                                            "depth_3": 2.0, "depth_4": 1.0}
    assert not tiny.supports_masks
    assert tiny.subnet_from_kwargs(width=8) == ResNetSubnet(8, (1, 2, 3, 1))
    assert tiny.subnet_from_kwargs(depths=[1, 1, 2, 1]) == ResNetSubnet(12, (1, 1, 2, 1))
    assert tiny.resolve_subnet("small") == tiny.subnets()[0]
    assert tiny.resolve_subnet((8, (1, 1, 2, 1))) == tiny.subnets()[0]
    # layer ids (reference get_resnet_lr_decay_rate): stem 0, block j of stage s ->
    # sum(depths[:s]) + j + 1 (shortcut included); multiplier decay ** (7 - id)
    paths = [v.path for v in tiny.weights]
    stem = next(p for p in paths if "stem_conv" in p)
    s2_shortcut = next(p for p in paths if "stage2_block0/downsample/" in p)
    s3_last = next(p for p in paths if "stage3_block2/" in p)
    s4 = next(p for p in paths if "stage4_block0/" in p)
    assert tiny.lr_multiplier(stem, 0.5, 0.2) == pytest.approx(0.5 ** 7)  # no stem lr mult
    assert tiny.lr_multiplier(s2_shortcut, 0.5) == pytest.approx(0.5 ** 5)
    assert tiny.lr_multiplier(s3_last, 0.5) == pytest.approx(0.5 ** 1)
    assert tiny.lr_multiplier(s4, 0.5) == 1.0
    assert all(tiny.lr_multiplier(p) == 1.0 for p in paths)


def test_flops_and_params_of_the_reference_sizes():
    """Without building the teacher (172.6M parameters, seconds): the analytic counts only
    read the configuration, so a one-block-per-stage stand-in of the teacher's widths is given
    the teacher's depths. Independent numbers: torchvision's ResNet-50/101/152 have
    25,557,032 / 44,549,160 / 60,192,808 parameters including the 2,049,000 of the fc layer
    (GroupNorm has the same affine parameters as BatchNorm), and ResNet-50 costs 4.09 G
    multiply-adds at 224 x 224."""
    config = dict(CONFIGS["resnet_elastic"])
    small = ElasticResNet(**dict(config, max_depths=(1, 1, 1, 1), min_depths=(1, 1, 1, 1),
                                 named_subnets={}))
    small.min_depths, small.max_depths = (3, 4, 6, 3), (3, 8, 36, 3)
    for name, params in (("r50", 25_557_032), ("r101", 44_549_160), ("r152", 60_192_808)):
        spec = ResNetSubnet(*config["named_subnets"][name])
        assert small.subnet_params(spec) == params - 2_049_000, name
    r50 = ResNetSubnet(64, (3, 4, 6, 3))
    assert small.subnet_flops(r50) / 2 == pytest.approx(4.09e9, rel=0.005)
    parts = small.subnet_flops(r50, breakdown=True, include_norms=True)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert len(small.subnets()) == 3 * 1 * 5 * 31 * 1 == 465
    # the whole-teacher count of the same stand-in
    assert small.subnet_params(small.full_subnet) == 172_609_344
    assert small.subnet_flops(r50, image_size=(33, 45)) < small.subnet_flops(r50)


# -- bad input -----------------------------------------------------------------------------------
def test_invalid_specs_and_inputs_raise_clear_errors(tiny, odd_images):
    with pytest.raises(ValueError, match=r"width=10 .* valid widths: \[8, 12\]"):
        tiny(odd_images, subnet=ResNetSubnet(10, (1, 1, 2, 1)))
    with pytest.raises(ValueError, match=r"stage 3 depth 4 .* valid depths per stage: "
                                         r"\[1, 1\.\.2, 2\.\.3, 1\]"):
        tiny.extract(ResNetSubnet(8, (1, 1, 4, 1)))
    with pytest.raises(ValueError, match=r"one depth per stage \(4\)"):
        tiny.extract(ResNetSubnet(8, (1, 2)))
    with pytest.raises(ValueError, match=r"unknown named size 'r50'.*known sizes"):
        tiny.extract("r50")
    with pytest.raises(ValueError, match=r"unknown subnet keyword\(s\) \['depth'\]"):
        tiny.subnet_from_kwargs(depth=3)
    with pytest.raises(ValueError, match=r"depths=3 must give one depth per stage"):
        tiny.subnet_from_kwargs(depths=3)
    with pytest.raises(ValueError, match=r"rank 4 .* got shape \(33, 45, 3\)"):
        tiny(odd_images[0])
    with pytest.raises(ValueError, match=r"expects 3 channels .* 1 channels"):
        tiny(odd_images[..., :1])
    with pytest.raises(ValueError, match=r"takes no masks"):
        tiny(odd_images, masks=np.zeros((2, 4), bool))


def test_bad_configurations():
    with pytest.raises(ValueError, match=r"width 20 = 20 is not a multiple of num_groups=8"):
        ElasticResNet(stem_channels=8, base_channels=8, widths=(16, 20), num_groups=8)
    with pytest.raises(ValueError, match=r"stage 2: min depth 3 must lie in \[1, 2\]"):
        ElasticResNet(stem_channels=8, base_channels=8, widths=(8,), num_groups=4,
                      max_depths=(1, 2, 1, 1), min_depths=(1, 3, 1, 1))
    with pytest.raises(ValueError, match="ascending"):
        ElasticResNet(stem_channels=8, base_channels=8, widths=(16, 8), num_groups=4)
    with pytest.raises(ValueError, match="unknown ResNet configuration 'resnet_x'"):
        ElasticResNet.from_config_name("resnet_x")


# -- the registry (round trips, presets, int8, trainers: the family contract) -----------------
def test_backbones_registry_finds_the_family():
    from poa_keras import backbones

    assert backbones.config_names()["resnet_elastic"] == "ElasticResNet"
    assert isinstance(backbones.from_config_name("resnet_elastic_test"), ElasticResNet)

"""ResNet (BatchNorm, non-elastic): the forward against an independent torch.nn.functional
ResNet with the same weights (BasicBlock and bottleneck, CIFAR and ImageNet stems), in
inference and in training mode (batch statistics, torch-style momentum updates), fake
quantized at SSQL's placement, zero-initialised residuals, parameter and FLOP counts of the
torchvision sizes, layer ids and bad arguments. Round trips, presets, int8, export, bfloat16,
stochastic depth and a DINO step: the family contract (tests/test_family_contract.py)."""
import keras
import numpy as np
import pytest
from conftest import to_np

from poa_keras import ResNet
from poa_keras.backbones.resnet_bn import CONFIGS
from poa_keras.quantization.observer import QuantConfig, recording

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (name, configuration): BasicBlocks with the CIFAR stem; bottlenecks with the ImageNet stem,
# whose stage 1 starts with a stride-1 shortcut conv (4 -> 16 channels) and whose stage 2 has
# an identity block after its strided one.
CASES = {
    "basic_cifar": dict(CONFIGS["resnet_bn_test"]),
    "bottleneck_imagenet": dict(image_size=32, block="bottleneck", depths=(1, 2),
                                widths=(4, 8)),
}


def make(config, seed=0, **overrides):
    """A model of ``config`` with default kernels and random BatchNorm parameters and
    statistics (variances in [0.5, 2]), so that every BN term shows."""
    keras.utils.set_random_seed(seed)
    model = ResNet(**dict(config, **overrides))
    rng = np.random.default_rng(seed + 1)
    for v in model.weights:
        name = v.path.rsplit("/", 1)[-1]
        if name == "gamma":
            v.assign(rng.uniform(0.5, 1.5, v.shape))
        elif name in ("beta", "moving_mean"):
            v.assign(rng.normal(0.0, 0.3, v.shape))
        elif name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, v.shape))
    return model


def positive_extremes(model):
    """Flips the sign of every conv output channel whose largest |w| is negative.

    The weight quantizer puts a channel's largest |w| exactly on a rounding tie
    (|w| / s = 2^(b-1) - 1/2): a positive one ends on 2^(b-1) - 1 whichever way the tie goes
    (the clamp), a negative one on -2^(b-1) or -2^(b-1) + 1 depending on the last bit of a
    float division, which torch and XLA round differently. With positive extremes the
    reference and the model agree without depending on that bit."""
    for v in model.weights:
        if v.path.endswith("/kernel"):
            k = to_np(v)
            flat = k.reshape(-1, k.shape[-1])
            extreme = flat[np.abs(flat).argmax(axis=0), np.arange(flat.shape[1])]
            v.assign((k * np.where(extreme < 0, -1.0, 1.0)).astype("float32"))
    return model


def images_of(size=32, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype("float32")


def run(model, images, **kwargs):
    """{"cls", "maps"} (numpy) of ``model(images, return_feature_maps=True, **kwargs)``; on
    JAX one jitted stateless call whose new non-trainable values (BatchNorm statistics) are
    written back, as an eager call writes them on the other backends."""
    if BACKEND == "jax":
        import jax

        fn = jax.jit(lambda tv, ntv, x: model.stateless_call(
            tv, ntv, x, return_feature_maps=True, **kwargs))
        out, state = fn([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], images)
        for variable, value in zip(model.non_trainable_variables, state):
            variable.assign(value)
    else:
        out = model(images, return_feature_maps=True, **kwargs)
    return {"cls": to_np(out["cls"]), "maps": [to_np(m) for m in out["feature_maps"]]}


# -- the independent reference ------------------------------------------------------------------
def reference(model, images, training=False, quant=None):
    """torchvision's ResNet written with torch.nn.functional in float64 on ``model``'s weights
    (NCHW inside): {"cls", "maps" (NHWC numpy), "stats": [(BN layer, expected moving mean,
    expected moving variance)] (training only), "steps": the quantization step of every
    stage output (quant only)}.

    ``quant``: (weight_bits, activation_bits) applies SSQL's quantizers (REFERENCE.md §5) with
    the ranges of the current tensors: weights symmetric per output channel, activations
    asymmetric per tensor; after conv -> BN -> ReLU except the last conv of a block and the
    shortcut conv; the block output; the stem at 8 / 8 bits."""
    import torch
    import torch.nn.functional as F

    def tensor(variable):
        return torch.from_numpy(to_np(variable))

    stats, steps = [], []

    def quant_weight(w, bits):   # (out, in, k, k)
        if quant is None:
            return w
        scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / ((2 ** bits - 1) / 2)
        return torch.clamp(torch.round(w / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale

    def quant_act(x, bits, record=False):
        if quant is None:
            return x
        low, high = x.min(), x.max()
        scale = (high - low) / (2 ** bits - 1)
        zero_point = -torch.round(low / scale)
        if record:
            steps.append(float(scale))
        return (torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)
                - zero_point) * scale

    wbits, abits = quant if quant is not None else (None, None)

    def conv(layer, x, stride, bits=None):   # an ElasticConv2D: kernel (k, k, in, out)
        w = tensor(layer.conv.kernel).permute(3, 2, 0, 1)
        k = w.shape[-1]
        return F.conv2d(x, quant_weight(w, bits or wbits), stride=stride, padding=k // 2)

    def conv1x1(layer, x, stride):   # an ElasticDense: kernel (in, out)
        w = tensor(layer.dense.kernel).T[:, :, None, None]
        return F.conv2d(x, quant_weight(w, wbits), stride=stride)

    def bn(layer, x):
        mean, var = tensor(layer.moving_mean), tensor(layer.moving_variance)
        running_mean, running_var = mean.clone(), var.clone()
        y = F.batch_norm(x, running_mean, running_var, tensor(layer.gamma),
                         tensor(layer.beta), training=training, momentum=0.1, eps=1e-5)
        if training:
            # torch updates with momentum 0.1 and the UNBIASED batch variance; Keras (momentum
            # 0.9 in its convention) with the biased one
            batch_mean = x.mean(dim=(0, 2, 3))
            batch_var = x.var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() // x.shape[1]
            np.testing.assert_allclose(running_mean, 0.9 * mean + 0.1 * batch_mean, atol=1e-12)
            np.testing.assert_allclose(running_var, 0.9 * var + 0.1 * batch_var * n / (n - 1),
                                       atol=1e-12)
            stats.append((layer, 0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * batch_var))
        return y

    x = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
    stem_stride = 1 if model.cifar_stem else 2
    x = quant_act(F.relu(bn(model.stem_norm, conv(model.stem_conv, x, stem_stride, 8))), 8)
    if not model.cifar_stem:
        x = F.max_pool2d(x, 3, stride=2, padding=1)
    maps, index = [], 0
    channels = model.widths[0]
    expansion = 1 if model.block == "basic" else 4
    for s, depth in enumerate(model.depths):
        out_channels = model.widths[s] * expansion
        for j in range(depth):
            b = model.blocks[index]
            index += 1
            stride = 2 if s > 0 and j == 0 else 1
            if model.block == "basic":
                y = quant_act(F.relu(bn(b.norm1, conv(b.conv1, x, stride))), abits)
                y = bn(b.norm2, conv(b.conv2, y, 1))
            else:
                y = quant_act(F.relu(bn(b.norm1, conv1x1(b.conv1, x, 1))), abits)
                y = quant_act(F.relu(bn(b.norm2, conv(b.conv2, y, stride))), abits)
                y = bn(b.norm3, conv1x1(b.conv3, y, 1))
            shortcut = x
            if stride != 1 or channels != out_channels:
                shortcut = bn(b.downsample_norm, conv1x1(b.downsample, x, stride))
            x = quant_act(F.relu(y + shortcut), abits, record=j == depth - 1)
            channels = out_channels
        maps.append(x)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return {"cls": pooled.numpy(), "maps": [m.permute(0, 2, 3, 1).numpy() for m in maps],
            "stats": stats, "steps": steps}


def assert_close(out, ref, rtol=1e-4):
    scale = max(1.0, float(np.abs(ref["cls"]).max()))
    np.testing.assert_allclose(out["cls"], ref["cls"], atol=rtol * scale)
    assert len(out["maps"]) == len(ref["maps"])
    for got, want in zip(out["maps"], ref["maps"]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=rtol * max(1.0, float(np.abs(want).max())))


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_forward_matches_torch(name):
    model = make(CASES[name])
    images = images_of()
    out = run(model, images)
    ref = reference(model, images)
    assert_close(out, ref)
    assert np.abs(ref["cls"]).max() > 0.1
    shapes = [m.shape for m in out["maps"]]
    if name == "basic_cifar":   # no stride in the stem: 32, then 16 pixels
        assert shapes == [(2, 32, 32, 8), (2, 16, 16, 16)]
    else:   # 32 -> 16 (stem conv) -> 8 (max pool) -> 4 (stage 2); 4 x the widths
        assert shapes == [(2, 8, 8, 16), (2, 4, 4, 32)]
    assert model.feature_dim() == out["cls"].shape[-1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_forward_uses_batch_statistics_and_updates_torch_style(name):
    model = make(CASES[name], seed=3)
    images = images_of(batch=4, seed=1)
    ref = reference(model, images, training=True)   # the expected statistics: before the run
    out = run(model, images, training=True)
    assert_close(out, ref)
    norms = 1 + sum(2 + (model.block == "bottleneck") for _ in model.blocks) + sum(
        b.has_downsample for b in model.blocks)
    assert len(ref["stats"]) == norms
    for layer, mean, var in ref["stats"]:
        np.testing.assert_allclose(to_np(layer.moving_mean), mean.numpy(), atol=1e-5,
                                   err_msg=layer.path)
        np.testing.assert_allclose(to_np(layer.moving_variance), var.numpy(), atol=1e-5,
                                   err_msg=layer.path)
    # an inference forward now uses the updated statistics, not the batch's
    assert_close(run(model, images), reference(model, images))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_quantized_forward_matches_ssql_placement(name):
    """4-bit weights and activations with the batch's ranges (the stem at 8 / 8): equal to the
    reference up to rounding ties, which the two computations may break differently on rare
    elements (then that element, and few downstream, differ by one quantization step)."""
    model = positive_extremes(make(CASES[name], seed=5))
    images = images_of(seed=2)
    with recording() as records:
        out = run(model, images, quant=QuantConfig(4, 4, ranges="batch"))
    ref = reference(model, images, quant=(4, 4))
    float_out = run(model, images)
    for got, want, step, plain in zip(out["maps"], ref["maps"], ref["steps"], float_out["maps"]):
        assert got.shape == want.shape
        diff = np.abs(got - want)
        assert np.mean(diff <= 1e-4 * max(1.0, np.abs(want).max())) >= 0.995
        assert diff.max() <= 1.01 * step, (diff.max(), step)
        assert len(np.unique(got)) <= 16   # a 4-bit grid
        assert np.abs(got - plain).max() > 0.1 * step   # and quantization did something
    assert np.abs(out["cls"] - ref["cls"]).max() <= 1.01 * ref["steps"][-1]
    # where the quantizers sit (one trace of the forward): the stem, then per block
    # quant1 (+ quant2 in a bottleneck) and quant_out; every conv's kernel
    activations = [layer.path.split("/", 1)[1] for layer, kind, _ in records
                   if kind == "activation"]
    per_block = ["quant1", "quant_out"] if model.block == "basic" else [
        "quant1", "quant2", "quant_out"]
    assert activations == ["stem_quant"] + [f"{b.name}/{q}" for b in model.blocks
                                            for q in per_block]
    kernels = [layer for layer, kind, _ in records if kind == "weight"]
    convs = 1 + sum((2 if model.block == "basic" else 3) + b.has_downsample
                    for b in model.blocks)
    assert len(kernels) == convs and kernels[0] is model.stem_conv


def test_zero_init_residual_starts_every_block_as_relu_of_its_shortcut():
    images = images_of()
    basic = ResNet(**dict(CASES["basic_cifar"], zero_init_residual=True))
    bottleneck = ResNet(**dict(CASES["bottleneck_imagenet"], zero_init_residual=True))
    for model, last in ((basic, "norm2"), (bottleneck, "norm3")):
        for block in model.blocks:
            assert np.all(to_np(getattr(block, last).gamma) == 0.0)
            assert np.all(to_np(block.norm1.gamma) == 1.0)
    # stage 1 of the basic model is an identity block: its output is its (>= 0) input
    out = run(basic, images)
    stem = to_np(basic.stem(images))
    np.testing.assert_allclose(out["maps"][0], stem, atol=1e-6)
    # a block with a shortcut conv outputs relu(BN(conv1x1/s(x))): the model's layers on x
    block = basic.blocks[1]
    x = out["maps"][0]
    shortcut = block.downsample_norm(block.downsample(x[:, ::2, ::2, :]))
    np.testing.assert_allclose(out["maps"][1], np.maximum(to_np(shortcut), 0.0), atol=1e-5)
    ref = reference(bottleneck, images)   # the reference agrees on the bottleneck model
    assert_close(run(bottleneck, images), ref)


# -- sizes ------------------------------------------------------------------------------------
def test_parameter_counts_of_torchvision_sizes():
    """torchvision: ResNet-18 / 34 / 50 have 11,689,512 / 21,797,672 / 25,557,032 parameters
    including the fc layer (512 x 1000 + 1000 = 513,000; 2048 x 1000 + 1000 = 2,049,000). The
    analytic count answers without weights; ResNet-18 and -50 are also built (seconds)."""
    expected = {"resnet18_bn": 11_689_512 - 513_000, "resnet34_bn": 21_797_672 - 513_000,
                "resnet50_bn": 25_557_032 - 2_049_000}
    for name, count in expected.items():
        assert ResNet.unbuilt(config_name=name).trainable_params() == count, name
    for name in ("resnet18_bn", "resnet50_bn"):
        model = ResNet.from_config_name(name)
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        assert trainable == expected[name]
        assert model.count_params() == model.subnet_params() == trainable + sum(
            int(np.prod(v.shape)) for v in model.non_trainable_weights
            if "moving" in v.path)
        assert model.feature_dim() == (512 if name == "resnet18_bn" else 2048)
        del model
    # the tiny one and a CIFAR-stem one too (the count reads the configuration)
    for config in CASES.values():
        model = ResNet(**config)
        assert model.subnet_params() == model.count_params()
        assert model.trainable_params() == sum(int(np.prod(v.shape))
                                               for v in model.trainable_weights)


def test_flops():
    """ResNet-18 costs 1.82 G multiply-adds at 224 x 224, ResNet-50 4.09 G (the fc layer's
    0.5 M / 2 M excluded): the numbers torchvision and the literature give."""
    r18 = ResNet.unbuilt(config_name="resnet18_bn")
    r50 = ResNet.unbuilt(config_name="resnet50_bn")
    assert r18.subnet_flops() / 2 == pytest.approx(1.8136e9, rel=1e-3)
    assert r50.subnet_flops() / 2 == pytest.approx(4.0871e9, rel=1e-3)
    parts = r50.subnet_flops(breakdown=True, include_norms=True)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert set(parts) == {"stem", "conv1", "conv2", "conv3", "downsample", "norms", "total"}
    assert "conv3" not in r18.subnet_flops(breakdown=True)
    # the stem: 112 x 112 outputs of a 7 x 7 x 3 -> 64 conv
    assert parts["stem"] == 2 * 112 * 112 * 49 * 3 * 64
    assert r50.subnet_flops(image_size=(160, 192)) < r50.subnet_flops()
    # the CIFAR stem keeps 32 x 32 maps in stage 1: 0.56 G multiply-adds for ResNet-18 (by hand:
    # stem 1,769,472 + stage 1 150,994,944 + 3 x 134,217,728 for the strided stages)
    cifar = ResNet.unbuilt(config_name="resnet18_cifar_bn")
    assert cifar.subnet_flops() / 2 == 555_417_600
    demo = ResNet.unbuilt(config_name="resnet_bn_demo")
    assert demo.subnet_flops() < 20e6 and demo.image_size == 64
    with pytest.raises(ValueError, match=r"image size \(0, 32\) must be positive"):
        r18.subnet_flops(image_size=(0, 32))


def test_layer_ids():
    model = ResNet(**CASES["bottleneck_imagenet"])
    assert model.max_layer_id == 3
    paths = {v.path.split("/", 1)[1]: model.layer_id(v.path) for v in model.weights}
    assert paths["stem_conv/conv/kernel"] == paths["stem_norm/moving_mean"] == 0
    assert paths["stem_quant/range"] == 0
    assert paths["stage1_block0/downsample/dense/kernel"] == 1
    assert paths["stage2_block1/norm3/gamma"] == 3
    assert model.lr_multiplier(model.stem_conv.conv.kernel.path, 0.5) == 0.5 ** 3
    with pytest.raises(ValueError, match=r"no block 2 in stage 2"):
        model.layer_id("x/stage2_block2/conv1/dense/kernel")


# -- errors and the registry -----------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    cases = [
        (dict(block="dense"), r"unknown ResNet block 'dense'; valid: \('basic', 'bottleneck'\)"),
        (dict(depths=(1, 1), widths=(8,)), r"one entry per stage"),
        (dict(depths=(1, 0)), r"depths must be a non-empty sequence of positive ints"),
        (dict(widths="wide"), r"widths must be a sequence of positive ints"),
        (dict(cifar_stem="yes"), r"cifar_stem must be True or False, got 'yes'"),
        (dict(bn_momentum=1.0),
         r"bn_momentum must lie in \[0, 1\).*0\.9 is PyTorch's momentum 0\.1"),
        (dict(bn_epsilon=0.0), r"bn_epsilon must be positive"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(in_channels=0), r"in_channels must be a positive int"),
    ]
    base = dict(CASES["basic_cifar"])
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            ResNet(**dict(base, **overrides))
    with pytest.raises(ValueError, match=r"unknown ResNet-BN configuration 'resnet_x'.*"
                                         r"resnet50_bn"):
        ResNet.from_config_name("resnet_x")
    model = ResNet(**base)
    images = images_of(size=8)
    with pytest.raises(ValueError, match=r"is not elastic.*takes no \['width'\]"):
        model.subnet_from_kwargs(width=8)
    with pytest.raises(ValueError, match=r"expects 3 channels .* 1 channels"):
        model(images[..., :1])
    with pytest.raises(ValueError, match=r"rank 4"):
        model(images[0])
    with pytest.raises(ValueError, match=r"takes no masks"):
        model(images, masks=np.zeros((2, 4), bool))


def test_registry_and_configurations():
    from poa_keras import backbones

    names = backbones.config_names()
    for name in ("resnet18_bn", "resnet34_bn", "resnet50_bn", "resnet18_cifar_bn",
                 "resnet_bn_test", "resnet_bn_demo"):
        assert names[name] == "ResNet", name
    assert backbones.RESNET_BN_CONFIGS is ResNet.configs
    model = backbones.from_config_name("resnet_bn_test")
    assert isinstance(model, ResNet) and model.family == "ResNet-BN"
    assert model.subnets() == [model.full_subnet] and model.name == "resnet_bn_test"
    demo = ResNet.unbuilt(config_name="resnet_bn_demo")
    assert (demo.block, demo.depths, demo.widths) == ("basic", (1, 1, 1, 1), [16, 32, 64, 128])
    assert not demo.cifar_stem and demo.zero_init_residual
    cifar = ResNet.unbuilt(config_name="resnet18_cifar_bn")
    assert cifar.cifar_stem and cifar.zero_init_residual and cifar.image_size == 32

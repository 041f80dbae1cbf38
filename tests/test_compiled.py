"""Backbone.compiled_forward with call options (ViT return_blocks, Swin / ResNet
return_feature_maps): the compiled program returns what the eager call returns, one program per
(subnet, options), and unknown or non-boolean options fail with the valid ones named."""
import keras
import numpy as np
import pytest
from conftest import forward, randomize, to_np

from poa_keras.backbones import from_config_name

CASES = {"vit_elastic_test": ("return_blocks", "blocks", (48, 3)),
         "swin_elastic_test": ("return_feature_maps", "feature_maps", (16, 2)),
         "resnet_elastic_test": ("return_feature_maps", "feature_maps", None)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    keras.utils.set_random_seed(0)
    model = from_config_name(request.param)
    randomize(model, seed=3)
    option, key, spec = CASES[request.param]
    spec = model.subnets()[len(model.subnets()) // 2] if spec is None else spec
    size = model.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    return model, option, key, model.resolve_subnet(spec), images


def test_options_match_the_eager_call(case):
    model, option, key, spec, images = case
    got = model.compiled_forward(spec, **{option: True})(images)
    want = model(images, subnet=spec, **{option: True})
    assert sorted(got) == sorted(want) and key in got
    assert len(got[key]) == len(want[key]) > 1
    for g, w in zip(got[key], want[key]):
        assert tuple(g.shape) == tuple(w.shape)
        np.testing.assert_allclose(to_np(g), to_np(w), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(to_np(got["cls"]), to_np(want["cls"]), atol=1e-5, rtol=1e-5)
    plain = model.compiled_forward(spec)
    assert key not in plain(images)
    assert model.compiled_forward(spec, **{option: False}) is plain   # False is the default
    assert model.compiled_forward(spec, **{option: True}) is not plain


def test_bad_options_name_the_valid_ones(case):
    model, option, _, spec, _ = case
    with pytest.raises(TypeError, match=rf"unknown option 'return_maps'; its call options: "
                                        rf"\[[^\]]*'{option}'"):
        model.compiled_forward(spec, return_maps=True)
    with pytest.raises(TypeError, match=rf"option {option}=1 must be True or False"):
        model.compiled_forward(spec, **{option: 1})


def test_a_program_whose_model_changed_since_serves_no_other_model():
    """A shared program retraces with the model that built it: once that model is int8-
    quantized (fewer trainable variables), another float model of its old architecture must
    get a program of its own, also for a new input shape."""
    from poa_keras import ResNet
    from poa_keras.quantization import quantize

    first, second = (ResNet.from_config_name("resnet_bn_test") for _ in range(2))
    forward(first, np.zeros((2, 32, 32, 3), "float32"))
    quantize(first, "int8")
    assert len(first.trainable_variables) != len(second.trainable_variables)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(to_np(forward(second, images)["pooled"]),
                               to_np(second(images, training=False)["pooled"]), atol=1e-5)

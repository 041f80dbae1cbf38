"""poa_keras.quantization: backbones and ImageClassifier quantize with the garbage collector's
existing objects frozen (Keras collects garbage once per replaced kernel), the result is a
normal int8 model, and the collector is left as it was."""
import gc

import numpy as np
import pytest
from conftest import to_np

from poa_keras import ImageClassifier, quantization
from poa_keras.backbones import from_config_name


@pytest.fixture
def collections(monkeypatch):
    """Records gc.get_freeze_count() at every gc.collect() call."""
    seen, collect = [], gc.collect

    def recording(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return collect(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", recording)
    return seen


def _images(model):
    size = model.image_size
    return np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")


def test_backbone_quantize_collects_with_objects_frozen(collections):
    model = from_config_name("vit_elastic_test").extract("small")
    images = _images(model)
    before = to_np(model(images)["cls"])
    assert gc.get_freeze_count() == 0
    model.quantize("int8")
    assert collections and min(collections) > 0     # every collection saw frozen objects
    assert gc.get_freeze_count() == 0               # and they are unfrozen afterwards
    assert quantization.quantization_mode(model) == "int8"
    after = to_np(model(images)["cls"])
    assert not np.array_equal(after, before)        # int8 kernels changed the numbers a bit
    cos = (after * before).sum(-1) / np.linalg.norm(after, axis=-1) / np.linalg.norm(before,
                                                                                      axis=-1)
    assert cos.min() > 0.99


def test_classifier_quantize_and_unfreeze_on_error(collections):
    clf = ImageClassifier(from_config_name("vit_elastic_test").extract("small"), num_classes=3)
    clf(_images(clf.backbone))   # built
    clf.quantize("int8")
    assert collections and min(collections) > 0 and gc.get_freeze_count() == 0
    assert quantization.quantization_mode(clf) == "int8"
    with pytest.raises(Exception):
        clf.quantize("int8")     # Keras refuses to quantize twice
    assert gc.get_freeze_count() == 0


def test_quantize_helper_checks_the_mode():
    model = from_config_name("vit_elastic_test").extract("small")
    with pytest.raises(ValueError, match=r"unknown quantization mode 'int4'; valid: 'int8'"):
        quantization.quantize(model, "int4")
    quantization.quantize(model, "int8")
    assert quantization.quantization_mode(model) == "int8" and gc.get_freeze_count() == 0
    assert quantization.quantization_mode(from_config_name("vit_elastic_test")) is None

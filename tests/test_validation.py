"""Argument checks (poa_keras/validation.py): every error names the argument, the bad value
and what is valid."""
import numpy as np
import pytest

from poa_keras.validation import (check_choice, check_features, check_int, check_integral,
                                  check_ks, check_labelled_images, check_labels,
                                  check_multiplier, check_positive_number)


def test_integral_values_are_never_truncated():
    assert check_integral(np.int64(64), "width") == 64 and check_integral(64.0, "width") == 64
    for bad in (64.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="width must be an integer, got"):
            check_integral(bad, "width")
    for bad in ("64", True, None):
        with pytest.raises(TypeError, match="width must be an integer, got"):
            check_integral(bad, "width")


def test_numbers():
    assert check_int(np.int64(3), "k", minimum=1) == 3
    with pytest.raises(TypeError, match="k must be an int, got True"):
        check_int(True, "k", minimum=1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        check_int(0, "k", minimum=1)
    assert check_positive_number(2, "T") == 2.0
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="T must be a finite number > 0"):
            check_positive_number(bad, "T")
    assert check_multiplier(0, "m") == 0.0
    with pytest.raises(ValueError, match="m must be a finite number >= 0, got -0.5"):
        check_multiplier(-0.5, "m")
    with pytest.raises(TypeError, match="m must be a number, got '1'"):
        check_multiplier("1", "m")
    assert check_ks(20) == [20] and check_ks((10, 20, 10)) == [10, 20]
    with pytest.raises(ValueError, match="empty"):
        check_ks([])
    with pytest.raises(TypeError, match=r"every k must be an int, got 2.5"):
        check_ks([2.5])
    assert check_choice(None, "norm", ("a", None)) is None
    with pytest.raises(ValueError, match=r"norm must be one of \('a', None\), got 'b'"):
        check_choice("b", "norm", ("a", None))


def test_arrays():
    x = check_features(np.ones((3, 2), np.float64), "feats")
    assert x.dtype == np.float32 and x.shape == (3, 2)
    with pytest.raises(ValueError, match=r"feats must have shape \(num_samples, feature_dim\)"):
        check_features(np.ones(3), "feats")
    with pytest.raises(ValueError, match=r"feats holds NaN or inf values \(in 1 of 2 rows\)"):
        check_features(np.array([[1.0], [np.nan]]), "feats")
    assert check_labels(np.array([[0], [2]]), "y", 2, "feats", 3).tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"y must lie in \[0, num_classes=3\), got label 3"):
        check_labels(np.array([0, 3]), "y", 2, "feats", 3)
    with pytest.raises(ValueError, match="y has 1 labels but feats has 2 rows"):
        check_labels(np.array([0]), "y", 2, "feats", 3)
    images, labels = check_labelled_images((np.zeros((2, 4, 4, 3), np.uint8), [0, 1]), "data")
    assert images.shape == (2, 4, 4, 3) and labels.tolist() == [0, 1]
    with pytest.raises(TypeError, match="data must be an .images, labels. pair"):
        check_labelled_images(np.zeros((2, 4, 4, 3)), "data")
    with pytest.raises(ValueError, match="data has 2 images but labels of shape"):
        check_labelled_images((np.zeros((2, 4, 4, 3)), [0]), "data")
    with pytest.raises(TypeError, match="data images must be uint8 .* got dtype int32"):
        check_labelled_images((np.zeros((1, 4, 4, 3), np.int32), [0]), "data")

"""Losses against independent float64 numpy computations written out from the definitions."""
import functools

import keras
import numpy as np
import pytest

from conftest import to_np
from poa_keras.losses import (centered_teacher_probs, dino_cross_entropy, ibot_patch_loss,
                              koleo_loss, multi_view_cross_entropy, sinkhorn_knopp,
                              update_center)


def compiled(fn, **static):
    """`fn` with keyword arguments bound, run as the trainers run it: jitted on JAX (eager JAX
    compiles op by op and is slow; jit also checks that the loss traces), eager elsewhere."""
    bound = functools.partial(fn, **static)
    if keras.backend.backend() == "jax":
        import jax
        return jax.jit(bound)
    return bound


def np_softmax(x, axis=-1):
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_ce(p, s, temp):
    """-sum_k p log softmax(s / temp), mean over the batch."""
    return float(np.mean(-np.sum(p * np_log_softmax(s / temp), axis=-1)))


def np_sinkhorn(logits, temp, n_iterations):
    """The reference loop, literally: Q = exp(logits / T)^T (K x B) and plain divisions.
    The global max is subtracted first (a common factor, cancelled by the first division)."""
    x = logits.astype(np.float64) / temp
    q = np.exp(x - x.max()).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def rand_probs(rng, shape):
    return np_softmax(rng.normal(size=shape) * 2.0)


def f32(x):
    return np.asarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("temp", [0.1, 0.25])
def test_dino_cross_entropy_matches_numpy(temp):
    rng = np.random.default_rng(0)
    p, s = rand_probs(rng, (6, 11)), rng.normal(size=(6, 11))
    got = float(to_np(compiled(dino_cross_entropy, student_temp=temp)(f32(p), f32(s))))
    np.testing.assert_allclose(got, np_ce(f32(p).astype(np.float64), f32(s).astype(np.float64),
                                          temp), rtol=1e-5)


def test_multi_view_counts_18_pairs_for_2_globals_and_8_locals():
    rng = np.random.default_rng(1)
    b, k, n_local = 4, 9, 8
    teachers = [f32(rand_probs(rng, (b, k))) for _ in range(2)]
    students = [f32(rng.normal(size=(b, k))) for _ in range(2 + n_local)]
    expected = sum(np_ce(teachers[i].astype(np.float64), students[j].astype(np.float64), 0.1)
                   for i in range(2) for j in range(2 + n_local) if i != j)
    total, n_terms = compiled(multi_view_cross_entropy, student_temp=0.1)(teachers, students)
    assert int(n_terms) == 2 * (2 - 1) + 2 * n_local == 18
    np.testing.assert_allclose(float(to_np(total)), expected, rtol=1e-5)
    # The same views given as stacked (V, B, K) arrays.
    total, n_terms = compiled(multi_view_cross_entropy)(np.stack(teachers), np.stack(students))
    assert int(n_terms) == 18
    np.testing.assert_allclose(float(to_np(total)), expected, rtol=1e-5)


def test_multi_view_keeps_same_view_pairs_on_request():
    rng = np.random.default_rng(2)
    teachers = [f32(rand_probs(rng, (3, 5))) for _ in range(2)]
    students = [f32(rng.normal(size=(3, 5))) for _ in range(4)]
    expected = sum(np_ce(teachers[i].astype(np.float64), students[j].astype(np.float64), 0.2)
                   for i in range(2) for j in range(4))
    total, n_terms = compiled(multi_view_cross_entropy, student_temp=0.2,
                              skip_same_view=False)(teachers, students)
    assert int(n_terms) == 8
    np.testing.assert_allclose(float(to_np(total)), expected, rtol=1e-5)


def test_multi_view_rejects_impossible_view_lists():
    p, s = f32(np.full((2, 3), 1 / 3)), f32(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2 teacher views but only 1 student"):
        multi_view_cross_entropy([p, p], [s])
    with pytest.raises(ValueError, match="no \\(teacher, student\\) pair"):
        multi_view_cross_entropy([p], [s])
    with pytest.raises(ValueError, match="empty"):
        multi_view_cross_entropy([], [s])


# ----------------------------------------------------------------------------- centering

def test_centered_teacher_probs_matches_numpy():
    rng = np.random.default_rng(3)
    t, c = f32(rng.normal(size=(5, 8))), f32(rng.normal(size=(1, 8)))
    got = to_np(compiled(centered_teacher_probs, teacher_temp=0.04)(t, c))
    expected = np_softmax((t.astype(np.float64) - c) / 0.04)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("center_shape", [(1, 6), (6,)])
def test_update_center_is_an_ema_of_the_batch_mean(center_shape):
    rng = np.random.default_rng(4)
    c = f32(rng.normal(size=center_shape))
    t = f32(rng.normal(size=(2, 5, 6)))  # two global views stacked
    got = to_np(compiled(update_center, momentum=0.9)(c, t))
    batch_mean = t.astype(np.float64).reshape(-1, 6).mean(axis=0)
    expected = 0.9 * c.astype(np.float64) + 0.1 * batch_mean.reshape(center_shape)
    assert got.shape == center_shape
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # The (2B, K) concatenation of the same views gives the same mean.
    got = to_np(compiled(update_center, momentum=0.9)(c, t.reshape(10, 6)))
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------- Sinkhorn-Knopp

@pytest.mark.parametrize("n_iterations", [0, 1, 3])
def test_sinkhorn_knopp_matches_the_reference_loop(n_iterations):
    rng = np.random.default_rng(5)
    logits = f32(rng.normal(size=(12, 7)))
    got = to_np(compiled(sinkhorn_knopp, teacher_temp=0.5,
                                n_iterations=n_iterations)(logits))
    np.testing.assert_allclose(got, np_sinkhorn(logits, 0.5, n_iterations), rtol=1e-4,
                               atol=1e-6)
    if n_iterations:
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # each sample: 1


def test_sinkhorn_knopp_marginals():
    rng = np.random.default_rng(6)
    b, k = 16, 8
    logits = f32(rng.normal(size=(b, k)))
    q = to_np(compiled(sinkhorn_knopp, teacher_temp=1.0, n_iterations=3)(logits))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)   # exact after the column step
    np.testing.assert_allclose(q.sum(axis=0), b / k, rtol=0.05)  # nearly equipartitioned
    q = to_np(compiled(sinkhorn_knopp, teacher_temp=1.0, n_iterations=50)(logits))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(q.sum(axis=0), b / k, rtol=1e-4)
    assert np.all(q >= 0)


def test_sinkhorn_knopp_is_stable_with_large_logits_and_small_temperature():
    # logits / T reach ~1500: exp overflows float32 (and float64) without the max subtraction,
    # and exp(x - max) underflows to 0 in float32 for many entries.
    rng = np.random.default_rng(7)
    logits = f32(60.0 + 3.0 * rng.normal(size=(10, 6)))
    got = to_np(compiled(sinkhorn_knopp, teacher_temp=0.04, n_iterations=3)(logits))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_sinkhorn(logits, 0.04, 3), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_sinkhorn_knopp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(f32(np.zeros((2, 3))), 0.1, n_iterations=-1)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(f32(np.zeros((2, 3, 4))), 0.1)


# ----------------------------------------------------------------------------- KoLeo

def np_koleo_brute_force(x, eps=1e-8, floor=0.0):
    """-mean_i log(min_j ||x_i - x_j|| + eps); distances below `floor` are raised to it."""
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    terms = []
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        terms.append(np.log(max(nearest, floor) + eps))
    return -float(np.mean(terms))


def test_koleo_matches_brute_force():
    rng = np.random.default_rng(8)
    x = f32(rng.normal(size=(9, 5)) * 3.0)  # not normalised: the loss normalises
    got = float(to_np(compiled(koleo_loss)(x)))
    np.testing.assert_allclose(got, np_koleo_brute_force(x), rtol=1e-5)


def test_koleo_with_duplicates_and_antipodes_is_finite():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 4))
    x[3] = x[0]         # a duplicate: nearest distance 0, log(0 + eps) stays finite
    x[5] = -x[1]        # an antipodal pair
    x = f32(x)
    got = float(to_np(compiled(koleo_loss)(x)))
    assert np.isfinite(got)
    # A duplicate's float32 distance is 0 or rounding noise (XLA may normalise the two copies
    # with different instruction sequences), so the value lies between distance 0 and 1e-6.
    assert np_koleo_brute_force(x, floor=1e-6) - 1e-4 <= got <= np_koleo_brute_force(x) + 1e-4
    # Two antipodal points only: each one's nearest neighbour is the other, distance 2.
    pair = f32([[1.0, 0.0], [-1.0, 0.0]])
    got = float(to_np(compiled(koleo_loss)(pair)))
    np.testing.assert_allclose(got, -np.log(2.0 + 1e-8), rtol=1e-6)


def test_koleo_needs_two_features():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(f32(np.ones((1, 3))))


# ----------------------------------------------------------------------------- iBOT

def np_ibot(p, s, masks, temp):
    per_image = []
    for b in range(p.shape[0]):
        masked = np.flatnonzero(masks[b])
        if len(masked) == 0:
            per_image.append(0.0)
            continue
        ce = [-np.sum(p[b, n] * np_log_softmax(s[b, n] / temp)) for n in masked]
        per_image.append(np.mean(ce))
    return float(np.mean(per_image))


def test_ibot_patch_loss_matches_numpy_with_unmasked_images():
    rng = np.random.default_rng(10)
    b, n, k = 5, 6, 7
    p, s = f32(rand_probs(rng, (b, n, k))), f32(rng.normal(size=(b, n, k)))
    masks = rng.uniform(size=(b, n)) < 0.4
    masks[1] = False                # two images without any masked patch
    masks[3] = False
    masks[0, :2] = True             # at least one masked patch elsewhere
    masks[4] = True                 # one image fully masked
    got = float(to_np(compiled(ibot_patch_loss, student_temp=0.1)(p, s, masks)))
    expected = np_ibot(p.astype(np.float64), s.astype(np.float64), masks, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ibot_patch_loss_without_any_mask_is_zero():
    rng = np.random.default_rng(11)
    p, s = f32(rand_probs(rng, (3, 4, 5))), f32(rng.normal(size=(3, 4, 5)))
    got = to_np(compiled(ibot_patch_loss)(p, s, np.zeros((3, 4), bool)))
    assert np.isfinite(got) and float(got) == 0.0


# ----------------------------------------------------------------------------- tracing

@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF graphs only")
def test_losses_trace_with_an_unknown_batch_size():
    """A tf.function traced with batch dimension None (as a Keras train step may be) gives the
    same values as the numpy references."""
    import tensorflow as tf
    rng = np.random.default_rng(12)
    logits, feats = f32(rng.normal(size=(8, 5))), f32(rng.normal(size=(8, 3)))
    p, s = f32(rand_probs(rng, (8, 4, 5))), f32(rng.normal(size=(8, 4, 5)))
    masks = rng.uniform(size=(8, 4)) < 0.5
    masks[2] = False
    spec = lambda *shape, dtype="float32": tf.TensorSpec((None,) + shape, dtype)  # noqa: E731
    sk = tf.function(lambda t: sinkhorn_knopp(t, 0.3), input_signature=[spec(5)])
    ko = tf.function(koleo_loss, input_signature=[spec(3)])
    ib = tf.function(ibot_patch_loss, input_signature=[spec(4, 5), spec(4, 5),
                                                       spec(4, dtype="bool")])
    uc = tf.function(update_center, input_signature=[tf.TensorSpec((1, 5)), spec(5)])
    np.testing.assert_allclose(to_np(sk(logits)), np_sinkhorn(logits, 0.3, 3), atol=1e-6)
    np.testing.assert_allclose(float(to_np(ko(feats))), np_koleo_brute_force(feats), rtol=1e-5)
    np.testing.assert_allclose(float(to_np(ib(p, s, masks))),
                               np_ibot(p.astype(np.float64), s.astype(np.float64), masks, 0.1),
                               rtol=1e-5)
    center = f32(np.zeros((1, 5)))
    np.testing.assert_allclose(to_np(uc(center, logits)), 0.1 * logits.mean(0, keepdims=True),
                               atol=1e-6)

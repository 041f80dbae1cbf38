"""Layer-wise analysis (poa_keras/eval/analysis.py): the unbiased minibatch CKA against the
equation written out here in plain numpy (and the biased CKA of centred Gram matrices at large
n), its invariances and a hand-computed value; the attention entropy and distance against
brute-force loops; the layer representations of every family; ``analyze`` end to end, its
errors, and the ``poa-keras analyze`` command."""
import json
import math

import keras
import numpy as np
import pytest

from conftest import forward
from poa_keras.backbones.resnet_bn import ResNet
from poa_keras.eval import analysis
from poa_keras.eval.analysis import (MinibatchCKA, analyze, attention_statistics, batch_sizes,
                                     hsic_unbiased, linear_cka, save_analysis)

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see conftest.py


def _to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


# ----- the CKA, on hand-made arrays -------------------------------------------------------------

def _hsic_by_the_equation(x, y):
    """Nguyen et al. 2021, eq. 3, term by term with explicit ones vectors and matrix
    products."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    n = len(x)
    k = x @ x.T - np.diag(np.diag(x @ x.T))
    l = y @ y.T - np.diag(np.diag(y @ y.T))
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def _cka_by_the_equation(x, y, sizes):
    """Means of the per-minibatch HSICs (consecutive batches of `sizes`), then the ratio."""
    xy = xx = yy = 0.0
    start = 0
    for size in sizes:
        bx, by = x[start:start + size], y[start:start + size]
        xy += _hsic_by_the_equation(bx, by)
        xx += _hsic_by_the_equation(bx, bx)
        yy += _hsic_by_the_equation(by, by)
        start += size
    return xy / math.sqrt(xx * yy)


def _biased_cka(x, y):
    """Kornblith et al. 2019: centred features, ||YᵀX||² / (||XᵀX|| ||YᵀY||)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return (np.linalg.norm(y.T @ x) ** 2
            / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_unbiased_hsic_and_cka_follow_the_equation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 2, 3))           # (n, ...) flattened per example
    y = np.tanh(x.reshape(9, 6) @ rng.normal(size=(6, 4))) + 0.3 * rng.normal(size=(9, 4))
    assert hsic_unbiased(x.reshape(9, 6) @ x.reshape(9, 6).T, y @ y.T) == pytest.approx(
        _hsic_by_the_equation(x, y), rel=1e-12)
    assert linear_cka(x, y) == pytest.approx(_cka_by_the_equation(x, y, [9]), rel=1e-12)
    # the diagonal of a given Gram matrix does not count
    gram = rng.normal(size=(6, 6))
    gram = gram + gram.T
    assert hsic_unbiased(gram + np.diag(rng.normal(size=6)), gram) == pytest.approx(
        hsic_unbiased(gram, gram), rel=1e-12)


def test_unbiased_cka_approaches_the_biased_one_at_large_n():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 6)) + 0.5
    y = x[:, :3] @ rng.normal(size=(3, 5)) + rng.normal(size=(1000, 5))
    gaps = [abs(linear_cka(x[:n], y[:n]) - _biased_cka(x[:n], y[:n])) for n in (100, 1000)]
    assert 0.2 < _biased_cka(x, y) < 0.9
    assert gaps[1] < 0.005 and gaps[1] < gaps[0]    # the biased one's bias is O(1 / n)


def test_cka_is_one_on_itself_and_invariant_to_rotations_and_isotropic_scaling():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 10))
    y = x @ rng.normal(size=(10, 7)) + rng.normal(size=(32, 7))
    rotation, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ rotation * 3.7) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert linear_cka(x @ rotation, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(0.01 * x, 50.0 * y) == pytest.approx(base, rel=1e-10)
    # an anisotropic scaling changes it: the invariance is specific
    assert abs(linear_cka(x * np.linspace(0.1, 10, 10), y) - base) > 1e-3


def test_cka_of_a_hand_computed_case():
    # x = (1, 1, -1, -1), y = (1, -1, 1, -1): K, L of zero diagonal give tr(KL) = -4,
    # 1ᵀK1 = 1ᵀL1 = -4, 1ᵀKL1 = 4: HSIC(K, L) = (-4 + 16/6 - 4) / 4 = -4/3; HSIC(K, K) =
    # (12 + 16/6 - 4) / 4 = 8/3 (so is HSIC(L, L)): CKA = -1/2 (the unbiased CKA can be < 0)
    x = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    y = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    assert hsic_unbiased(x @ x.T, y @ y.T) == pytest.approx(-4 / 3, rel=1e-12)
    assert hsic_unbiased(x @ x.T, x @ x.T) == pytest.approx(8 / 3, rel=1e-12)
    assert linear_cka(x, y) == pytest.approx(-0.5, rel=1e-12)


def test_minibatch_accumulation_matches_doing_it_by_hand():
    rng = np.random.default_rng(3)
    layers = [rng.normal(size=(14, 5)), rng.normal(size=(14, 2, 3)), None]
    layers[2] = layers[0] @ rng.normal(size=(5, 5)) + 0.5 * rng.normal(size=(14, 5))
    others = [np.sin(layers[0][:, :3]), rng.normal(size=(14, 4))]
    sizes = batch_sizes(14, 6)
    assert sizes == [5, 5, 4]
    one, two = MinibatchCKA(), MinibatchCKA()
    start = 0
    for size in sizes:
        one.update([a[start:start + size] for a in layers])
        two.update({f"l{i}": a[start:start + size] for i, a in enumerate(layers)},
                   [b[start:start + size] for b in others])
        start += size
    expected = [[_cka_by_the_equation(a, b, sizes) for b in layers] for a in layers]
    np.testing.assert_allclose(one.result(), expected, rtol=1e-10)
    np.testing.assert_allclose(np.diag(one.result()), 1.0, rtol=1e-12)
    expected = [[_cka_by_the_equation(a, b, sizes) for b in others] for a in layers]
    np.testing.assert_allclose(two.result(), expected, rtol=1e-10)
    assert (one.num_batches, one.num_examples) == (3, 14)
    assert linear_cka(layers[0], others[0], batch_size=6) == pytest.approx(expected[0][0],
                                                                            rel=1e-10)


def test_batch_sizes_and_the_minimum_batch():
    assert batch_sizes(100, 64) == [50, 50]
    assert batch_sizes(9, 8) == [5, 4]
    assert batch_sizes(5, 4) == [5]          # two batches would leave one of 2
    assert batch_sizes(8, 64) == [8]
    with pytest.raises(ValueError, match="batch_size must be >= 4, got 3"):
        batch_sizes(10, 3)
    with pytest.raises(ValueError, match="at least 4 examples"):
        MinibatchCKA().update([np.ones((3, 2))])
    with pytest.raises(ValueError, match="same examples"):
        MinibatchCKA().update([np.ones((5, 2))], [np.ones((6, 2))])
    cka = MinibatchCKA().update([np.ones((5, 2)), np.ones((5, 3))])
    with pytest.raises(ValueError, match="same layers"):
        cka.update([np.ones((5, 2))])
    # a constant representation: HSIC(K, K) = 0, the CKA is undefined (nan), not an error
    assert np.isnan(linear_cka(np.ones((6, 3)), np.arange(6.0)[:, None]))


# ----- attention statistics, on hand-made logits ------------------------------------------------

def _attention_by_loops(logits, grid):
    """Per head: entropy and distance (grid units) averaged over images and queries, by
    explicit loops over images, heads and queries."""
    gh, gw = grid
    b, h, t, _ = logits.shape
    n = gh * gw
    prefix = t - n
    entropy, distance = np.zeros(h), np.zeros(h)
    for i in range(b):
        for head in range(h):
            for q in range(n):
                row = logits[i, head, prefix + q, prefix:].astype(np.float64)
                p = np.exp(row - row.max())
                p /= p.sum()
                entropy[head] += -sum(pk * math.log(pk + 1e-6) for pk in p)
                qr, qc = divmod(q, gw)
                distance[head] += sum(pk * math.hypot(qr - kr, qc - kc)
                                      for pk, (kr, kc) in zip(p, (divmod(k, gw)
                                                                   for k in range(n))))
    return entropy / (b * n), distance / (b * n)


def test_attention_statistics_match_loops_on_a_non_square_grid():
    rng = np.random.default_rng(4)
    grid = (2, 3)
    logits = rng.normal(0, 2, size=(2, 3, 1 + 6, 1 + 6)).astype("float32")
    logits[:, :, :, 0] = 30.0   # the CLS key would take all the attention: it is dropped
    entropy, distance = attention_statistics(logits, grid)
    want_entropy, want_distance = _attention_by_loops(logits, grid)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5)
    np.testing.assert_allclose(distance, want_distance, rtol=1e-5)
    assert entropy.shape == distance.shape == (3,)


def test_uniform_and_one_hot_attention():
    grid = (2, 3)
    logits = np.zeros((1, 2, 7, 7), "float32")
    logits[:, :, 0, :] = 5.0      # the CLS row and column do not count
    logits[:, :, :, 0] = -5.0
    logits[:, 1, 1:, 1] = 40.0    # head 1: every query attends to patch 0, at (0, 0)
    entropy, distance = attention_statistics(logits, grid)
    # head 0 uniform over the 6 patches: -ln(1/6 + 1e-6); mean distance between two positions
    positions = [(r, c) for r in range(2) for c in range(3)]
    mean_pair = np.mean([math.hypot(a[0] - b[0], a[1] - b[1]) for a in positions
                         for b in positions])
    assert entropy[0] == pytest.approx(-math.log(1 / 6 + 1e-6), rel=1e-6)
    assert entropy[0] == pytest.approx(math.log(6), abs=1e-5)
    assert distance[0] == pytest.approx(mean_pair, rel=1e-6)
    # head 1 one-hot: entropy ~0, distance = mean of |pos_q - (0, 0)| = (0+1+2+1+√2+√5) / 6
    assert entropy[1] == pytest.approx(0.0, abs=1e-4)
    assert distance[1] == pytest.approx((3 + 1 + math.sqrt(2) + math.sqrt(5)) / 6, rel=1e-6)
    with pytest.raises(ValueError, match="T >= the 6 patch tokens"):
        attention_statistics(np.zeros((1, 2, 5, 5), "float32"), grid)


# ----- the families' layer representations and analyze --------------------------------------

# On JAX every new (model architecture, subnet, batch shape) compiles a program: the tests
# below reuse a few (ViT: width 48 depth 3 and width 32 depth 2, batches of 5; Swin and ResNet:
# one subnet, batches of 4) and read the hooks through the analysis' own runner (eager JAX
# compiles op by op, ten times slower). The hooks' agreement with the call (the same Python on
# every backend) is checked where a forward costs no compilation: not on JAX.
CHECK_AGAINST_CALL = keras.backend.backend() != "jax"

def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


def _hook(model, name, images, subnet=None, **kwargs):
    return analysis.hook_runner(model, name, subnet, **kwargs)(images)


def test_vit_analysis_with_a_subnet_matches_brute_force(small_vit):
    images = _images(10)
    result = analyze(small_vit, images, subnet_a=(48, 3), batch_size=4)
    assert result["batch_sizes"] == [5, 5]   # 3 batches of 4 would leave one of 2
    assert result["model_a"]["layers"] == ["block_0", "block_1", "block_2", "norm"]
    assert result["model_a"]["subnet"] == {"width": 48, "depth": 3}
    cka = np.array(result["cka"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-9)
    np.testing.assert_allclose(cka, cka.T, atol=1e-12)
    # the CKA from the representations the hook gives, by the equation
    reps = [_hook(small_vit, "layer_representations", images[s], (48, 3))
            for s in (slice(0, 5), slice(5, 10))]
    first, last = ([_to_np(r[name]) for r in reps] for name in ("block_0", "norm"))
    if CHECK_AGAINST_CALL:   # "norm": the final-norm patch tokens of the call
        tokens = _to_np(forward(small_vit, images[:5], subnet=(48, 3))["patch_tokens"])
        np.testing.assert_allclose(last[0], tokens, atol=1e-5)
    want = _cka_by_the_equation(np.concatenate(first), np.concatenate(last),
                                result["batch_sizes"])
    assert cka[0, -1] == pytest.approx(want, rel=1e-5)
    # the attention statistics: 3 heads of width 48, from the hook's logits by loops
    stats = result["attention"]["a"]
    assert stats["layers"] == ["block_0", "block_1", "block_2"]
    assert stats["grid"] == [4, 4] and stats["patch_size"] == 8
    assert np.shape(stats["entropy"]) == (3, 3)
    logits = [_hook(small_vit, "attention_logits", images[s], (48, 3), blocks="all")
              for s in (slice(0, 5), slice(5, 10))]
    entropy, distance = _attention_by_loops(
        np.concatenate([_to_np(batch[1]) for batch in logits]), (4, 4))
    np.testing.assert_allclose(stats["entropy"][1], entropy, rtol=1e-4)
    np.testing.assert_allclose(stats["distance_patches"][1], distance, rtol=1e-4)
    np.testing.assert_allclose(stats["distance_px"][1], 8 * distance, rtol=1e-4)
    assert stats["uniform_entropy"] == pytest.approx(math.log(16))


def test_swin_representations_and_cka(tiny_swin):
    images = _images(8)
    reps = _hook(tiny_swin, "layer_representations", images[:4], (16, 1))
    # stage 3 (index 2) at depth 1 of 3 keeps its block 0; widths 16 * 2**s
    assert list(reps) == ["stage_0_block_0", "stage_1_block_0", "stage_1_block_1",
                          "stage_2_block_0", "stage_3_block_0", "norm"]
    assert tuple(reps["stage_0_block_0"].shape) == (4, 16, 16, 16)
    assert tuple(reps["norm"].shape) == (4, 2, 2, 128)
    if CHECK_AGAINST_CALL:
        pooled = _to_np(forward(tiny_swin, images[:4], subnet=(16, 1))["pooled"])
        np.testing.assert_allclose(_to_np(reps["norm"]).mean(axis=(1, 2)), pooled, atol=1e-5)
    result = analyze(tiny_swin, images, subnet_a=(16, 1), batch_size=4)
    assert result["model_a"]["layers"] == list(reps)
    np.testing.assert_allclose(np.diag(np.array(result["cka"])), 1.0, atol=1e-9)
    assert "no global attention" in result["attention"]["a"]["refused"]


def test_resnet_representations_and_cka(tiny_resnet):
    images = _images(8)
    spec = (8, (1, 1, 2, 1))
    reps = _hook(tiny_resnet, "layer_representations", images[:4], spec)
    assert list(reps) == ["stem", "stage_0_block_0", "stage_1_block_0", "stage_2_block_0",
                          "stage_2_block_2", "stage_3_block_0"]
    assert tuple(reps["stem"].shape) == (4, 8, 8, 8)
    if CHECK_AGAINST_CALL:
        pooled = _to_np(forward(tiny_resnet, images[:4], subnet=spec)["pooled"])
        np.testing.assert_allclose(_to_np(reps["stage_3_block_0"]).mean(axis=(1, 2)), pooled,
                                   atol=1e-5)
    result = analyze(tiny_resnet, images, subnet_a=spec, batch_size=4)
    assert np.shape(result["cka"]) == (6, 6)
    assert "the ResNet family) has no global attention" in result["attention"]["a"]["refused"]
    with pytest.raises(ValueError, match="no global attention"):
        analyze(tiny_resnet, images, subnet_a=spec, batch_size=4, attention=True)


def test_bn_resnet_uint8_images_and_two_models():
    keras.utils.set_random_seed(0)
    model = ResNet.from_config_name("resnet_bn_test")
    raw = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    floats = model.preprocessing.numpy(raw)
    reps = _hook(model, "layer_representations", floats)
    assert list(reps) == ["stem", "stage_0_block_0", "stage_1_block_0"]
    pooled = _to_np(forward(model, floats)["pooled"])
    np.testing.assert_allclose(_to_np(reps["stage_1_block_0"]).mean(axis=(1, 2)), pooled,
                               atol=1e-5)
    from_uint8 = analyze(model, raw, batch_size=6)
    from_float = analyze(model, floats, batch_size=6)
    np.testing.assert_allclose(from_uint8["cka"], from_float["cka"], rtol=1e-6)
    # two models on the same images: La x Lb
    keras.utils.set_random_seed(1)
    other = ResNet.from_config_name("resnet_bn_test", depths=(2, 1), name="other")
    two = analyze(model, raw, model_b=other, batch_size=6, attention=False)
    assert np.shape(two["cka"]) == (3, 4) and two["attention"] == {"a": None, "b": None}
    assert two["model_b"]["layers"] == ["stem", "stage_0_block_0", "stage_0_block_1",
                                        "stage_1_block_0"]
    assert two["model_b"]["name"] == "other" and two["model_b"]["family"] == "ResNet-BN"
    # different input sizes are refused, naming both
    big = ResNet.from_config_name("resnet_bn_test", image_size=64, name="big")
    with pytest.raises(ValueError, match="resnet_bn_test 32 px, big 64 px"):
        analyze(model, raw, model_b=big)


def test_bad_inputs_are_refused(small_vit):
    images = _images(4)
    with pytest.raises(ValueError, match="at least 4 images"):
        analyze(small_vit, images[:3])
    with pytest.raises(ValueError, match="batch_size must be >= 4, got 2"):
        analyze(small_vit, images, batch_size=2)
    with pytest.raises(ValueError, match="attention must be one of"):
        analyze(small_vit, images, attention="yes")
    with pytest.raises(ValueError, match="subnet_b needs model_b"):
        analyze(small_vit, images, subnet_b=(32, 2))
    with pytest.raises(ValueError, match="rank|shape"):
        analyze(small_vit, images[0])


def test_two_subnets_of_one_teacher_and_the_files(small_vit, tmp_path):
    images = _images(10, seed=1)
    result = analyze(small_vit, images, model_b=small_vit, subnet_a=(48, 3),
                     subnet_b=(32, 2), batch_size=5, verbose=1)
    assert np.shape(result["cka"]) == (4, 3)
    assert [np.shape(result["attention"][r]["entropy"]) for r in "ab"] == [(3, 3), (2, 2)]
    json.loads(json.dumps(result))                          # JSON-able
    paths = save_analysis(result, tmp_path / "out")
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["analysis.json", "attention_distance.png", "attention_entropy.png",
                     "cka.png"]
    for path in paths:
        if path.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["cka"] == result["cka"]
    with pytest.raises(ValueError, match="measure must be one of"):
        analysis.plot_attention(result, tmp_path / "x.png", measure="nope")


def test_the_analyze_command(small_vit, tmp_path, capsys):
    from absl import flags

    from poa_keras import cli

    small_vit.save_to_preset(str(tmp_path / "teacher"))   # its programs are compiled already
    out = tmp_path / "analysis"
    try:
        argv = flags.FLAGS(["poa-keras", "analyze", f"--preset={tmp_path / 'teacher'}",
                            "--subnet=width=48,depth=3", "--subnet_b=width=32,depth=2",
                            "--num_images=10", "--batch_size=5", "--verbose=0",
                            f"--output={out}"])
        code = cli.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    try:   # a bad value stops the command before any model is loaded
        code = cli.main(flags.FLAGS(["poa-keras", "analyze", "--num_images=3",
                                     f"--output={tmp_path / 'bad'}"]))
    finally:
        flags.FLAGS.unparse_flags()
    assert code == 1 and "--num_images must be >= 4" in capsys.readouterr().err
    assert "linear CKA: 4 x 3 layers, 10 images in 2 minibatches" in captured.out
    assert "attention distance of small_vit (px, mean over heads, per block)" in captured.out
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["model_a"]["subnet"] == {"width": 48, "depth": 3}
    assert saved["model_b"]["subnet"] == {"width": 32, "depth": 2}
    assert (out / "cka.png").is_file() and (out / "attention_entropy.png").is_file()
    help_text = cli.command_help("analyze")
    assert "linear CKA" in help_text and "--preset_b" in help_text

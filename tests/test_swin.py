"""ElasticSwin and its window layers: window attention, relative position bias and patch
merging against float64 numpy, shapes at odd sizes, shifts of extracted stages, errors, the
grid and the layer ids. Forward == extract, round trips, presets, int8, export, bfloat16,
stochastic depth and the POA / DINO steps: the family contract (tests/test_family_contract.py).

JAX compiles every program of a new shape (seconds each on a small CPU), so the model-level
checks use few specs and the layer-level checks run single jitted layers."""
import math

import keras
import numpy as np
import pytest
from conftest import randomize, to_np
from scipy.special import erf

from poa_keras import ElasticSwin, SwinSubnet
from poa_keras.backbones.swin import CONFIGS
from poa_keras.elastic.layers import HostInitializer
from poa_keras.elastic.window import (MERGE_POSITIONS, REFERENCE_MERGE_POSITIONS,
                                      ElasticPatchMerging, ElasticSwinBlock,
                                      ElasticWindowAttention, merge_rows_from_reference,
                                      relative_position_index)

BACKEND = keras.backend.backend()
TINY = dict(CONFIGS["swin_elastic_test"])   # widths 16, 32; stage-3 depths 1..3; window 4


@pytest.fixture(scope="module")
def tiny(tiny_swin):
    return tiny_swin   # conftest: the contract's Swin teacher (compiled programs are shared)


def run(layer, *args, **kwargs):
    """A layer's forward; jitted on JAX (eager JAX compiles op by op), with XLA's backend
    optimisation level 0: it compiles these test programs 2-3x faster, and tests compare
    programs compiled alike (or with numpy)."""
    if BACKEND != "jax":
        return layer(*args, **kwargs)
    import jax

    def stateless(trainable, non_trainable, *inputs):
        return layer.stateless_call(trainable, non_trainable, *inputs, **kwargs)[0]
    state = ([v.value for v in layer.trainable_variables],
             [v.value for v in layer.non_trainable_variables])
    compiled = jax.jit(stateless).lower(*state, *args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*state, *args)


def output_shapes(model, shape, **kwargs):
    """Output shapes of a symbolic call (traced, never compiled)."""
    if BACKEND == "jax":  # compute_output_spec would trace the subnet keyword as an array
        import jax

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])
        out = jax.eval_shape(lambda x: model.stateless_call(*state, x, **kwargs)[0],
                             jax.ShapeDtypeStruct(shape, "float32"))
    else:
        out = model.compute_output_spec(keras.KerasTensor(shape), **kwargs)
    return keras.tree.map_structure(lambda t: tuple(t.shape), out)


# -- extracted stages -------------------------------------------------------------------------
def test_extracted_stage3_keeps_the_shifts_of_its_blocks(tiny):
    assert tiny.extract(SwinSubnet(32, 2)).shifts == [[False], [False, True], [False, False],
                                                      [False]]
    assert tiny.extract(SwinSubnet(16, 3)).shifts == tiny.shifts


def test_outputs_are_cls_and_pooled_unless_feature_maps_are_asked_for(tiny):
    # (cls == pooled on every forward: the contract's Swin case checks it)
    out = output_shapes(tiny, (2, 32, 32, 3))
    assert sorted(out) == ["cls", "pooled"]  # the feature maps on request only


# -- shapes and input sizes ------------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (36, 22), (2, 2), (18, 50)])
def test_stage_shapes_for_any_multiple_of_the_patch(tiny, size):
    h, w = size
    out = output_shapes(tiny, (3, h, w, 3), subnet=SwinSubnet(16, 2), return_feature_maps=True)
    expected = tiny.stage_resolutions((h, w))
    rows, cols = h // 2, w // 2
    for s, (fmap, res) in enumerate(zip(out["feature_maps"], expected)):
        assert res == (rows, cols)
        assert fmap == (3, rows, cols, 16 * 2 ** s)
        rows, cols = math.ceil(rows / 2), math.ceil(cols / 2)
    assert out["cls"] == out["pooled"] == (3, 128)


def test_bad_images_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"image height 31 is not a multiple of the patch size 2"
                                         r".*multiples of 2 .*window 4"):
        tiny(np.zeros((1, 31, 32, 3), "float32"))
    with pytest.raises(ValueError, match=r"rank 4 .* got shape \(32, 32, 3\)"):
        tiny(np.zeros((32, 32, 3), "float32"))
    with pytest.raises(ValueError, match=r"expects 3 channels .* 1 channels"):
        tiny(np.zeros((1, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match="takes no masks"):
        tiny(np.zeros((1, 32, 32, 3), "float32"), masks=np.zeros((1, 256), bool))
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 2"):
        tiny.subnet_flops(image_size=33)


# -- grid, specs and errors ------------------------------------------------------------------
def test_invalid_specs_name_the_valid_values(tiny):
    x = np.zeros((1, 32, 32, 3), "float32")
    with pytest.raises(ValueError, match=r"width=24 .* valid widths: \[16, 32\]"):
        tiny(x, subnet=SwinSubnet(24, 2))
    with pytest.raises(ValueError, match=r"width=48 .* valid widths: \[16, 32\]"):
        tiny.extract(SwinSubnet(48, 2))
    with pytest.raises(ValueError, match=r"depth=4 \(stage 3\) .* valid depths: 1\.\.3"):
        tiny.extract(SwinSubnet(16, 4))
    with pytest.raises(ValueError, match=r"depth=0 .* valid depths: 1\.\.3"):
        tiny.subnet_from_kwargs(depth=0)
    with pytest.raises(ValueError, match=r"unknown named size 'huge'.*known sizes"):
        tiny.extract("huge")


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="embed_dim=40 is not a multiple of head_dim=16"):
        ElasticSwin(embed_dim=40, depths=(1, 1, 1, 1), image_size=32)
    with pytest.raises(ValueError, match="4 stages"):
        ElasticSwin(embed_dim=32, depths=(1, 1, 1), image_size=32)
    with pytest.raises(ValueError, match=r"min_depth=5 must lie in \[1, 3\]"):
        ElasticSwin(embed_dim=32, depths=(1, 1, 3, 1), min_depth=5, image_size=32)
    with pytest.raises(ValueError, match="unknown Swin configuration 'swin_x'"):
        ElasticSwin.from_config_name("swin_x")


def test_grid_sampling_and_named_sizes(tiny):
    assert tiny.subnets() == [SwinSubnet(w, d) for w in (16, 32) for d in (1, 2, 3)]
    assert tiny.full_subnet == SwinSubnet(32, 3)
    # round(ws * ds), ws = [2, 1] over widths, ds = [2, 1.5, 1] over depths (scale 2)
    assert tiny.sampling_counts() == [4, 3, 2, 2, 2, 1]
    assert tiny.sampling_counts(3) == [9, 6, 3, 3, 2, 1]
    assert tiny.full_subnet not in tiny.sampler(seed=0).frequencies()
    assert tiny.block_ids(SwinSubnet(16, 2)) == [[0], [0, 1], [0, 2], [0]]
    assert tiny.resolve_subnet("small") == SwinSubnet(16, 3)
    assert tiny.subnet_from_kwargs(width=16) == SwinSubnet(16, 3)


def test_reference_teacher_grid_and_sizes():
    with HostInitializer.skipped():  # counts and grids only: no time for random draws
        teacher = ElasticSwin.from_config_name("swin_elastic")
    assert teacher.widths == [96, 112, 128] and teacher.stage3_depths == list(range(6, 19))
    assert len(teacher.subnets()) == 39
    assert teacher.resolve_subnet("tiny") == SwinSubnet(96, 6)
    assert teacher.resolve_subnet("small") == SwinSubnet(96, 18)
    assert teacher.resolve_subnet("base") == teacher.full_subnet == SwinSubnet(128, 18)
    # depth 6 of 18 keeps blocks floor(17 j / 5): their shifts are kept (F, T, F, F, T, T)
    assert teacher.block_ids("tiny")[2] == [0, 3, 6, 10, 13, 17]
    # torchvision's swin_t has 28,288,354 parameters, of which its head (768 -> 1000) 769,000;
    # ours adds the stage norms 0..2 (2 (96 + 192 + 384)) and, with head dim 16 instead of 32,
    # twice the relative-position-bias heads (169 (6 + 12 + 72 + 48) more).
    assert teacher.subnet_params("tiny") == 28_288_354 - 769_000 + 1_344 + 169 * 138
    assert teacher.count_params() == teacher.subnet_params()
    # Swin-T / S / B: 4.5 / 8.7 / 15.4 GFLOPs (multiply-adds) at 224 (Liu et al., Table 1)
    for name, gmacs in (("tiny", 4.5), ("small", 8.7), ("base", 15.4)):
        assert abs(teacher.subnet_flops(name) / 2e9 - gmacs) < 0.02 * gmacs, name
    del teacher


def test_static_swin_t_matches_torchvision_parameter_count():
    with HostInitializer.skipped():
        model = ElasticSwin.from_config_name("swin_t")
    assert model.subnets() == [SwinSubnet(96, 6)]
    assert model.count_params() == 28_288_354 - 769_000 + 1_344
    del model


def test_family_hooks_that_trainers_and_eval_use(tiny):
    spec = SwinSubnet(16, 2)
    assert tiny.feature_dim() == 256 and tiny.feature_dim(spec) == 128
    assert tiny.head_active_in(None) is None
    assert tiny.head_active_in(SwinSubnet(32, 1)) is None
    assert tiny.head_active_in(spec) == 128
    assert tiny.subnet_log_values(spec) == {"width": 16.0, "depth": 2.0}
    assert not tiny.supports_masks
    # Layer ids over all 7 blocks: embed 0; stage 0 block 0 -> 1; stage 1 -> 2, 3; stage 2 ->
    # 4..6; stage 3 -> 7; merging before stage s+1 = its first block; norms -> 8.
    ids = {}
    for v in tiny.weights:
        ids.setdefault(v.path.split("/")[1], set()).add(tiny.layer_id(v.path))
    assert ids["patch_embed"] == ids["patch_norm"] == {0}
    assert ids["stages_0_blocks_0"] == {1} and ids["stages_1_blocks_1"] == {3}
    assert ids["stages_2_blocks_2"] == {6} and ids["stages_3_blocks_0"] == {7}
    assert ids["downsample_0"] == {2} and ids["downsample_2"] == {7}
    assert ids["norm_0"] == ids["norm_3"] == {8}
    patch = "tiny_swin/patch_embed/proj/kernel"
    assert tiny.lr_multiplier(patch, 0.5, 0.2) == pytest.approx(0.5 ** 8 * 0.2)
    assert tiny.lr_multiplier("tiny_swin/patch_norm/norm/gamma", 0.5, 0.2) == pytest.approx(
        0.5 ** 8 * 0.2)
    assert tiny.lr_multiplier("tiny_swin/stages_2_blocks_1/mlp/fc1/dense/kernel", 0.5,
                              0.2) == pytest.approx(0.5 ** 3)
    assert tiny.lr_multiplier("tiny_swin/norm_3/norm/gamma", 0.5, 0.2) == 1.0
    assert tiny.lr_multiplier("projection_heads/mlp_0/kernel", 0.5) == 1.0
    assert tiny.lr_multiplier(patch) == 1.0


def test_backbones_registry_finds_the_family():
    from poa_keras import backbones

    names = backbones.config_names()
    assert names["swin_elastic"] == names["swin_elastic_test"] == "ElasticSwin"
    assert backbones.BACKBONE_CLASSES["ElasticSwin"] is ElasticSwin
    model = backbones.from_config_name("swin_elastic_test", name="x")
    assert isinstance(model, ElasticSwin) and model.name == "x"


# -- window attention against float64 numpy --------------------------------------------------
def test_relative_position_index_matches_a_direct_count():
    for m in (1, 2, 3, 7):
        expected = np.zeros((m * m, m * m), np.int64)
        for i in range(m * m):
            for j in range(m * m):
                (yi, xi), (yj, xj) = divmod(i, m), divmod(j, m)
                expected[i, j] = (yi - yj + m - 1) * (2 * m - 1) + (xi - xj + m - 1)
        np.testing.assert_array_equal(relative_position_index(m), expected)
    index = relative_position_index(7)
    assert index.min() == 0 and index.max() == 13 ** 2 - 1 and index[24, 24] == 84  # centre


def test_relative_bias_is_the_table_of_the_first_heads():
    layer = ElasticWindowAttention(64, 16, 3)
    layer.build()
    table = np.random.default_rng(0).normal(size=(25, 4)).astype("float32")
    layer.relative_position_bias_table.assign(table)
    for heads in (4, 2, 1):
        bias = to_np(layer.relative_bias(heads))
        assert bias.shape == (heads, 9, 9)
        for h in range(heads):
            for i in range(9):
                for j in range(9):
                    (yi, xi), (yj, xj) = divmod(i, 3), divmod(j, 3)
                    assert bias[h, i, j] == table[(yi - yj + 2) * 5 + (xi - xj + 2), h]


def _np_layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _np_swin_block(x, p, window, shift, head_dim, eps):
    """Float64 Swin block on x (B, H, W, C), written from the paper's definition with loops
    over windows, heads and token pairs (no code under test)."""
    b, h, w, c = x.shape
    heads = c // head_dim
    y = _np_layer_norm(x, p["norm1_g"], p["norm1_b"], eps)
    hp, wp = -(-h // window) * window, -(-w // window) * window
    y = np.pad(y, [(0, 0), (0, hp - h), (0, wp - w), (0, 0)])
    s = window // 2 if shift else 0
    y = np.roll(y, (-s, -s), axis=(1, 2))
    # after the roll, token (r, q) came from ((r + s) % hp, (q + s) % wp): it "wrapped" on an
    # axis if that coordinate went past the border; tokens may attend to each other only if
    # they wrapped alike on both axes (the same region of the un-rolled map).
    wrap_r = (np.arange(hp) + s) >= hp
    wrap_c = (np.arange(wp) + s) >= wp
    out = np.zeros_like(y)
    for bi in range(b):
        for r0 in range(0, hp, window):
            for c0 in range(0, wp, window):
                cells = [(r0 + i, c0 + j) for i in range(window) for j in range(window)]
                tokens = np.stack([y[bi, r, q] for r, q in cells])            # (N, C)
                qkv = tokens @ p["qkv_k"] + p["qkv_b"]
                q_, k_, v_ = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
                res = np.zeros((len(cells), c))
                for hd in range(heads):
                    sl = slice(hd * head_dim, (hd + 1) * head_dim)
                    scores = (q_[:, sl] * head_dim ** -0.5) @ k_[:, sl].T
                    for i, (ri, qi) in enumerate(cells):
                        for j, (rj, qj) in enumerate(cells):
                            dy, dx = (ri - rj) + window - 1, (qi - qj) + window - 1
                            scores[i, j] += p["table"][dy * (2 * window - 1) + dx, hd]
                            if s and (wrap_r[ri] != wrap_r[rj] or wrap_c[qi] != wrap_c[qj]):
                                scores[i, j] -= 100.0
                    scores = np.exp(scores - scores.max(-1, keepdims=True))
                    res[:, sl] = (scores / scores.sum(-1, keepdims=True)) @ v_[:, sl]
                res = res @ p["proj_k"] + p["proj_b"]
                for i, (r, q) in enumerate(cells):
                    out[bi, r, q] = res[i]
    out = np.roll(out, (s, s), axis=(1, 2))[:, :h, :w]
    x = x + out
    z = _np_layer_norm(x, p["norm2_g"], p["norm2_b"], eps)
    z = z @ p["fc1_k"] + p["fc1_b"]
    z = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    return x + z @ p["fc2_k"] + p["fc2_b"]


def _block_params(block, active):
    """The block's weights as float64 numpy, sliced BY HAND to `active` channels with alpha
    = max_in / active_in on every kernel (the POA rule)."""
    full = block.dim
    a = active or full
    hidden, full_hidden = int(a * 4), int(full * 4)
    g = {v.path.split("/", 1)[1]: to_np(v) for v in block.weights}
    qkv = g["attn/qkv/dense/kernel"]
    qkv_b = g["attn/qkv/dense/bias"]
    cols = np.concatenate([np.arange(i * full, i * full + a) for i in range(3)])
    return {
        "norm1_g": g["norm1/norm/gamma"][:a], "norm1_b": g["norm1/norm/beta"][:a],
        "norm2_g": g["norm2/norm/gamma"][:a], "norm2_b": g["norm2/norm/beta"][:a],
        "qkv_k": qkv[:a][:, cols] * (full / a), "qkv_b": qkv_b[cols],
        "proj_k": g["attn/proj/dense/kernel"][:a, :a] * (full / a),
        "proj_b": g["attn/proj/dense/bias"][:a],
        "table": g["attn/relative_position_bias_table"][:, :a // block.head_dim],
        "fc1_k": g["mlp/fc1/dense/kernel"][:a, :hidden] * (full / a),
        "fc1_b": g["mlp/fc1/dense/bias"][:hidden],
        "fc2_k": g["mlp/fc2/dense/kernel"][:hidden, :a] * (full_hidden / hidden),
        "fc2_b": g["mlp/fc2/dense/bias"][:a],
    }


@pytest.mark.parametrize("shift", [False, True])
def test_swin_block_matches_float64_numpy(shift):
    # A 6 x 7 map with window 4: padded to 8 x 8 (4 windows); shift 2 with the region mask.
    # Full width 64 (4 heads) and elastic width 32 (the first 2 heads, alpha 2).
    keras.utils.set_random_seed(3)
    block = ElasticSwinBlock(64, 16, window_size=4, shift=shift, norm_epsilon=1e-5)
    block.build()
    rng = np.random.default_rng(4)
    block.set_weights([rng.normal(0, 0.3, size=tuple(v.shape)).astype("float32")
                       for v in block.weights])
    x = rng.normal(size=(2, 6, 7, 64)).astype("float32")
    for active in (None, 32):
        xa = x if active is None else x[..., :active]
        expected = _np_swin_block(xa.astype(np.float64), _block_params(block, active), 4, shift,
                                  16, 1e-5)
        got = to_np(run(block, xa, active=active))
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_shift_mask_separates_regions():
    # with the mask, a shifted block differs from the same rolled block without it; the
    # unshifted block must not depend on windows other than its own.
    block = ElasticSwinBlock(16, 16, window_size=2, shift=False)
    block.build()
    randomize(block, seed=5)
    x = np.random.default_rng(6).normal(size=(1, 4, 4, 16)).astype("float32")
    y = x.copy()
    y[:, 2:, 2:] += 1.0   # change the bottom-right window only
    a, b = to_np(run(block, x)), to_np(run(block, y))
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    np.testing.assert_array_equal(a[:, 2:, :2], b[:, 2:, :2])


# -- patch merging ---------------------------------------------------------------------------
def _np_merge(x, gamma, beta, kernel, eps):
    _, h, w, _ = x.shape
    x = np.pad(x, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)])
    # the original Swin: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2],
    # x3 = x[1::2, 1::2]
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    merged = np.concatenate(parts, axis=-1)
    return _np_layer_norm(merged, gamma, beta, eps) @ kernel


def test_patch_merging_matches_numpy_with_per_position_slicing():
    assert MERGE_POSITIONS == ((0, 0), (1, 0), (0, 1), (1, 1))
    layer = ElasticPatchMerging(32)
    layer.build()
    randomize(layer, seed=7)
    gamma, beta = to_np(layer.norm.gamma), to_np(layer.norm.beta)
    kernel = to_np(layer.reduction.kernel)                  # (128, 64)
    x = np.random.default_rng(8).normal(size=(2, 5, 6, 32)).astype("float32")
    got = to_np(run(layer, x))
    assert got.shape == (2, 3, 3, 64)
    np.testing.assert_allclose(got, _np_merge(x.astype(np.float64), gamma, beta, kernel, 1e-5),
                               atol=1e-4)
    c = 16  # elastic: rows p * 32 + [0, 16) of every position p, first 32 outputs, alpha 2
    rows = np.concatenate([np.arange(p * 32, p * 32 + c) for p in range(4)])
    expected = _np_merge(x[..., :c].astype(np.float64), gamma[rows], beta[rows],
                         kernel[rows, :2 * c] * 2.0, 1e-5)
    got = to_np(run(layer, x[..., :c], active=c))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_merge_rows_from_the_reference_order():
    # POA's reference merges (0,0), (0,1), (1,0), (1,1); the same weights in our order give
    # the same output on the same neighbourhood.
    rng = np.random.default_rng(9)
    dim = 3
    patch = rng.normal(size=(2, 2, dim))                   # one 2x2 neighbourhood
    kernel_ref = rng.normal(size=(4 * dim, 5))
    ref_in = np.concatenate([patch[r, c] for r, c in REFERENCE_MERGE_POSITIONS])
    our_in = np.concatenate([patch[r, c] for r, c in MERGE_POSITIONS])
    np.testing.assert_allclose(our_in @ merge_rows_from_reference(kernel_ref, dim),
                               ref_in @ kernel_ref)


# -- presets and deployment (the rest: the family contract) -----------------------------------
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_a_quantized_merge_layer_refuses_to_slice():
    merge = ElasticPatchMerging(16)   # a quantized layer cannot slice
    merge.build()
    merge.reduction.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized \(int8\).*Extract the sub-network first"):
        merge(np.zeros((1, 2, 2, 8), "float32"), active=8)

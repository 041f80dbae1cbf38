"""ElasticViT: what only the ViT has (masks, position-embedding resize, named configurations,
layer ids, errors). Forward == extract, round trips, int8, export, bfloat16, stochastic depth
and the trainers: the family contract (tests/test_family_contract.py)."""
import math

import keras
import numpy as np
import pytest
from conftest import forward, to_np
from keras import ops

from poa_keras import Backbone, ElasticViT, ViTSubnet
from poa_keras.backbones.vit import (CONFIGS, bicubic_resize_matrix, layer_decay_multipliers,
                                     vit_layer_id, vit_lr_multiplier)



def _max_diff(a, b):
    return max(float(np.abs(to_np(a[k]) - to_np(b[k])).max()) for k in ("cls", "patch_tokens"))


def test_the_small_vit_grid(small_vit):
    # forward == extract over this whole grid: tests/test_family_contract.py
    specs = small_vit.subnets()
    assert len(specs) == 25  # >= 20 specs, including min width, min depth and the full network
    assert ViTSubnet(32, 2) in specs and ViTSubnet(96, 6) in specs


def test_extracted_subnet_matches_with_masks_and_other_input_size(small_vit):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(2, 48, 40, 3)).astype("float32")  # grid 6 x 5, not 4 x 4
    masks = rng.uniform(size=(2, 30)) < 0.4
    spec = ViTSubnet(48, 3)
    sub = small_vit.extract(spec)
    a = small_vit(x, subnet=spec, masks=masks)
    b = sub(x, masks=masks)
    assert tuple(a["patch_tokens"].shape) == (2, 30, 48)
    assert _max_diff(a, b) <= 1e-5
    # masking really changes the tokens
    assert _max_diff(a, small_vit(x, subnet=spec)) > 1e-3


def test_bicubic_matrix_matches_torch_interpolate():
    torch = pytest.importorskip("torch", reason="torch is the independent reference here")
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(1, 5, 7, 7)).astype("float32")  # (N, C, H, W)
    for out_h, out_w in [(12, 9), (3, 4), (7, 7), (14, 14)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(out_h, out_w),
                                              mode="bicubic", align_corners=False).numpy()
        mine = np.einsum("hi,wj,ncij->nchw", bicubic_resize_matrix(out_h, 7),
                         bicubic_resize_matrix(out_w, 7), grid)
        np.testing.assert_allclose(mine, ref, atol=1e-5)


def numpy_bicubic_resize(grid, out_h, out_w, scale_h, scale_w):
    """(g, g, C) -> (out_h, out_w, C), written from torch's bicubic interpolate: source
    coordinate (i + 0.5) * scale - 0.5, Keys' kernel a = -0.75 on the 4 nearest samples,
    indices clamped to the border; applied separably, rows then columns."""
    def kernel(d, a=-0.75):
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a, 0.0))

    def resize_axis(x, out, scale, axis):
        x = np.moveaxis(x, axis, 0)
        src = (np.arange(out) + 0.5) * scale - 0.5
        base = np.floor(src).astype(int)
        result = np.zeros((out,) + x.shape[1:])
        for k in range(-1, 3):
            idx = np.clip(base + k, 0, x.shape[0] - 1)
            w = kernel(src - (base + k))
            result += w.reshape((-1,) + (1,) * (x.ndim - 1)) * x[idx]
        return np.moveaxis(result, 0, axis)

    return resize_axis(resize_axis(grid.astype(np.float64), out_h, scale_h, 0), out_w,
                       scale_w, 1)


@pytest.mark.parametrize("rule", ["size", "dino"])
def test_position_embedding_resize_rules_match_numpy_and_torch(rule):
    """Both rules of ``pos_embed_resize`` against a numpy implementation of each and against
    torch's interpolate called as the source code calls it (size= / DINO's scale_factor=)."""
    torch = pytest.importorskip("torch", reason="torch is the second independent reference")
    keras.utils.set_random_seed(3)
    vit = ElasticViT(image_size=32, patch_size=8, embed_dim=16, depth=1, head_dim=8,
                     pos_embed_resize=rule)
    vit(np.zeros((1, 32, 32, 3), "float32"))
    assert vit.get_config()["pos_embed_resize"] == rule
    pos = ops.convert_to_numpy(vit.pos_embed)[0]               # (1 + 16, 16)
    g = 4
    grid = pos[1:].reshape(g, g, 16)
    for out_h, out_w in [(2, 2), (2, 3), (7, 5), (6, 6)]:
        got = ops.convert_to_numpy(vit._position_embedding(out_h, out_w, 16))[0]
        np.testing.assert_array_equal(got[0], pos[0])          # the cls position is kept
        if rule == "size":
            scales = (g / out_h, g / out_w)
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(grid.transpose(2, 0, 1)[None]), size=(out_h, out_w),
                mode="bicubic", align_corners=False)
        else:   # DINO: interpolate(scale_factor=((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N)))
            scales = (g / (out_h + 0.1), g / (out_w + 0.1))
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(grid.transpose(2, 0, 1)[None]),
                scale_factor=((out_h + 0.1) / math.sqrt(g * g), (out_w + 0.1) / math.sqrt(g * g)),
                mode="bicubic", align_corners=False)
        ref = ref.numpy()[0].transpose(1, 2, 0)
        assert ref.shape == (out_h, out_w, 16)
        mine = numpy_bicubic_resize(grid, out_h, out_w, *scales)
        np.testing.assert_allclose(ref, mine, atol=1e-5)
        np.testing.assert_allclose(got[1:].reshape(out_h, out_w, 16), mine, atol=1e-5)


def test_position_embedding_rule_travels_and_matters(tmp_path):
    keras.utils.set_random_seed(4)
    vit = ElasticViT(image_size=32, patch_size=8, embed_dim=16, depth=2, head_dim=8,
                     min_width=8, min_depth=1, pos_embed_resize="dino")
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    out = ops.convert_to_numpy(vit(x)["cls"])
    # the rule is recorded in presets and kept by extraction
    vit.save_to_preset(str(tmp_path / "p"))
    again = Backbone.from_preset(str(tmp_path / "p"))
    assert again.pos_embed_resize == "dino"
    np.testing.assert_allclose(ops.convert_to_numpy(again(x)["cls"]), out, atol=1e-5)
    assert vit.extract(ViTSubnet(8, 1)).pos_embed_resize == "dino"
    # the other rule gives another embedding at 16 px (2 x 2 of a 4 x 4 grid)
    size = ElasticViT.from_config(dict(vit.get_config(), pos_embed_resize="size"))
    size(x)
    size.set_weights(vit.get_weights())
    a = ops.convert_to_numpy(vit._position_embedding(2, 2, 16))
    b = ops.convert_to_numpy(size._position_embedding(2, 2, 16))
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    with pytest.raises(ValueError, match=r"pos_embed_resize must be one of \('size', 'dino'\), "
                                         r"got 'bilinear'"):
        ElasticViT(image_size=32, patch_size=8, embed_dim=16, depth=1, head_dim=8,
                   pos_embed_resize="bilinear")


def test_block_ids_and_named_sizes(small_vit):
    assert small_vit.block_ids(ViTSubnet(32, 2)) == [0, 5]
    assert small_vit.block_ids(ViTSubnet(32, 4)) == [0, 1, 3, 5]
    assert small_vit.block_ids() == list(range(6))
    teacher = ElasticViT.from_config_name("vit_elastic_test")
    assert teacher.resolve_subnet("small") == ViTSubnet(32, 2)
    assert teacher.resolve_subnet("large") == teacher.full_subnet
    assert CONFIGS["vit_l16_elastic"]["named_subnets"]["base"] == (768, 12)


@pytest.mark.parametrize("name", ["vit_ti16", "vit_s14", "vit_b8", "vit_l16", "vit_h14"])
def test_named_configurations(name):
    cfg = CONFIGS[name]
    expected = {"vit_ti16": (192, 12, 3), "vit_s14": (384, 12, 6), "vit_b8": (768, 12, 12),
                "vit_l16": (1024, 24, 16), "vit_h14": (1280, 32, 16)}[name]
    assert (cfg["embed_dim"], cfg["depth"], cfg["embed_dim"] // cfg["head_dim"]) == expected


def test_vit_l16_elastic_teacher_grid():
    teacher = ElasticViT.from_config_name("vit_l16_elastic")
    assert len(teacher.subnets()) == 143
    assert teacher.resolve_subnet("small") == ViTSubnet(384, 12)
    assert teacher.resolve_subnet("base") == ViTSubnet(768, 12)
    assert teacher.resolve_subnet("large") == ViTSubnet(1024, 24)
    # ViT-L/16 has about 304M parameters; its ViT-S/16 subnet about 22M (timm: 22.05M)
    assert 303e6 < teacher.count_params() < 305e6
    assert 21.5e6 < teacher.subnet_params("small") < 22.5e6
    sampler = teacher.sampler(seed=0)
    assert teacher.full_subnet not in sampler.frequencies()
    del teacher


# -- bad input -------------------------------------------------------------------------------
def test_invalid_specs_name_the_valid_values(small_vit, images):
    with pytest.raises(ValueError, match=r"width=40 .* valid widths: \[32, 48, 64, 80, 96\]"):
        small_vit(images, subnet=ViTSubnet(40, 3))
    with pytest.raises(ValueError, match=r"depth=7 .* valid depths: 2\.\.6"):
        small_vit.extract(ViTSubnet(32, 7))
    with pytest.raises(ValueError, match=r"unknown named size 'huge'.*known sizes"):
        small_vit.extract("huge")


def test_bad_images_raise_clear_errors(small_vit):
    with pytest.raises(ValueError, match=r"rank 4 .* got shape \(32, 32, 3\)"):
        small_vit(np.zeros((32, 32, 3), "float32"))
    with pytest.raises(ValueError, match=r"expects 3 channels .* 1 channels"):
        small_vit(np.zeros((1, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match=r"image height 30 is not a multiple of the patch size 8"):
        small_vit(np.zeros((1, 30, 32, 3), "float32"))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        ElasticViT(embed_dim=100, head_dim=16, depth=2, image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="unknown ViT configuration 'vit_x'"):
        ElasticViT.from_config_name("vit_x")


def test_masks_need_a_mask_token():
    model = ElasticViT(image_size=16, patch_size=8, embed_dim=32, depth=1, head_dim=16)
    with pytest.raises(ValueError, match="without a mask token"):
        model(np.zeros((1, 16, 16, 3), "float32"), masks=np.zeros((1, 4), bool))


# Stochastic depth, config / .keras / preset round trips, int8, export and bfloat16: the
# family contract (tests/test_family_contract.py).


def test_layer_decay():
    m = layer_decay_multipliers(4, 0.9)
    np.testing.assert_allclose(m, [0.9 ** 5, 0.9 ** 4, 0.9 ** 3, 0.9 ** 2, 0.9, 1.0])
    assert vit_layer_id("vit/patch_embed/proj/kernel", 4) == 0
    assert vit_layer_id("vit/cls_token", 4) == 0
    assert vit_layer_id("vit/pos_embed", 4) == 0
    assert vit_layer_id("vit/blocks_0/attn/qkv/dense/kernel", 4) == 1
    assert vit_layer_id("vit/blocks_3/mlp/fc2/dense/bias", 4) == 4
    assert vit_layer_id("vit/norm/norm/gamma", 4) == 5
    assert vit_layer_id("dino_head/mlp_0/dense/kernel", 4) == 5
    assert vit_lr_multiplier("vit/patch_embed/proj/kernel", 4, 0.9, 0.2) == pytest.approx(
        0.2 * 0.9 ** 5)
    assert vit_lr_multiplier("vit/blocks_1/norm1/norm/gamma", 4, 0.9, 0.2) == pytest.approx(
        0.9 ** 3)
    assert vit_lr_multiplier("head/last_layer/weight_v", 4, 0.9, 0.2) == 1.0
    with pytest.raises(ValueError, match="block 7 out of range"):
        vit_layer_id("vit/blocks_7/attn", 4)


def test_family_hooks_that_trainers_and_eval_use(small_vit, images):
    spec = ViTSubnet(48, 3)
    assert small_vit.feature_dim() == 96
    assert small_vit.feature_dim(spec) == 48 == int(forward(small_vit, images, spec)["cls"].shape[-1])
    assert small_vit.head_active_in(None) is None
    assert small_vit.head_active_in(ViTSubnet(96, 3)) is None   # full width: no slicing
    assert small_vit.head_active_in(spec) == 48
    assert small_vit.subnet_log_values(spec) == {"width": 48.0, "depth": 3.0}
    assert small_vit.supports_masks
    # Layer ids (DINOv2): 0 = embedding, block i -> i + 1, final norm -> depth + 1.
    paths = {v.path: v for v in small_vit.weights}
    patch = next(p for p in paths if "patch_embed" in p and p.endswith("kernel"))
    block2 = next(p for p in paths if "blocks_2" in p)
    assert small_vit.lr_multiplier(patch, 0.5, 0.2) == pytest.approx(0.5 ** 7 * 0.2)
    assert small_vit.lr_multiplier(block2, 0.5, 0.2) == pytest.approx(0.5 ** 4)
    assert small_vit.lr_multiplier(block2) == 1.0


def test_backbones_from_config_name_finds_the_family():
    from poa_keras import backbones

    assert backbones.config_names()["vit_elastic_test"] == "ElasticViT"
    model = backbones.from_config_name("vit_elastic_test", name="x")
    assert isinstance(model, ElasticViT) and model.name == "x"
    with pytest.raises(ValueError, match="unknown backbone configuration 'nope'.*vit_elastic_test"):
        backbones.from_config_name("nope")

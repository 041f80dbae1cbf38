"""Released checkpoints -> our models (poa_keras/convert): for every format of the zoo, a random
checkpoint in the OFFICIAL layout (key names and shapes as published; what the official init
leaves at zero randomised) is written with torch.save, converted from the file, and compared
with an INDEPENDENT implementation holding the same weights: Hugging Face transformers' ViTModel
(DINO), Dinov2Model (DINOv2), ViTMAEForPreTraining (MAE, MAE-Lite), and a torch.nn.functional
ResNet-50 written here from torchvision's code (DINO's ResNet-50). Final features agree to 1e-4
on every backend, at the training size and at other sizes (DINO's and DINOv2's position-
embedding resize rule is the official code's, written here in torch: transformers' own rule
interpolates to the target size instead). Full width, 2 blocks deep (the ResNet-50 whole);
one full-size ViT-B proof is marked slow.
"""
import argparse
import types

import numpy as np
import pytest

from conftest import to_np

torch = pytest.importorskip("torch", reason="torch writes the official files and runs the "
                                            "transformers references (the test extra)")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

from poa_keras.convert import convert_checkpoint, read_torch_checkpoint  # noqa: E402


def _card(name, config_name, fmt, class_name="ElasticViT", **arch):
    return {"name": name, "architecture": dict(class_name=class_name, config_name=config_name,
                                               **arch),
            "weights": {"format": fmt, "url": None}}


# ------------------------------------------------------------------ the official ViT layouts

def official_vit_state(rng, dim, depth, patch, grid, mlp_ratio=4, layer_scale=False,
                       mask_token=False, pos_embed=None, prefix=""):
    """A timm-style ViT state dict as DINO / DINOv2 / MAE publish it (REFERENCE.md §2, §5b;
    docs/zoo.md), random values everywhere (LayerNorm gains around 1)."""
    hidden = int(dim * mlp_ratio)

    def w(*shape, fan_in=None):
        scale = 1.0 / np.sqrt(fan_in or shape[-1])
        return rng.normal(0, scale, shape).astype("float32")

    def small(*shape):
        return rng.normal(0, 0.1, shape).astype("float32")

    sd = {"cls_token": small(1, 1, dim),
          "pos_embed": small(1, 1 + grid * grid, dim) if pos_embed is None else pos_embed,
          "patch_embed.proj.weight": w(dim, 3, patch, patch, fan_in=3 * patch * patch),
          "patch_embed.proj.bias": small(dim)}
    if mask_token:
        sd["mask_token"] = small(1, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + small(dim), b + "norm1.bias": small(dim),
            b + "attn.qkv.weight": w(3 * dim, dim), b + "attn.qkv.bias": small(3 * dim),
            b + "attn.proj.weight": w(dim, dim), b + "attn.proj.bias": small(dim),
            b + "norm2.weight": 1 + small(dim), b + "norm2.bias": small(dim),
            b + "mlp.fc1.weight": w(hidden, dim), b + "mlp.fc1.bias": small(hidden),
            b + "mlp.fc2.weight": w(dim, hidden), b + "mlp.fc2.bias": small(dim)})
        if layer_scale:
            sd[b + "ls1.gamma"] = 0.5 + small(dim)
            sd[b + "ls2.gamma"] = 0.5 + small(dim)
    sd.update({"norm.weight": 1 + small(dim), "norm.bias": small(dim)})
    return {prefix + k: v for k, v in sd.items()}


def _hf_blocks(sd, depth, hf_prefix, layer_names):
    """Official block keys -> transformers' (q, k, v split from qkv's [q; k; v] rows)."""
    out = {}
    before, after, ls = layer_names
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{hf_prefix}{i}."
        dim = sd[b + "attn.proj.weight"].shape[0]
        for j, name in enumerate("qkv"):
            out[h + f"attention.{name}_proj.weight"] = sd[b + "attn.qkv.weight"][j * dim:(j + 1) * dim]
            out[h + f"attention.{name}_proj.bias"] = sd[b + "attn.qkv.bias"][j * dim:(j + 1) * dim]
        out[h + "attention.o_proj.weight"] = sd[b + "attn.proj.weight"]
        out[h + "attention.o_proj.bias"] = sd[b + "attn.proj.bias"]
        for ours, theirs in (("norm1", before), ("norm2", after)):
            out[h + f"{theirs}.weight"] = sd[b + f"{ours}.weight"]
            out[h + f"{theirs}.bias"] = sd[b + f"{ours}.bias"]
        for k in ("fc1", "fc2"):
            out[h + f"mlp.{k}.weight"] = sd[b + f"mlp.{k}.weight"]
            out[h + f"mlp.{k}.bias"] = sd[b + f"mlp.{k}.bias"]
        if ls:
            out[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
            out[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def _hf_embeddings(sd, prefix):
    out = {prefix + "cls_token": sd["cls_token"],
           prefix + "position_embeddings": sd["pos_embed"],
           prefix + "patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           prefix + "patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]}
    if "mask_token" in sd and sd["mask_token"].ndim == 2:   # DINOv2's; MAE's is the decoder's
        out[prefix + "mask_token"] = sd["mask_token"]
    return out


def _load_hf(model, arrays):
    state = model.state_dict()
    assert set(arrays) == set(state), (sorted(set(state) - set(arrays)),
                                       sorted(set(arrays) - set(state)))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                           arrays.items()})
    return model.eval()


def official_resize(self, embeddings, height, width):
    """DINO's / DINOv2's ``interpolate_pos_encoding`` (facebookresearch/dino
    vision_transformer.py; dinov2 models/vision_transformer.py: interpolate_offset 0.1,
    antialias False), in torch: bicubic with scale_factor (g + 0.1) / sqrt(N)."""
    import math

    pos = self.position_embeddings
    npatch, n = embeddings.shape[1] - 1, pos.shape[1] - 1
    patch = self.patch_embeddings.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    h0, w0 = height // patch, width // patch
    if npatch == n and h0 == w0:
        return pos
    m = int(math.sqrt(n))
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(
        grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic",
        align_corners=False, antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def _save(path, obj):
    def tensors(value):
        if isinstance(value, dict):
            return {k: tensors(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return value
    torch.save(tensors(obj), path)
    return read_torch_checkpoint(path)


def run_inference(model, x, **kwargs):
    """The model's forward in inference: one jitted program on JAX (eager JAX compiles op by
    op: minutes for a ViT-B), eager elsewhere."""
    import keras

    if keras.backend.backend() != "jax":
        return model(x, training=False, **kwargs)
    import jax

    return jax.jit(lambda a, k: model(a, training=False, **k))(x, kwargs)


def _images(rng, h, w, batch=2):
    return rng.uniform(-1, 1, (batch, h, w, 3)).astype("float32")


def _torch_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------------- DINO

def _hf_vit(sd, dim, depth, heads, patch, image_size):
    config = transformers.ViTConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * dim, image_size=image_size, patch_size=patch, qkv_bias=True,
        layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="eager")
    model = transformers.ViTModel(config, add_pooling_layer=False)
    arrays = _hf_embeddings(sd, "embeddings.")
    arrays.update(_hf_blocks(sd, depth, "layers.", ("layernorm_before", "layernorm_after",
                                                     False)))
    arrays.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    model = _load_hf(model, arrays)
    model.embeddings.interpolate_pos_encoding = types.MethodType(official_resize,
                                                                 model.embeddings)
    return model


@pytest.mark.parametrize("config_name, dim, heads, patch", [("dino_vit_s16", 384, 6, 16),
                                                           ("dino_vit_b8", 768, 12, 8)])
def test_dino_vit_equals_transformers_at_every_size(tmp_path, config_name, dim, heads, patch):
    rng = np.random.default_rng(0)
    sd = official_vit_state(rng, dim, 2, patch, 224 // patch)
    checkpoint = _save(tmp_path / "dino.pth", sd)
    model, decoder, dropped = convert_checkpoint(
        checkpoint, _card("dino_test", config_name, "dino_pth"), depth=2)
    assert decoder is None and dropped == []
    hf = _hf_vit(sd, dim, 2, heads, patch, 224)
    sizes = [(224, 224), (160, 96)] if patch == 16 else [(224, 224), (96, 64)]
    for h, w in sizes:
        x = _images(rng, h, w)
        with torch.no_grad():
            ref = hf(pixel_values=_torch_nchw(x), interpolate_pos_encoding=True)
        ref = ref.last_hidden_state.numpy()
        out = run_inference(model, x)
        np.testing.assert_allclose(to_np(out["cls"]), ref[:, 0], atol=1e-4, rtol=0,
                                   err_msg=f"{h}x{w}")
        np.testing.assert_allclose(to_np(out["patch_tokens"]), ref[:, 1:], atol=1e-4, rtol=0,
                                   err_msg=f"{h}x{w}")


def test_dino_full_checkpoint_converts_its_teacher_and_drops_the_head(tmp_path):
    rng = np.random.default_rng(1)
    teacher = official_vit_state(rng, 384, 2, 16, 14, prefix="backbone.")
    student = official_vit_state(rng, 384, 2, 16, 14, prefix="module.backbone.")
    head = {"head.mlp.0.weight": rng.normal(size=(64, 384)).astype("float32"),
            "head.last_layer.weight_g": np.ones((256, 1), np.float32),
            "head.last_layer.weight_v": rng.normal(size=(256, 64)).astype("float32")}
    checkpoint = _save(tmp_path / "full.pth", {
        "teacher": dict(teacher, **head), "student": student, "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": np.zeros((1, 256), np.float32)}})
    model, _, dropped = convert_checkpoint(
        checkpoint, _card("dino_test", "dino_vit_s16", "dino_pth"), depth=2)
    assert dropped == ["the teacher's projection head (3 keys)", "'student'", "'epoch'",
                       "'args'", "'dino_loss'"]
    np.testing.assert_array_equal(to_np(model.cls_token), teacher["backbone.cls_token"])
    np.testing.assert_array_equal(to_np(model.blocks[1].mlp.fc2.dense.kernel),
                                  teacher["backbone.blocks.1.mlp.fc2.weight"].T)


# ----------------------------------------------------------------------------------- DINOv2

def test_dinov2_equals_transformers_with_layerscale_mask_token_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    dim, heads, patch, grid = 384, 6, 14, 37
    sd = official_vit_state(rng, dim, 2, patch, grid, layer_scale=True, mask_token=True)
    checkpoint = _save(tmp_path / "dinov2.pth", sd)
    model, _, _ = convert_checkpoint(
        checkpoint, _card("dinov2_test", "dinov2_vit_s14", "dinov2_pth"), depth=2)
    config = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=2, num_attention_heads=heads, mlp_ratio=4,
        image_size=518, patch_size=patch, layer_norm_eps=1e-6, layerscale_value=1.0,
        qkv_bias=True, attn_implementation="eager")
    arrays = _hf_embeddings(sd, "embeddings.")
    arrays.update(_hf_blocks(sd, 2, "encoder.layer.", ("norm1", "norm2", True)))
    arrays.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    hf = _load_hf(transformers.Dinov2Model(config), arrays)
    hf.embeddings.interpolate_pos_encoding = types.MethodType(official_resize, hf.embeddings)
    for h, w in ((224, 224), (126, 70), (518, 518)):
        x = _images(rng, h, w, batch=2)
        n = (h // patch) * (w // patch)
        masks = rng.uniform(size=(2, n)) < 0.3
        with torch.no_grad():
            ref = hf(pixel_values=_torch_nchw(x),
                     bool_masked_pos=torch.from_numpy(masks)).last_hidden_state.numpy()
        out = run_inference(model, x, masks=masks)
        np.testing.assert_allclose(to_np(out["cls"]), ref[:, 0], atol=1e-4, rtol=0,
                                   err_msg=f"{h}x{w}")
        np.testing.assert_allclose(to_np(out["patch_tokens"]), ref[:, 1:], atol=1e-4, rtol=0,
                                   err_msg=f"{h}x{w}")


# ------------------------------------------------------------------------- MAE and MAE-Lite

def _mae_table(grid, dim):
    """MAE's get_2d_sincos_pos_embed (util/pos_embed.py), from transformers' own builder in
    the released layout (its halves swapped, as its initialize_weights does)."""
    from transformers.models.vit_mae import modeling_vit_mae as hf_mae

    table = hf_mae.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
    half = table.shape[-1] // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1)[None].numpy()


def official_mae_state(rng, dim, depth, patch, grid, decoder=None, prefix=""):
    sd = official_vit_state(rng, dim, depth, patch, grid, pos_embed=_mae_table(grid, dim))
    if decoder is not None:
        ddim, ddepth = decoder
        dec = official_vit_state(rng, ddim, ddepth, patch, grid)
        sd.update({"mask_token": rng.normal(0, 0.1, (1, 1, ddim)).astype("float32"),
                   "decoder_embed.weight": rng.normal(0, dim ** -0.5, (ddim, dim)).astype(
                       "float32"),
                   "decoder_embed.bias": rng.normal(0, 0.1, ddim).astype("float32"),
                   "decoder_pos_embed": _mae_table(grid, ddim),
                   "decoder_norm.weight": dec["norm.weight"], "decoder_norm.bias": dec["norm.bias"],
                   "decoder_pred.weight": rng.normal(0, ddim ** -0.5, (patch * patch * 3, ddim)
                                                     ).astype("float32"),
                   "decoder_pred.bias": rng.normal(0, 0.1, patch * patch * 3).astype("float32")})
        sd.update({"decoder_" + k: v for k, v in dec.items() if k.startswith("blocks.")})
    return {prefix + k: v for k, v in sd.items()}


def _hf_mae(sd, dim, depth, heads, patch, image_size, decoder):
    ddim, ddepth, dheads = decoder
    config = transformers.ViTMAEConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * dim, image_size=image_size, patch_size=patch, qkv_bias=True,
        layer_norm_eps=1e-6, decoder_hidden_size=ddim, decoder_num_hidden_layers=ddepth,
        decoder_num_attention_heads=dheads, decoder_intermediate_size=4 * ddim,
        mask_ratio=0.75, norm_pix_loss=True, attn_implementation="eager")
    model = transformers.ViTMAEForPreTraining(config)
    arrays = {"vit." + k: v for k, v in _hf_embeddings(sd, "embeddings.").items()}
    arrays.update(_hf_blocks(sd, depth, "vit.layers.", ("layernorm_before", "layernorm_after",
                                                        False)))
    arrays.update({"vit.layernorm.weight": sd["norm.weight"],
                   "vit.layernorm.bias": sd["norm.bias"]})
    dec = {k[len("decoder_"):]: v for k, v in sd.items() if k.startswith("decoder_blocks.")}
    arrays.update(_hf_blocks(dec, ddepth, "decoder.decoder_layers.",
                             ("layernorm_before", "layernorm_after", False)))
    arrays.update({"decoder.mask_token": sd["mask_token"],
                   "decoder.decoder_pos_embed": sd["decoder_pos_embed"]})
    for k in ("decoder_embed", "decoder_norm", "decoder_pred"):
        arrays[f"decoder.{k}.weight"] = sd[f"{k}.weight"]
        arrays[f"decoder.{k}.bias"] = sd[f"{k}.bias"]
    return _load_hf(model, arrays)


@pytest.mark.parametrize("fmt, config_name, dim, heads, decoder, prefix", [
    ("mae_pth", "mae_vit_base16", 768, 12, (512, 1, 16), ""),
    ("maelite_pth", "mae_vit_tiny16", 192, 12, (96, 1, 3), "module.model.")])
def test_mae_encoder_and_decoder_equal_transformers(tmp_path, fmt, config_name, dim, heads,
                                                    decoder, prefix):
    from poa_keras.methods.mae import MAE

    rng = np.random.default_rng(3)
    ddim, ddepth, dheads = decoder
    sd = official_mae_state(rng, dim, 2, 16, 14, decoder=(ddim, ddepth))
    state = {prefix + k: v for k, v in sd.items()}
    if fmt == "maelite_pth":   # a distilled file: its teacher and adapter are dropped
        state["module.tch_model.cls_token"] = np.zeros((1, 1, 768), np.float32)
        state["module.attn_adapter.adapter11.weight"] = np.zeros((12, 12, 1, 1), np.float32)
    checkpoint = _save(tmp_path / "mae.pth", {"model": state, "epoch": 399})
    card = _card("mae_test", config_name, fmt,
                 decoder=dict(dim=ddim, depth=ddepth, num_heads=dheads))
    model, dec, dropped = convert_checkpoint(checkpoint, card, depth=2)
    assert (fmt == "maelite_pth") == bool(dropped)
    hf = _hf_mae(sd, dim, 2, heads, 16, 224, decoder)
    x = _images(rng, 224, 224)
    n = 196
    # the encoder on every patch (noise = arange keeps the grid order; mask ratio 0)
    hf.config.mask_ratio = 0.0
    hf.vit.embeddings.config.mask_ratio = 0.0
    with torch.no_grad():
        ref = hf.vit(pixel_values=_torch_nchw(x),
                     noise=torch.arange(n, dtype=torch.float32).repeat(2, 1)
                     ).last_hidden_state.numpy()
    out = run_inference(model, x)
    np.testing.assert_allclose(to_np(out["cls"]), ref[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(to_np(out["patch_tokens"]), ref[:, 1:], atol=1e-4, rtol=0)
    # the pretraining forward (encoder on the visible patches + decoder) at mask ratio 0.75
    hf.config.mask_ratio = 0.75
    hf.vit.embeddings.config.mask_ratio = 0.75
    noise = rng.uniform(size=(2, n)).astype("float32")
    with torch.no_grad():
        ref = hf(pixel_values=_torch_nchw(x), noise=torch.from_numpy(noise))
    trainer = MAE(model, decoder=dec, recipe=dict(epochs=1, steps_per_epoch=1, batch_size=2,
                                                warmup_epochs=0))
    loss, _, pred, mask = trainer.forward(x, noise, training=False)
    np.testing.assert_array_equal(to_np(mask), ref.mask.numpy())
    np.testing.assert_allclose(to_np(pred), ref.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(to_np(loss)), float(ref.loss), rtol=1e-5)


# ------------------------------------------------------------------------- DINO's ResNet-50

def official_resnet50_state(rng):
    """torchvision's resnet50 state dict without fc (DINO's dino_resnet50_pretrain.pth):
    random convs (He scale), BatchNorm gains, offsets and running statistics."""
    sd = {}

    def conv(key, out, inp, k):
        sd[key] = rng.normal(0, np.sqrt(2.0 / (inp * k * k)), (out, inp, k, k)).astype("float32")

    def bn(key, c):
        sd[key + ".weight"] = rng.uniform(0.5, 1.0, c).astype("float32")
        sd[key + ".bias"] = rng.normal(0, 0.1, c).astype("float32")
        sd[key + ".running_mean"] = rng.normal(0, 0.1, c).astype("float32")
        sd[key + ".running_var"] = rng.uniform(0.5, 2.0, c).astype("float32")
        sd[key + ".num_batches_tracked"] = np.array(1000, np.int64)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for j in range(blocks):
            p = f"layer{s}.{j}."
            conv(p + "conv1.weight", width, inp, 1)
            bn(p + "bn1", width)
            conv(p + "conv2.weight", width, width, 3)
            bn(p + "bn2", width)
            conv(p + "conv3.weight", width * 4, width, 1)
            bn(p + "bn3", width * 4)
            if j == 0:
                conv(p + "downsample.0.weight", width * 4, inp, 1)
                bn(p + "downsample.1", width * 4)
            inp = width * 4
    return sd


def torch_resnet50(sd, x):
    """torchvision's ResNet-50 (v1.5: the stride on the 3 x 3 conv) forward in eval mode,
    written with torch.nn.functional; returns the global average of the last stage."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def bn(y, key):
        return F.batch_norm(y, t[key + ".running_mean"], t[key + ".running_var"],
                            t[key + ".weight"], t[key + ".bias"], False, 0.0, 1e-5)

    y = F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1"))
    y = F.max_pool2d(y, 3, 2, 1)
    for s, blocks in enumerate((3, 4, 6, 3), 1):
        for j in range(blocks):
            p = f"layer{s}.{j}."
            stride = 2 if (j == 0 and s > 1) else 1
            out = F.relu(bn(F.conv2d(y, t[p + "conv1.weight"]), p + "bn1"))
            out = F.relu(bn(F.conv2d(out, t[p + "conv2.weight"], stride=stride, padding=1),
                            p + "bn2"))
            out = bn(F.conv2d(out, t[p + "conv3.weight"]), p + "bn3")
            short = y if j else bn(F.conv2d(y, t[p + "downsample.0.weight"], stride=stride),
                                   p + "downsample.1")
            y = F.relu(out + short)
    return y.mean(dim=(2, 3))


def test_dino_resnet50_equals_torchvisions_forward(tmp_path):
    rng = np.random.default_rng(4)
    sd = official_resnet50_state(rng)
    checkpoint = _save(tmp_path / "dino_resnet50.pth", sd)
    model, _, _ = convert_checkpoint(checkpoint, _card("r50", "resnet50_bn", "dino_pth",
                                                       class_name="ResNet"))
    for h, w in ((64, 64), (72, 40)):
        x = _images(rng, h, w)
        with torch.no_grad():
            ref = torch_resnet50(sd, _torch_nchw(x)).numpy()
        got = to_np(run_inference(model, x)["pooled"])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=f"{h}x{w}")


# ---------------------------------------------------------------------------- bad checkpoints

def test_a_checkpoint_of_another_architecture_or_damaged_is_named(tmp_path):
    rng = np.random.default_rng(5)
    card = _card("dino_vit_s16", "dino_vit_s16", "dino_pth")
    vit_b = _save(tmp_path / "b.pth", official_vit_state(rng, 768, 2, 16, 14))
    with pytest.raises(ValueError, match=r"cls_token: shape \(1, 1, 768\) does not fit "
                                         r"dino_vit_s16.*\(1, 1, 384\)"):
        convert_checkpoint(vit_b, card, depth=2)
    deeper = _save(tmp_path / "deep.pth", official_vit_state(rng, 384, 3, 16, 14))
    with pytest.raises(ValueError, match=r"12 key\(s\) that dino_vit_s16.*does not use"
                                         r".*blocks.2.attn.proj.bias"):
        convert_checkpoint(deeper, card, depth=2)
    sd = official_vit_state(rng, 384, 2, 16, 14)
    del sd["blocks.1.norm2.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 key\(s\).*blocks.1.norm2.bias"):
        convert_checkpoint(_save(tmp_path / "short.pth", sd), card, depth=2)
    with pytest.raises(ValueError, match="a state dict of arrays"):
        convert_checkpoint({"epoch": 3}, card, depth=2)
    # a trained position embedding cannot become MAE's fixed one
    mae = official_vit_state(rng, 192, 2, 16, 14)
    with pytest.raises(ValueError, match="pos_embed is not MAE's fixed 2-D sin-cos table"):
        convert_checkpoint({"model": mae}, _card("m", "mae_vit_tiny16", "mae_pth"), depth=2)
    # an encoder-only source given a full file, and a fine-tuned MAE-Lite file
    full = official_mae_state(rng, 192, 2, 16, 14, decoder=(96, 1))
    with pytest.raises(ValueError, match="holds MAE decoder keys"):
        convert_checkpoint({"model": full}, _card("m", "mae_vit_tiny16", "mae_pth"), depth=2)
    tuned = dict(official_mae_state(rng, 192, 2, 16, 14), **{
        "fc_norm.weight": np.ones(192, np.float32), "fc_norm.bias": np.zeros(192, np.float32)})
    with pytest.raises(ValueError, match="fine-tuned MAE-Lite file"):
        convert_checkpoint({"model": tuned}, _card("m", "mae_vit_tiny16", "maelite_pth"),
                           depth=2)


# ------------------------------------------------------------- full size, one backend (slow)

_ONE_BACKEND = pytest.mark.skipif(
    __import__("keras").backend.backend() != "torch",
    reason="one full-size proof per architecture, on one backend (torch, the quickest to build "
           "them here); the 2-block proofs above run the same converters on every backend")


@pytest.mark.slow
@_ONE_BACKEND
@pytest.mark.parametrize("source", ["dino_vit_b16", "dinov2_vit_s14", "mae_vit_b16"])
def test_full_size_vits_equal_transformers(tmp_path, source):
    rng = np.random.default_rng(7)
    if source == "dino_vit_b16":
        sd = official_vit_state(rng, 768, 12, 16, 14)
        card, hf = _card(source, "dino_vit_b16", "dino_pth"), _hf_vit(sd, 768, 12, 12, 16, 224)
    elif source == "dinov2_vit_s14":
        sd = official_vit_state(rng, 384, 12, 14, 37, layer_scale=True, mask_token=True)
        config = transformers.Dinov2Config(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
            image_size=518, patch_size=14, layer_norm_eps=1e-6, layerscale_value=1.0,
            attn_implementation="eager")
        arrays = _hf_embeddings(sd, "embeddings.")
        arrays.update(_hf_blocks(sd, 12, "encoder.layer.", ("norm1", "norm2", True)))
        arrays.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
        hf = _load_hf(transformers.Dinov2Model(config), arrays)
        hf.embeddings.interpolate_pos_encoding = types.MethodType(official_resize,
                                                                  hf.embeddings)
        card = _card(source, "dinov2_vit_s14", "dinov2_pth")
    else:
        sd = official_mae_state(rng, 768, 12, 16, 14, decoder=(512, 1))
        hf = _hf_mae(sd, 768, 12, 12, 16, 224, (512, 1, 16)).vit
        hf.embeddings.config.mask_ratio = 0.0
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}
        card = _card(source, "mae_vit_base16", "mae_pth")
    model, _, _ = convert_checkpoint(_save(tmp_path / "full.pth", {"model": sd}
                                           if source.startswith("mae") else sd), card)
    x = _images(rng, 224, 224)
    kwargs = {"noise": torch.arange(196, dtype=torch.float32).repeat(2, 1)} \
        if source.startswith("mae") else {}
    if source == "dino_vit_b16":
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        ref = hf(pixel_values=_torch_nchw(x), **kwargs).last_hidden_state.numpy()
    out = run_inference(model, x)
    np.testing.assert_allclose(to_np(out["cls"]), ref[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(to_np(out["patch_tokens"]), ref[:, 1:], atol=1e-4, rtol=0)


@pytest.mark.slow
@_ONE_BACKEND
def test_full_size_tinyvit_5m_equals_the_numpy_reference(tmp_path):
    from test_tinyvit import numpy_tinyvit, official_classifier_state

    from poa_keras.backbones.tinyvit import CONFIGS

    _, sd = official_classifier_state("tinyvit_5m", 1000, head_scale=0.05)
    rng = np.random.default_rng(3)
    checkpoint = _save(tmp_path / "tiny_vit_5m_1k.pth", {"model": sd})
    model, _, _ = convert_checkpoint(checkpoint, _card("tinyvit_5m_1k", "tinyvit_5m",
                                                       "tinyvit_pth", class_name="TinyViT"))
    x = _images(rng, 96, 96, batch=1)
    ref = numpy_tinyvit(sd, CONFIGS["tinyvit_5m"], x)
    want = ref["pooled"] @ sd["head.weight"].T + sd["head.bias"]
    np.testing.assert_allclose(to_np(run_inference(model, x)), want, atol=1e-4, rtol=1e-4)

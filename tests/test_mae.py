"""MAE and MAE-Lite's attention distillation (REFERENCE.md §3): masking, the fixed sin-cos
position embedding, the visible-token encoder, the decoder and the loss against Hugging Face
transformers' ViTMAEForPreTraining (an independent implementation, run in PyTorch on the CPU
whatever the Keras backend), the distillation loss and head mapping against numpy, the trainer's
steps (the teacher gets no gradient), the recipe runner with a teacher recipe, bad inputs."""
import os

import keras
import numpy as np
import pytest
from conftest import pretrain_killed_at_step, to_np

from poa_keras import ElasticResNet, ElasticViT
from poa_keras.elastic.position import sincos_position_embedding
from poa_keras.data.masking import num_visible_patches, random_masking_noise
from poa_keras.heads.mae import AttentionHeadMapping, MAEDecoder
from poa_keras.losses.mae import attention_distillation_loss, mae_loss, mae_masking, patchify
from poa_keras.methods.checkpoint import CheckpointManager
from poa_keras.methods.mae import MAE

BACKEND = keras.backend.backend()
ENCODER = dict(image_size=32, patch_size=8, embed_dim=64, depth=2, head_dim=16,
               pos_embed="sincos")
DECODER = dict(dim=32, depth=1, num_heads=2)
B, N = 3, 16


def images(seed=0, batch=B, size=32):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype("float32")


def mae_trainer(encoder=None, teacher=None, **recipe):
    encoder = encoder or ElasticViT(**ENCODER, name="encoder")
    recipe = dict(dict(epochs=1, steps_per_epoch=4, batch_size=B, warmup_epochs=0), **recipe)
    return MAE(encoder, dict(DECODER), recipe=recipe, teacher=teacher)


# ------------------------------------------------------------------------------------ masking

def test_masking_keeps_int_n_times_one_minus_r_distinct_tokens_and_restores_the_order():
    assert num_visible_patches(196, 0.75) == 49 and num_visible_patches(16, 0.75) == 4
    assert num_visible_patches(10, 0.75) == 2        # int(2.5)
    noise = random_masking_noise(5, 16, rng=7)
    again = random_masking_noise(5, 16, rng=7)
    np.testing.assert_array_equal(noise, again)      # seeded: a host draw, backend-free
    assert all(sorted(row) == list(range(16)) for row in noise)   # ranks: no ties
    ids_keep, mask, ids_restore = (to_np(t) for t in mae_masking(noise, 4))
    expected = np.argsort(noise, axis=1, kind="stable")
    np.testing.assert_array_equal(ids_keep, expected[:, :4])      # the 4 lowest noise values
    for row in range(5):
        assert len(set(ids_keep[row])) == 4
        assert mask[row].sum() == 12 and not mask[row][ids_keep[row].astype(int)].any()
        # ids_restore puts the shuffled sequence back in the grid's order
        shuffled = expected[row]
        np.testing.assert_array_equal(shuffled[ids_restore[row].astype(int)], np.arange(16))
    assert len({tuple(r) for r in ids_keep}) > 1      # every image its own mask


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "0.75", True])
def test_bad_mask_ratios_name_the_valid_range(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \(0, 1\)"):
        num_visible_patches(16, ratio)


def test_a_ratio_leaving_no_visible_patch_is_refused():
    with pytest.raises(ValueError, match="leaves no visible patch of 16"):
        num_visible_patches(16, 0.95)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        mae_trainer(mask_ratio=0.97)


# ------------------------------------------------------------------ the encoder's new options

def test_sincos_table_is_maes_and_the_encoder_has_no_position_weight():
    # MAE's rule written out here: first half the column's sin/cos, second half the row's
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.divmod(np.arange(2 * 3), 3)      # a 2 x 3 grid, row-major
    expected = np.concatenate([one_d(8, cols), one_d(8, rows)], axis=1)
    table = sincos_position_embedding(2, 3, 16)
    assert table.shape == (7, 16) and not table[0].any()
    np.testing.assert_allclose(table[1:], expected, atol=1e-6)
    model = ElasticViT(**ENCODER)
    assert not any("pos_embed" in w.path for w in model.weights)
    assert model.get_config()["pos_embed"] == "sincos"
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        ElasticViT(**dict(ENCODER, pos_embed="rope"))


def test_mae_vit_tiny_has_the_papers_parameter_count():
    encoder = ElasticViT.unbuilt(config_name="mae_vit_tiny16")
    # 5,524,416 with MAE's fixed 197 x 192 table, which is no weight here
    assert encoder.subnet_params() == 5_524_416 - 197 * 192
    decoder = MAEDecoder(192, 16, dim=96, depth=1, num_heads=3)
    decoder.build()
    trainable = sum(int(np.prod(w.shape)) for w in decoder.trainable_weights)
    assert trainable == 224_064 - 197 * 96            # MAE-Lite's decoder without its table


def test_visible_ids_encode_only_those_patches():
    model = ElasticViT(**dict(ENCODER, depth=1))
    x = images()
    ids = np.array([[3, 1, 7, 0], [15, 2, 9, 4], [0, 1, 2, 3]])
    out = model(x, visible_ids=ids)
    assert tuple(out["patch_tokens"].shape) == (B, 4, 64)
    # (the values are checked against Hugging Face's MAE encoder below)
    # a patch outside the visible set changes nothing
    other = x.copy()
    other[1, 24:32, 0:8] += 5.0          # patch 12 of image 1: not visible
    np.testing.assert_allclose(to_np(model(other, visible_ids=ids)["patch_tokens"]),
                               to_np(out["patch_tokens"]), atol=1e-5)
    logits = model(x, visible_ids=ids, return_attention=[0])["attention_logits"][0]
    assert tuple(logits.shape) == (B, 4, 5, 5)
    with pytest.raises(ValueError, match="visible_ids must be"):
        model(x, visible_ids=np.zeros((B, 17), "int32"))
    with pytest.raises(ValueError, match="not both"):
        model(x, visible_ids=ids, masks=np.zeros((B, 16), bool))


def test_sincos_elastic_subnet_equals_its_extraction_and_survives_a_preset(tmp_path):
    model = ElasticViT(**dict(ENCODER, min_width=32, min_depth=1))
    spec = model.subnets()[0]
    sub = model.extract(spec)
    x = images()
    np.testing.assert_allclose(to_np(model(x, subnet=spec)["cls"]), to_np(sub(x)["cls"]),
                               atol=1e-5)
    sub.save_to_preset(tmp_path / "p")
    again = ElasticViT.from_preset(str(tmp_path / "p"))
    assert again.pos_embed_kind == "sincos"
    np.testing.assert_allclose(to_np(again(x)["cls"]), to_np(sub(x)["cls"]), atol=1e-6)
    # another input size regenerates the table for its grid
    assert tuple(again(images(size=48))["patch_tokens"].shape) == (B, 36, 32)


def test_attention_logits_on_request_and_refusals():
    model = ElasticViT(**ENCODER)
    x = images()
    plain = model(x)
    assert "attention_logits" not in plain
    out = model(x, return_attention="all", return_representations=True)
    np.testing.assert_allclose(to_np(out["cls"]), to_np(plain["cls"]), atol=1e-5)
    assert [tuple(a.shape) for a in out["attention_logits"]] == [(B, 4, 17, 17)] * 2
    assert list(out["representations"]) == ["block_0", "block_1", "norm"]
    last = model.attention_logits(x, blocks=-1)
    np.testing.assert_allclose(to_np(last[0]), to_np(out["attention_logits"][1]), atol=1e-5)
    with pytest.raises(ValueError, match="is not one of the 2 blocks"):
        model(x, return_attention=[2])
    resnet = ElasticResNet.from_config_name("resnet_elastic_test")
    with pytest.raises(ValueError, match="no global attention maps"):
        resnet.attention_logits(np.zeros((1, 32, 32, 3), "float32"))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(images(size=36))


# --------------------------------------------------------------- against Hugging Face's MAE

def _hf_pair(seed=0):
    """A small ViTMAEForPreTraining and our encoder + decoder with the same weights."""
    transformers = pytest.importorskip(
        "transformers", reason="the test extra installs transformers (the MAE reference)")
    import torch

    config = transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        image_size=32, patch_size=8, num_channels=3, qkv_bias=True, hidden_act="gelu",
        layer_norm_eps=1e-6, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=128, mask_ratio=0.75,
        norm_pix_loss=True, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():   # non-trivial LayerNorm gains / offsets and tokens
        for name, p in hf.named_parameters():
            if "layernorm" in name or "norm" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
        # HF builds MAE's fixed tables at construction, but its post-init may zero them (a
        # checkpoint fills them when loaded): set them with HF's own builder, rotated to the
        # released layout as HF's initialize_weights does
        from transformers.models.vit_mae import modeling_vit_mae as hf_mae

        for param in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
            table = hf_mae.build_2d_sinusoidal_position_embedding(4, 4, param.shape[-1],
                                                                  cls_token=True)
            half = table.shape[-1] // 2
            param.copy_(torch.cat([table[..., half:], table[..., :half]], dim=-1)[None])
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    trainer = mae_trainer()
    enc, dec = trainer.backbone, trainer.decoder

    def dense(layer, prefix):
        layer.dense.kernel.assign(sd[f"{prefix}.weight"].T)
        layer.dense.bias.assign(sd[f"{prefix}.bias"])

    def norm(layer, prefix):
        layer.norm.gamma.assign(sd[f"{prefix}.weight"])
        layer.norm.beta.assign(sd[f"{prefix}.bias"])

    def block(ours, prefix):
        norm(ours.norm1, f"{prefix}.layernorm_before")
        norm(ours.norm2, f"{prefix}.layernorm_after")
        q, k, v = (sd[f"{prefix}.attention.{n}_proj.weight"] for n in "qkv")
        ours.attn.qkv.dense.kernel.assign(np.concatenate([q.T, k.T, v.T], axis=1))
        ours.attn.qkv.dense.bias.assign(np.concatenate(
            [sd[f"{prefix}.attention.{n}_proj.bias"] for n in "qkv"]))
        dense(ours.attn.proj, f"{prefix}.attention.o_proj")
        dense(ours.mlp.fc1, f"{prefix}.mlp.fc1")
        dense(ours.mlp.fc2, f"{prefix}.mlp.fc2")

    enc.patch_embed.proj.kernel.assign(
        sd["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
    enc.patch_embed.proj.bias.assign(sd["vit.embeddings.patch_embeddings.projection.bias"])
    enc.cls_token.assign(sd["vit.embeddings.cls_token"])
    for i in range(2):
        block(enc.blocks[i], f"vit.layers.{i}")
    norm(enc.norm, "vit.layernorm")
    dense(dec.decoder_embed, "decoder.decoder_embed")
    dec.mask_token.assign(sd["decoder.mask_token"])
    block(dec.blocks[0], "decoder.decoder_layers.0")
    norm(dec.decoder_norm, "decoder.decoder_norm")
    dense(dec.decoder_pred, "decoder.decoder_pred")
    return hf, sd, trainer


def test_mae_loss_mask_and_reconstruction_equal_hugging_faces_vitmae():
    import torch

    hf, sd, trainer = _hf_pair()
    # the fixed tables are HF's own (its get_2d_sincos_pos_embed): an independent check
    np.testing.assert_allclose(sincos_position_embedding(4, 4, 64),
                               sd["vit.embeddings.position_embeddings"][0], atol=1e-6)
    np.testing.assert_allclose(sincos_position_embedding(4, 4, 32),
                               sd["decoder.decoder_pos_embed"][0], atol=1e-6)
    x = images(seed=3)
    noise = random_masking_noise(B, N, rng=11)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 noise=torch.from_numpy(noise), output_attentions=True)
    loss, logs, pred, mask = trainer.forward(x, noise, training=False)
    np.testing.assert_array_equal(to_np(mask), ref.mask.numpy())
    np.testing.assert_allclose(to_np(pred), ref.logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(to_np(loss)), float(ref.loss), rtol=1e-5)
    assert "distill_loss" not in logs
    # the encoder's pre-softmax logits: their softmax is HF's attention of the visible tokens
    ids_keep = to_np(mae_masking(noise, 4)[0]).astype("int32")
    logits = trainer.backbone(x, visible_ids=ids_keep,
                              return_attention="all")["attention_logits"]
    for ours, theirs in zip(logits, ref.attentions):
        probs = np.exp(to_np(ours) - to_np(ours).max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(probs, theirs.numpy(), atol=1e-5)


def test_mae_loss_against_numpy_without_pixel_normalisation():
    x = images(seed=5)
    pred = np.random.default_rng(1).normal(size=(B, N, 192)).astype("float32")
    mask = np.zeros((B, N), "float32")
    mask[:, 5:] = 1
    patches = x.reshape(B, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, N, 192)
    np.testing.assert_array_equal(to_np(patchify(x, 8)), patches)
    raw = ((pred - patches) ** 2).mean(-1)
    np.testing.assert_allclose(float(to_np(mae_loss(pred, x, mask, 8, norm_pix_loss=False))),
                               (raw * mask).sum() / mask.sum(), rtol=1e-5)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
        patches.var(-1, ddof=1, keepdims=True) + 1e-6)     # the unbiased variance
    normed = ((pred - target) ** 2).mean(-1)
    np.testing.assert_allclose(float(to_np(mae_loss(pred, x, mask, 8))),
                               (normed * mask).sum() / mask.sum(), rtol=1e-5)


def test_attention_distillation_loss_and_head_mapping_against_numpy():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(2, 4, 5, 5)).astype("float32")
    teacher = rng.normal(size=(2, 6, 5, 5)).astype("float32")
    mapping = AttentionHeadMapping(4, 6)
    mapping.build()
    kernel = rng.normal(size=(6, 4)).astype("float32")
    mapping.kernel.assign(kernel)
    mapped = np.einsum("ts,bsij->btij", kernel, student)
    np.testing.assert_allclose(to_np(mapping(student)), mapped, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(to_np(attention_distillation_loss(mapping(student),
                                                                       teacher))),
                               ((mapped - teacher) ** 2).mean(), rtol=1e-5)
    # PyTorch Conv2d's default init: uniform in +-1/sqrt(student heads)
    fresh = AttentionHeadMapping(4, 6)
    fresh.build()
    assert np.abs(to_np(fresh.kernel)).max() <= 0.5
    with pytest.raises(ValueError, match="differ"):
        attention_distillation_loss(student, teacher)
    with pytest.raises(ValueError, match="maps 4 student heads"):
        mapping(teacher)


# ------------------------------------------------------------------------------- the steps

def test_mae_and_distillation_steps_train_the_student_only():
    # one block each: every op of the step is there, at half the compile time of two
    teacher = ElasticViT(**dict(ENCODER, embed_dim=96, depth=1), name="teacher")   # 6 heads
    trainer = mae_trainer(ElasticViT(**dict(ENCODER, depth=1), name="encoder"),
                          teacher=teacher, distill_weight=0.5)
    assert trainer.head_mapping.kernel.shape == (6, 4)
    trainable = {id(v) for v in trainer.trainable_variables}
    assert not any(id(v) in trainable for v in teacher.weights)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3, beta_2=0.95))
    frozen = [to_np(w) for w in teacher.weights]
    before = {v.path: to_np(v) for v in trainer.trainable_variables}
    x = images(seed=1)
    logs = trainer.train_on_batch(x, return_dict=True)
    for a, w in zip(frozen, teacher.weights):
        np.testing.assert_array_equal(a, to_np(w))   # no gradient, no update
    changed = [p for p, v in before.items()
               if not np.array_equal(v, to_np(next(t for t in trainer.trainable_variables
                                                   if t.path == p)))]
    assert any("head_mapping" in p for p in changed) and any("encoder" in p for p in changed)
    assert any("decoder" in p for p in changed)
    assert logs["distill_loss"] > 0
    np.testing.assert_allclose(logs["loss"], logs["mae_loss"] + 0.5 * logs["distill_loss"],
                               rtol=1e-5)
    # without a teacher: the plain MAE step
    plain = mae_trainer(ElasticViT(**dict(ENCODER, depth=1), name="encoder"))
    plain.compile(optimizer=keras.optimizers.AdamW(1e-3))
    logs = plain.train_on_batch(x, return_dict=True)
    assert "distill_loss" not in logs and np.isfinite(logs["loss"])


def test_distillation_teacher_must_share_the_patch_grid_and_have_attention():
    other = ElasticViT(**dict(ENCODER, patch_size=4))
    with pytest.raises(ValueError, match="patch size 4, the student 8"):
        mae_trainer(teacher=other)
    with pytest.raises(ValueError, match="must be a ViT"):
        mae_trainer(teacher=ElasticResNet.from_config_name("resnet_elastic_test"))
    with pytest.raises(ValueError, match="distill_blocks \\[5\\]"):
        mae_trainer(teacher=ElasticViT(**ENCODER), distill_blocks=[5])
    with pytest.raises(ValueError, match="MAE trains a ViT encoder"):
        MAE(ElasticResNet.from_config_name("resnet_elastic_test"),
            recipe=dict(epochs=1, steps_per_epoch=1, batch_size=2))


# ------------------------------------------------------------------------- the recipe runner

TINY = dict(
    method="mae",
    backbone=dict(config="vit_mae_demo", depth=1, embed_dim=32),
    head=dict(dim=16, depth=1, num_heads=1),
    data=dict(source="shapes", num_images=16, num_val=4, image_size=32, seed=0,
              steps_per_epoch=2, global_size=32),
    train=dict(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0),
    checkpoint=dict(every_epochs=1, keep=3),
    seed=0,
)


def test_recipe_validation_of_mae():
    from poa_keras.pretrain import load_recipe, validate_recipe

    for name in ("demo_mae", "demo_mae_teacher", "demo_mae_distill", "mae_lite_tiny_in1k"):
        validate_recipe(load_recipe(name))
    paper = load_recipe("mae_lite_tiny_in1k")
    assert paper["train"]["batch_size"] == 4096 and paper["train"]["warmup_epochs"] == 40
    with pytest.raises(ValueError, match="data.num_local=2"):
        validate_recipe(dict(TINY, data=dict(TINY["data"], num_local=2)))
    with pytest.raises(ValueError, match="exactly one of"):
        validate_recipe(dict(TINY, distill=dict()))
    with pytest.raises(ValueError, match="belongs to method 'mae'"):
        validate_recipe(dict(load_recipe("demo"), distill=dict(teacher="x")))
    with pytest.raises(ValueError, match="trains a ViT encoder"):
        validate_recipe(dict(TINY, backbone=dict(config="resnet_bn_test")))
    with pytest.raises(ValueError, match="mask_ratio"):
        validate_recipe(dict(TINY, train=dict(TINY["train"], mask_ratio=1.0)))


@pytest.mark.skipif(BACKEND != "torch", reason="the runner and resume logic are "
                    "backend-independent (the steps are tested on every backend above); runs "
                    "in subprocesses cost compilations on the compiled backends")
def test_distill_recipe_trains_its_teacher_then_the_student_and_resumes_after_sigkill(tmp_path):
    from poa_keras import Backbone
    from poa_keras.pretrain import pretrain

    teacher_recipe = tmp_path / "teacher_recipe.py"
    teacher_recipe.write_text(f"RECIPE = {dict(TINY, train=dict(TINY['train'], epochs=1))!r}\n")
    recipe = dict(TINY, distill=dict(teacher_recipe=str(teacher_recipe)))
    straight = pretrain(recipe, tmp_path / "straight", verbose=0)
    teacher_dir = tmp_path / "straight" / "distill_teacher" / "teacher"
    assert teacher_dir.is_dir() and straight.trainer.teacher is not None
    assert "distill_loss" in straight.history[-1]
    saved = Backbone.from_preset(str(tmp_path / "straight" / "teacher"))
    for a, b in zip(saved.weights, straight.trainer.backbone.weights):
        np.testing.assert_array_equal(to_np(a), to_np(b))

    run = tmp_path / "killed"
    pretrain_killed_at_step(recipe, run, step=3)   # mid-epoch 2, after checkpoint 1
    manager = CheckpointManager(run / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001"]
    resumed = pretrain(recipe, run, verbose=0)
    assert resumed.resumed_from.endswith("epoch_0001")
    for a, b in zip(straight.trainer.backbone.weights, resumed.trainer.backbone.weights):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-6)
    assert straight.history[-1]["loss"] == pytest.approx(resumed.history[-1]["loss"], rel=1e-5)

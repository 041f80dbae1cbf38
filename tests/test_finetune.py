"""Fine-tuning recipes and their runner (poa_keras/finetune.py), the ImageClassifier's fc_norm
pooling and ``poa-keras finetune --recipe``, on a tiny ViT (16 x 16 images, width 32, 2 blocks)
and the embedded shapes: runs of 2 epochs of 2 steps of 8 images."""
import json
import math
import os

import keras
import numpy as np
import pytest

from conftest import checkpoint_arrays as arrays
from conftest import checkpoint_state as state
from conftest import finetune_killed_at_step, to_np
from poa_keras.classifier import ImageClassifier
from poa_keras.finetune import (build_classifier, epoch_dataset, finetune,
                                learning_rate_schedule, load_finetune_recipe, recipe_names)
from poa_keras.methods.checkpoint import CheckpointManager
from poa_keras.pretrain import load_recipe
from poa_keras.pretrain import recipe_names as pretraining_recipe_names

BACKEND = keras.backend.backend()
TINY_VIT = dict(image_size=16, embed_dim=32, depth=2, head_dim=16, min_width=32, min_depth=1,
                named_subnets={})
TINY = dict(
    model=dict(config="vit_elastic_test", config_args=TINY_VIT),
    classifier=dict(pooling="avg_norm"),
    data=dict(source="shapes", num_images=32, num_val=16, image_size=16, steps_per_epoch=2),
    # Keras' colour jitter on two lanes, then MixUp or CutMix per batch: stateful Keras layers
    # in the pipeline. RandAugment (the same mechanism) costs seconds to trace per lane and
    # epoch: test_randaugment_... checks it alone.
    augment=dict(randaugment_ops=0, lanes=2, color_jitter=0.3, mixup=0.2, cutmix=1.0),
    train=dict(epochs=2, batch_size=8, warmup_epochs=0.5, layer_decay=0.75),
    checkpoint=dict(keep=3),
    seed=0,
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "straight"
    return out, finetune(TINY, out, verbose=0)


# ------------------------------------------------------------------------------------ recipes

def test_shipped_recipes_load_and_the_two_kinds_stay_apart(tmp_path):
    assert {"demo_finetune", "finetune_mae_tiny_in1k"} <= set(recipe_names())
    assert not set(recipe_names()) & set(pretraining_recipe_names())
    assert "demo" in pretraining_recipe_names()
    for name in recipe_names():
        load_finetune_recipe(name)
    with pytest.raises(ValueError, match="demo_finetune' is a fine-tuning recipe .*poa-keras "
                                         "finetune"):
        load_recipe("demo_finetune")
    with pytest.raises(ValueError, match="'demo' is a pretraining recipe .*poa-keras pretrain"):
        load_finetune_recipe("demo")
    fine, pre = tmp_path / "fine.py", tmp_path / "pre.py"
    fine.write_text(f"FINETUNE_RECIPE = {TINY!r}\n")
    pre.write_text(f"RECIPE = {load_recipe('demo')!r}\n")
    with pytest.raises(ValueError, match="is a fine-tuning recipe .*defines FINETUNE_RECIPE"):
        load_recipe(str(fine))
    with pytest.raises(ValueError, match="is a pretraining recipe .*defines RECIPE"):
        load_finetune_recipe(str(pre))
    with pytest.raises(ValueError, match="fine-tuning recipe"):
        load_recipe(TINY)
    with pytest.raises(ValueError, match="pretraining recipe"):
        load_finetune_recipe(load_recipe("demo"))
    assert load_finetune_recipe(str(fine)) == TINY


def test_the_mae_lite_recipe_carries_the_reference_settings():
    recipe = load_finetune_recipe("finetune_mae_tiny_in1k")
    train, augment = recipe["train"], recipe["augment"]
    assert (train["epochs"], train["batch_size"], train["warmup_epochs"]) == (300, 1024, 5)
    assert (train["lr"], train["lr_scaling"], train["reference_batch"]) == (1e-3, "linear", 256)
    assert (train["min_lr"], train["weight_decay"], train["layer_decay"]) == (1e-6, 0.05, 0.85)
    assert (train["label_smoothing"], train["clip_grad"]) == (0.0, None)
    assert (recipe["optimizer"]["beta_1"], recipe["optimizer"]["beta_2"]) == (0.9, 0.999)
    assert recipe["classifier"]["pooling"] == "avg_norm"
    assert (augment["mixup"], augment["cutmix"], augment["color_jitter"]) == (0.2, 0.0, 0.3)
    assert (augment["interpolation"], augment["randaugment_ops"]) == ("bicubic", 2)
    assert tuple(augment["crop_scale"]) == (0.08, 1.0)


@pytest.mark.parametrize("overrides, message", [
    (["trian.lr=1"], r"unknown recipe section 'trian' \(did you mean train\?\)"),
    (["train.epoch=3"], r"train.epoch \(did you mean train.epochs\?\).*valid train keys"),
    (["train.lr=-1"], r"train.lr must be a number > 0, got -1"),
    (["train.warmup_epochs=2"], r"warmup_epochs=2 leaves no epoch for the cosine"),
    (["train.layer_decay=1.5"], r"train.layer_decay must be a number in \(0, 1\]"),
    (["model.preset='x'"], r"exactly one of 'preset' .* and 'config'"),
    (["model.config_args={'embed_dm': 48}"], r"model.config_args.embed_dm \(did you mean "
                                             r"model.config_args.embed_dim\?\)"),
    (["model.preprocessing={'crop_pct': 2}"], r"crop_pct must be a number in \(0, 1\]"),
    (["classifier.pooling='mean'"], r"classifier.pooling must be one of \['cls', 'avg', "
                                    r"'avg_norm'\], got 'mean'"),
    (["augment.crop_scale=(0, 1)"], r"augment.crop_scale must be a pair"),
    (["augment.interpolation='area'"], r"must be one of \['bicubic', 'bilinear'\]"),
    (["augment.color_jitter=(0.1, 0.2)"], r"augment.color_jitter must be a strength"),
    (["data.source='folder'"], r"data.source=\"folder\" needs data.path"),
    (["data.sorce='tfds'"], r"data.sorce \(did you mean data.source\?\)"),
    (["optimizer.name='sgd'"], r"optimizer.name must be one of \['adamw'\]"),
])
def test_recipe_errors_name_the_key_the_value_and_the_valid_ones(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_finetune_recipe(TINY, overrides)


def test_a_missing_model_preset_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no runs/demo/teacher here
    with pytest.raises(FileNotFoundError, match=r"model.preset='runs/demo/teacher'.*"
                                                r"--override=model.preset=DIR"):
        finetune("demo_finetune", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------- classifier and optimizer

def test_fc_norm_pooling_is_the_mean_patch_token_through_a_layer_norm():
    from poa_keras.backbones import from_config_name

    keras.utils.set_random_seed(0)
    backbone = from_config_name("vit_elastic_test", layer_scale_init=0.5, **TINY_VIT)
    clf = ImageClassifier(backbone, 5, pooling="avg_norm")
    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(1, 0.3, 32), rng.normal(0, 0.3, 32)
    clf.fc_norm.gamma.assign(gamma.astype("float32"))
    clf.fc_norm.beta.assign(beta.astype("float32"))
    clf.head.kernel.assign(rng.normal(0, 0.3, (32, 5)).astype("float32"))
    images = rng.uniform(-1, 1, (3, 16, 16, 3)).astype("float32")
    tokens = to_np(backbone(images)["patch_tokens"])            # (3, 4, 32)
    pooled = tokens.mean(axis=1)
    normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True)
                                                                 + 1e-6)
    expected = (normed * gamma + beta) @ to_np(clf.head.kernel) + to_np(clf.head.bias)
    np.testing.assert_allclose(to_np(clf(images)), expected, rtol=1e-4, atol=1e-5)


def test_the_learning_rate_warms_up_from_zero_then_follows_a_cosine_to_min_lr():
    steps = 4
    recipe = dict(TINY, train=dict(epochs=4, batch_size=8, lr=2e-3, warmup_epochs=1.5,
                                   min_lr=1e-5))
    schedule = learning_rate_schedule(recipe, steps)
    peak, low, total, warmup = 2e-3 * 8 / 256, 1e-5, 16, 6   # lr * batch / 256; 1.5 x 4 steps

    def expected(s):
        if s < warmup:
            return peak * s / warmup
        t = min(s, total) - warmup
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * t / (total - warmup)))

    got = [float(to_np(schedule(s))) for s in range(total + 3)]
    np.testing.assert_allclose(got, [expected(s) for s in range(total + 3)], rtol=1e-5,
                               atol=1e-12)
    assert got[0] == 0.0 and abs(got[warmup] - peak) < 1e-9 and abs(got[-1] - low) < 1e-9
    flat = learning_rate_schedule(dict(recipe, train=dict(recipe["train"], warmup_epochs=0)),
                                  steps)
    assert abs(float(to_np(flat(0))) - peak) < 1e-9


def test_weight_decay_skips_vectors_and_tokens_and_layer_decay_scales_the_update():
    """One AdamW step with zero gradients is the decoupled weight decay alone:
    w <- w - lr * m * wd * w, m the variable's layer-decay multiplier (depth 2, decay 0.5:
    embeddings 0.5^3, block i 0.5^(2 - i), the rest 1), nothing for biases, norms,
    LayerScale, the cls token and the position embedding."""
    recipe = dict(TINY, train=dict(epochs=2, batch_size=256, lr=0.1, warmup_epochs=0,
                                   weight_decay=0.5, layer_decay=0.5))
    clf = build_classifier(recipe, 10, steps=2)
    variables = clf.trainable_variables
    before = {v.path: to_np(v) for v in variables}
    clf.optimizer.apply([keras.ops.zeros(v.shape, v.dtype) for v in variables], variables)
    decayed = {"patch_embed": 0.125, "blocks_0": 0.25, "blocks_1": 0.5, "head": 1.0}
    for v in variables:
        ratio = to_np(v) / np.where(before[v.path] == 0, 1, before[v.path])
        plain = len(v.shape) <= 1 or v.name in ("cls_token", "pos_embed")
        if plain:
            np.testing.assert_allclose(to_np(v), before[v.path], err_msg=v.path)
            continue
        m = next(m for part, m in decayed.items() if f"/{part}/" in v.path)
        np.testing.assert_allclose(ratio, 1 - 0.1 * m * 0.5, rtol=1e-5, err_msg=v.path)


# ------------------------------------------------------------------------------------- data

def test_mixed_labels_sum_to_one_and_the_data_is_a_function_of_seed_and_epoch():
    from poa_keras.data import load_shapes

    (x, y), _, _ = load_shapes(32, 10, image_size=16, seed=0)
    recipe = dict(TINY, augment=dict(randaugment_ops=0, mixup=0.4, cutmix=1.0,
                                     color_jitter=0.0))

    def batches(epoch):
        ds = epoch_dataset(recipe, (x, y.astype("int32")), epoch, 3, 10, 16,
                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return list(ds.as_numpy_iterator())

    first = batches(0)
    assert len(first) == 3
    labels = np.concatenate([b[1] for b in first])
    assert labels.shape == (24, 10) and labels.min() >= 0
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert (labels.max(axis=1) < 0.999).any()                      # mixed rows
    assert ((labels > 1e-6).sum(axis=1) <= 2).all()                # two images per row at most
    images = first[0][0]
    assert images.shape == (8, 16, 16, 3) and np.isfinite(images).all()
    again = batches(0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(batches(1)[0][0], first[0][0])


def test_held_out_images_are_preprocessed_by_the_models_record():
    """timm's evaluation (resize to size / 0.875, bicubic, centre crop) of images at the
    model's size and of other sizes: ``ImagePreprocessing.numpy`` up to the rounding to whole
    pixel values (PIL's uint8), at most half a level / std."""
    import tensorflow as tf

    from poa_keras.finetune import eval_dataset
    from poa_keras.preprocessing import ImagePreprocessing

    prep = ImagePreprocessing(image_size=16, crop_pct=0.875, interpolation="bicubic")
    rng = np.random.default_rng(0)
    at_size = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x, y = next(eval_dataset((at_size, np.arange(3)), prep, 4, 8).as_numpy_iterator())
    bound = 0.5 / 255 / min(prep.std) + 1e-5
    np.testing.assert_allclose(x, prep.numpy(at_size), atol=bound)
    np.testing.assert_array_equal(y, np.eye(4)[:3])
    odd = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((23, 37), (40, 20))]
    ds = tf.data.Dataset.from_generator(lambda: ((image, 1) for image in odd), output_signature=(
        tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int32)))
    for (x, _), image in zip(eval_dataset(ds, prep, 4, 1, count=2).as_numpy_iterator(), odd):
        np.testing.assert_allclose(x[0], prep.numpy(image[None])[0], atol=bound)


@pytest.mark.skipif(BACKEND == "jax", reason="Keras' Equalization picks its code by the global "
                    "backend and under JAX traces a 256-bin loop into the tf.data graph (about "
                    "15x the nodes, 20 s more to build); the TensorFlow ops it runs are the "
                    "same on every backend")
def test_randaugment_runs_in_the_pipeline_as_a_function_of_the_seed():
    from poa_keras.data import load_shapes

    (x, y), _, _ = load_shapes(16, 10, image_size=16, seed=0)
    augment = dict(randaugment_ops=2, randaugment_factor=0.45, color_jitter=0.0, mixup=0.0)

    def images(**changes):
        recipe = dict(TINY, augment=dict(augment, **changes))
        ds = epoch_dataset(recipe, (x, y.astype("int32")), 0, 1, 10, 16, (0.5,) * 3,
                           (0.5,) * 3)
        return next(ds.as_numpy_iterator())[0]

    first = images()
    np.testing.assert_array_equal(first, images())            # the same seed, the same images
    plain = images(randaugment_ops=0)                          # the same crops and flips
    assert np.abs(first - plain).max() > 0.1


# -------------------------------------------------------------------------------------- runs

def test_a_run_writes_checkpoints_a_log_and_a_classifier_preset(straight):
    out, result = straight
    manager = CheckpointManager(out / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001", "epoch_0002"]
    final = state(manager.latest())
    assert (final["epoch"], final["step"], final["trainer"]) == (2, 4, "ImageClassifier")
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and "val_accuracy" in h for h in result.history)
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3   # header + 2 epochs
    report = json.loads((out / "result.json").read_text())
    assert report["top1"] == result.top1 and len(report["class_names"]) == 10
    assert result.top1 == result.history[-1]["val_accuracy"]
    # The preset is the fine-tuned classifier: backbone, fc_norm, head, preprocessing.
    loaded = ImageClassifier.from_preset(str(out / "classifier"))
    assert loaded.pooling == "avg_norm" and loaded.num_classes == 10
    np.testing.assert_array_equal(to_np(loaded.fc_norm.gamma),
                                  to_np(result.classifier.fc_norm.gamma))
    from poa_keras.data import load_shapes

    _, (images, _), _ = load_shapes(32, 16, image_size=16, seed=0)   # uint8 held-out images
    np.testing.assert_allclose(to_np(loaded.predict(images, verbose=0)),
                               to_np(result.classifier.predict(images, verbose=0)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="a second and third compiled run; the resume is backend-independent Python (CheckpointManager.restore and pretrain.fit_epochs, which test_pretrain resumes after SIGKILL on every backend), and the fine-tuning step and its checkpoints run on every backend in the test above")
def test_stopping_then_resuming_from_the_command_line_equals_the_uninterrupted_run(
        straight, tmp_path, cli):
    out, _ = straight
    run = tmp_path / "stopped"
    first = finetune(TINY, run, verbose=0, epochs=1)
    assert first.preset_dir is None and not (run / "classifier").exists()
    recipe = tmp_path / "tiny.py"
    recipe.write_text(f"FINETUNE_RECIPE = {TINY!r}\n")
    code, stdout, err = cli("finetune", f"--recipe={recipe}", f"--output={run}", "--verbose=0")
    assert code == 0, err
    assert "resumed from" in stdout and "held-out top-1" in stdout and "classifier preset" in stdout
    a, b = arrays(out / "checkpoints" / "epoch_0002"), arrays(run / "checkpoints" / "epoch_0002")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    code, _, err = cli("finetune", f"--recipe={recipe}", f"--output={run}",
                       "--override=train.lr=0.5")
    assert code == 1 and "another recipe" in err and "train.lr" in err


def test_the_command_refuses_the_other_kind_of_recipe_and_flag_form_settings(cli, tmp_path):
    code, _, err = cli("finetune", "--recipe=demo", f"--output={tmp_path / 'a'}")
    assert code == 1 and "pretraining recipe" in err and "poa-keras pretrain" in err
    code, _, err = cli("pretrain", "--recipe=demo_finetune", f"--output={tmp_path / 'b'}")
    assert code == 1 and "fine-tuning recipe" in err and "poa-keras finetune" in err
    code, _, err = cli("finetune", "--recipe=demo_finetune", "--lr=0.1",
                       f"--output={tmp_path / 'c'}")
    assert code == 1 and "--lr -> --override=train.lr=..." in err
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.skipif(BACKEND != "torch", reason="the subprocess costs a second interpreter; the "
                    "resume logic is backend-independent, and test_pretrain resumes a run "
                    "killed by SIGKILL through the same CheckpointManager on every backend")
def test_sigkill_then_resume_equals_the_uninterrupted_run(straight, tmp_path):
    out, _ = straight
    run = tmp_path / "killed"
    finetune_killed_at_step(TINY, run, step=3)   # mid-epoch 2, after checkpoint 1
    manager = CheckpointManager(run / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001"]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".epoch")]
    a, b = arrays(out / "checkpoints" / "epoch_0001"), arrays(manager.latest())
    for key in a:   # up to the checkpoint, the killed run is the uninterrupted one
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    resumed = finetune(TINY, run, verbose=0)
    assert resumed.resumed_from.endswith("epoch_0001")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a, b = arrays(out / "checkpoints" / "epoch_0002"), arrays(manager.latest())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)

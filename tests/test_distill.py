"""TinyViT's distillation trainer (poa_keras/methods/distill.py, losses/distill.py; REFERENCE.md
§4): the targets and the loss against numpy, a step on stored labels equals a step with the
online teacher whose targets go through the same top-K + float16 sparsification, the
hard-label arm, and bad input."""
import keras
import numpy as np
import pytest

from poa_keras import ImageClassifier
from poa_keras.backbones import from_config_name
from poa_keras.data import make_shapes
from poa_keras.data.softlabels import ReplayAugment, write_store
from poa_keras.losses.distill import dense_soft_targets, soft_target_cross_entropy, sparse_topk
from poa_keras.methods.distill import SoftLabelDistillation

N, SIZE, K, CLASSES, BATCH = 16, 32, 3, 6, 8
# the student of the step tests: any classifier; a small ResNet compiles in a fraction of
# TinyViT's time on JAX (TinyViT students train in the runner tests and docs/tinyvit.md)
STUDENT = "resnet_bn_test"
CONFIG = ReplayAugment(output_size=SIZE, scale=(0.4, 1.0), jitter=0.3)
RECIPE = dict(epochs=2, steps_per_epoch=2, batch_size=BATCH, lr=0.05, reference_batch=BATCH,
              warmup_epochs=0, weight_decay=0.05, clip_grad=5.0)


def classifier(config, seed, classes=CLASSES):
    keras.utils.set_random_seed(seed)
    return ImageClassifier(from_config_name(config), classes, pooling="avg")


def numpy_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_dense(ids, values, classes):
    out = np.empty(ids.shape[:-1] + (classes,), np.float64)
    for b in range(ids.shape[0]):
        out[b] = (1.0 - values[b].sum()) / (classes - ids.shape[-1])
        out[b, ids[b]] = values[b]
    return out


def test_targets_and_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 9)).astype(np.float32) * 3
    probs = np.exp(numpy_log_softmax(logits.astype(np.float64)))
    ids, values = sparse_topk(probs.astype(np.float32), 4)
    ids, values = keras.ops.convert_to_numpy(ids), keras.ops.convert_to_numpy(values)
    order = np.argsort(-probs, axis=-1)[:, :4]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(values, np.take_along_axis(probs, order, -1)
                                  .astype(np.float16).astype(np.float32))
    dense = keras.ops.convert_to_numpy(dense_soft_targets(ids, values, 9))
    np.testing.assert_allclose(dense, numpy_dense(ids, values.astype(np.float64), 9), atol=1e-7)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-6)
    student = rng.normal(size=(5, 9)).astype(np.float32)
    loss = float(keras.ops.convert_to_numpy(soft_target_cross_entropy(student, dense)))
    expected = -(dense * numpy_log_softmax(student.astype(np.float64))).sum(-1).mean()
    assert loss == pytest.approx(expected, rel=1e-5)
    nested = keras.ops.convert_to_numpy(dense_soft_targets(ids[None], values[None], 9))
    np.testing.assert_array_equal(nested, dense[None])                   # leading dims kept
    full = keras.ops.convert_to_numpy(dense_soft_targets([[2, 0, 1]], [[.5, .3, .2]], 3))
    np.testing.assert_allclose(full, [[.3, .2, .5]], atol=1e-7)          # K = C
    with pytest.raises(ValueError, match="same shape"):
        soft_target_cross_entropy(student, dense[:, :8])
    with pytest.raises(ValueError, match="K must be <= the number of classes"):
        dense_soft_targets(ids, values, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    images, labels = make_shapes(N, image_size=40, seed=1)[:2]
    teacher = classifier("resnet_bn_test", seed=3)
    store = write_store(teacher, images, tmp_path_factory.mktemp("distill") / "store",
                        epochs=1, topk=K, config=CONFIG, seed=5, batch_size=BATCH, verbose=0)
    student = classifier(STUDENT, seed=4)
    return images, labels, teacher, store, student


def trained_once(student, batch, **kwargs):
    model = student
    trainer = SoftLabelDistillation(model, recipe=RECIPE, **kwargs)
    trainer.compile(optimizer=keras.optimizers.AdamW())
    logs = trainer.train_on_batch(*batch, return_dict=True)
    return [keras.ops.convert_to_numpy(v) for v in model.weights], logs


def fresh_student(setup):
    student = classifier(STUDENT, seed=4)
    student.set_weights(setup[4].get_weights())
    return student


def test_stored_step_equals_online_step(setup):
    images, labels, teacher, store, _ = setup
    x, sparse = next(iter(store.dataset(0, BATCH)))
    sparse = {k: keras.ops.convert_to_numpy(v) for k, v in sparse.items()}
    x = x.numpy()
    start = [np.array(w) for w in fresh_student(setup).get_weights()]
    student = fresh_student(setup)
    z = keras.ops.convert_to_numpy(student(student.preprocessing.from_unit_range(x),
                                           training=True)).astype(np.float64)
    target = numpy_dense(sparse["ids"], sparse["values"].astype(np.float64), CLASSES)

    stored, logs_stored = trained_once(fresh_student(setup), (x, sparse))
    online_trainer = SoftLabelDistillation(fresh_student(setup), RECIPE, teacher=teacher, topk=K)
    online_trainer.compile(optimizer=keras.optimizers.AdamW())
    logs_online = online_trainer.train_on_batch(x, return_dict=True)
    online = [keras.ops.convert_to_numpy(v) for v in online_trainer.student.weights]

    # the loss is the soft cross-entropy of the stored records
    assert logs_stored["loss"] == pytest.approx(-(target * numpy_log_softmax(z)).sum(-1).mean(),
                                                rel=1e-4)
    assert logs_stored["loss"] == pytest.approx(logs_online["loss"], rel=1e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(stored, start))
    assert moved > 1e-3                                        # the step did something
    for a, b in zip(stored, online):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    # the online targets are the sparsified ones, not the teacher's full softmax
    sparse_target, _ = online_trainer.target(x, None)
    dense_trainer = SoftLabelDistillation(fresh_student(setup), RECIPE, teacher=teacher)
    full_target, _ = dense_trainer.target(x, None)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sparse_target), target, atol=1e-6)
    assert float(np.abs(keras.ops.convert_to_numpy(full_target) - target).max()) > 1e-3


def test_hard_label_arm(setup):
    images, labels, teacher, store, _ = setup
    x = images[:BATCH].astype(np.float32) / 255.0
    y = (labels[:BATCH] % CLASSES).astype(np.int32)
    student = fresh_student(setup)
    z = keras.ops.convert_to_numpy(student(student.preprocessing.from_unit_range(x),
                                           training=True)).astype(np.float64)
    expected = -numpy_log_softmax(z)[np.arange(BATCH), y].mean()
    _, logs = trained_once(student, (x, y), targets="labels")
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    assert logs["accuracy"] == pytest.approx(float((z.argmax(-1) == y).mean()))


def test_bad_input(setup):
    images, labels, teacher, store, student = setup
    with pytest.raises(ValueError, match="the teacher has 7 classes, the student 6"):
        SoftLabelDistillation(student, RECIPE, teacher=classifier("resnet_bn_test", 0, 7))
    with pytest.raises(ValueError, match=r"topk=9; valid: an int in \[1, 6\]"):
        SoftLabelDistillation(student, RECIPE, teacher=teacher, topk=9)
    with pytest.raises(ValueError, match="needs a teacher"):
        SoftLabelDistillation(student, RECIPE, targets="teacher")
    with pytest.raises(ValueError, match="valid: \\['stored', 'teacher', 'labels'\\]"):
        SoftLabelDistillation(student, RECIPE, targets="soft")
    with pytest.raises(ValueError, match="unknown recipe key 'lr_sched'"):
        SoftLabelDistillation(student, dict(RECIPE, lr_sched=1))
    with pytest.raises(ValueError, match="the store holds 6-class soft labels, the student has "
                                         "7 classes"):
        SoftLabelDistillation(classifier(STUDENT, 0, 7), RECIPE, store=store)
    with pytest.raises(ValueError, match="must map images to class logits"):   # a backbone
        SoftLabelDistillation(student, RECIPE, teacher=from_config_name("resnet_bn_test"))
    trainer = SoftLabelDistillation(fresh_student(setup), RECIPE)
    trainer.compile(optimizer=keras.optimizers.AdamW())
    x = images[:BATCH].astype(np.float32) / 255.0
    with pytest.raises(ValueError, match="needs batches \\(images, \\{'ids', 'values'\\}\\)"):
        trainer.train_on_batch(x, labels[:BATCH])


# ----------------------------------------------------------------------- the recipe runner

BACKEND = keras.backend.backend()
RUNNER_REASON = ("the runner (finetune's distill section, the store, the CLI) is backend-free "
                 "Python around SoftLabelDistillation, whose step the tests above run on every "
                 "backend; a compiled run per arm would cost CI minutes on JAX and TensorFlow")


def tiny_recipe(**distill):
    return dict(
        model=dict(config="tinyvit_test"),
        classifier=dict(pooling="cls"),
        data=dict(source="shapes", num_images=48, num_val=20, image_size=32),
        augment=dict(crop_scale=(0.4, 1.0), interpolation="bilinear", randaugment_ops=0,
                     color_jitter=0.3, mixup=0.0, cutmix=0.0),
        train=dict(epochs=2, batch_size=16, lr=1e-3, lr_scaling="none", warmup_epochs=0,
                   weight_decay=0.01, clip_grad=5.0, layer_decay=1.0),
        distill=dict(dict(targets="stored", topk=K, store_epochs=1), **distill),
        checkpoint=dict(keep=2),
        seed=0)


@pytest.fixture(scope="module")
def teacher_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    classifier("resnet_bn_test", seed=3, classes=10).save_to_preset(str(path))
    return str(path)


@pytest.mark.skipif(BACKEND != "torch", reason=RUNNER_REASON)
def test_recipe_writes_the_store_then_a_student_trains_without_the_teacher(
        tmp_path, teacher_preset, monkeypatch):
    from poa_keras import finetune as runner
    from poa_keras.data.softlabels import open_store

    first = runner.finetune(tiny_recipe(teacher=teacher_preset), tmp_path / "a", verbose=0)
    store_dir = tmp_path / "a" / "store"
    # 48 images x (4 + 4 K) bytes, one shard: epochs 0 and 1 replay it
    assert (store_dir / "epoch_0000.bin").stat().st_size == 48 * (4 + 4 * K)
    assert not (store_dir / "epoch_0001.bin").exists()
    assert first.top1 is not None and (tmp_path / "a" / "classifier").is_dir()
    assert len(first.history) == 2 and np.isfinite(first.history[-1]["loss"])

    # a second student on the finished store: the teacher is never loaded
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(runner, "load_teacher", no_teacher)
    monkeypatch.setattr(runner, "distill_teacher", no_teacher)
    second = runner.finetune(tiny_recipe(store=str(store_dir)), tmp_path / "b", verbose=0)
    assert second.history[-1]["loss"] == pytest.approx(first.history[-1]["loss"], rel=1e-5)

    # a store of another K, or read with another augmentation, is refused by name
    with pytest.raises(ValueError, match="topk: store has 3, expected 4"):
        runner.finetune(dict(tiny_recipe(store=str(store_dir)),
                             distill=dict(targets="stored", topk=4, store=str(store_dir),
                                          store_epochs=1)), tmp_path / "c", verbose=0)
    other = tiny_recipe(store=str(store_dir))
    other["augment"] = dict(other["augment"], flip_prob=0.0)
    with pytest.raises(ValueError, match="another augment"):
        runner.finetune(other, tmp_path / "d", verbose=0)
    monkeypatch.undo()
    import shutil

    renamed = str(tmp_path / "renamed_teacher")
    shutil.copytree(teacher_preset, renamed)
    with pytest.raises(ValueError, match="another teacher than asked for"):   # by name
        runner.finetune(tiny_recipe(store=str(store_dir), teacher=renamed), tmp_path / "f",
                        verbose=0)
    with pytest.raises(FileNotFoundError, match="holds no soft-label store"):
        runner.finetune(tiny_recipe(store=str(tmp_path / "none")), tmp_path / "e", verbose=0)
    assert open_store(store_dir, runner.labelled_data(tiny_recipe()).train[0]).epochs == 1


@pytest.mark.skipif(BACKEND != "torch", reason=RUNNER_REASON)
def test_a_stopped_distillation_run_resumes_as_the_straight_run(tmp_path, teacher_preset):
    from poa_keras.finetune import finetune

    recipe = tiny_recipe(teacher=teacher_preset)   # with the replayed mixup / cutmix
    recipe["augment"] = dict(recipe["augment"], mixup=0.8, cutmix=1.0)
    straight = finetune(recipe, tmp_path / "straight", verbose=0)
    # the second run reads the first's store; it stops after one epoch, then resumes
    store = str(tmp_path / "straight" / "store")
    resumed = dict(recipe, distill=dict(recipe["distill"], store=store))
    finetune(resumed, tmp_path / "resumed", verbose=0, epochs=1)
    assert not (tmp_path / "resumed" / "classifier").exists()
    result = finetune(resumed, tmp_path / "resumed", verbose=0)
    assert result.resumed_from is not None
    for a, b in zip(straight.history, result.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert result.top1 == pytest.approx(straight.top1)


@pytest.mark.skipif(BACKEND != "torch", reason=RUNNER_REASON)
def test_a_store_grows_a_resume_keeps_its_teacher_and_epochs_stay_whole(tmp_path,
                                                                         teacher_preset):
    from poa_keras.data.softlabels import write_store
    from poa_keras.finetune import finetune, labelled_data

    store = str(tmp_path / "store")
    finetune(tiny_recipe(teacher=teacher_preset, store=store), tmp_path / "a", verbose=0)
    # the recipe now reads 2 stored epochs: its teacher adds the second to the same store
    grown = tiny_recipe(teacher=teacher_preset, store=store)
    grown["distill"]["store_epochs"] = 2
    finetune(grown, tmp_path / "b", verbose=0, epochs=1)
    assert (tmp_path / "store" / "epoch_0001.bin").stat().st_size == 48 * (4 + 4 * K)
    # resuming b on the store of another teacher (same images, K, augmentation) is refused
    images = labelled_data(grown).train[0]
    other = classifier("resnet_bn_test", seed=9, classes=10)
    from poa_keras.finetune import replay_config

    write_store(other, images, tmp_path / "other", epochs=2, topk=K, seed=0, verbose=0,
                config=replay_config(grown, 32), teacher_name=teacher_preset)   # same name
    switched = dict(grown, distill=dict(grown["distill"], store=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="trained on the soft labels of another teacher"):
        finetune(switched, tmp_path / "b", verbose=0)
    # an epoch is the replay of one stored epoch: no more steps than its full batches
    with pytest.raises(ValueError, match="holds 3 full batches of 16; give at most 3"):
        finetune(dict(grown, data=dict(grown["data"], steps_per_epoch=4)), tmp_path / "c",
                 verbose=0)


def test_a_teacher_that_returns_probabilities_is_refused_before_anything_is_written(tmp_path):
    from poa_keras.data.softlabels import ReplayAugment, write_store

    images = make_shapes(8, image_size=32, seed=0)[0]
    softmax = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                                keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match="returned probabilities .* give the model before its "
                                         "softmax"):
        write_store(softmax, images, tmp_path / "store", epochs=1, topk=3, verbose=0,
                    config=ReplayAugment(output_size=32))
    assert not (tmp_path / "store").exists()


def test_distillation_recipes_default_to_tinyvits_settings():
    from poa_keras.finetune import load_finetune_recipe, section

    recipe = load_finetune_recipe(dict(tiny_recipe(teacher="t"), train=dict(epochs=9,
                                                                           batch_size=8),
                                       augment={}))
    train, augment = section(recipe, "train"), section(recipe, "augment")
    assert (train["lr"], train["reference_batch"], train["weight_decay"]) == (2.5e-4, 512, 0.01)
    assert (train["clip_grad"], train["warmup_epochs"], train["layer_decay"]) == (5.0, 5, 1.0)
    assert (augment["mixup"], augment["randaugment_ops"], augment["color_jitter"]) == (0, 0, 0.4)
    plain = dict(tiny_recipe(), train=dict(epochs=3, batch_size=8))
    plain.pop("distill")
    assert section(plain, "train")["layer_decay"] == 0.85        # fine-tuning's own defaults


@pytest.mark.skipif(BACKEND != "torch", reason=RUNNER_REASON)
def test_distill_store_command_and_the_online_and_hard_label_arms(tmp_path, cli):
    import json

    from poa_keras.finetune import finetune

    clf = classifier("resnet_bn_test", seed=3, classes=10)
    keras_file = str(tmp_path / "teacher.keras")
    clf.save(keras_file)
    recipe = tmp_path / "recipe.py"
    recipe.write_text(f"FINETUNE_RECIPE = {tiny_recipe()!r}\n")
    code, out, err = cli("distill-store", f"--recipe={recipe}", f"--teacher={keras_file}",
                         "--epochs=2", "--topk=4", f"--output={tmp_path / 'store'}",
                         "--verbose=0")
    assert code == 0, err
    header = json.loads((tmp_path / "store" / "store.json").read_text())
    assert (header["topk"], header["epochs"], header["num_classes"]) == (4, 2, 10)
    assert "2 epoch(s) x 48 images x 20 bytes = 1,920 bytes" in out
    # the same teacher as an online teacher, and the hard labels: one run each
    for targets, extra in (("teacher", dict(teacher=keras_file)), ("labels", {})):
        result = finetune(tiny_recipe(targets=targets, **extra), tmp_path / targets, verbose=0)
        assert np.isfinite(result.history[-1]["loss"]) and result.top1 is not None
    # bad input: no teacher, a teacher that gives no logits, K above its classes
    code, _, err = cli("distill-store", f"--recipe={recipe}", f"--output={tmp_path / 'x'}")
    assert code == 1 and "distill-store needs --teacher" in err
    backbone = str(tmp_path / "backbone.keras")
    from_config_name("resnet_bn_test").save(backbone)
    code, _, err = cli("distill-store", f"--recipe={recipe}", f"--teacher={backbone}",
                       f"--output={tmp_path / 'y'}", "--verbose=0")
    assert code == 1 and "must map images to class logits" in err
    code, _, err = cli("distill-store", f"--recipe={recipe}", f"--teacher={keras_file}",
                       "--topk=11", f"--output={tmp_path / 'z'}", "--verbose=0")
    assert code == 1 and "topk=11 is larger than the teacher's number of classes 10" in err
    assert not list((tmp_path / "z").glob("epoch_*"))
    small = str(tmp_path / "small.keras")     # takes 16 px images; the replay gives 32 px
    keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                      keras.layers.Dense(10)]).save(small)
    code, _, err = cli("distill-store", f"--recipe={recipe}", f"--teacher={small}",
                       f"--output={tmp_path / 'w'}", "--verbose=0")
    assert code == 1 and "the teacher failed on the augmented images" in err, err
    assert "(1, 32, 32, 3)" in err


@pytest.mark.parametrize("change, message", [
    (dict(augment=dict(randaugment_ops=2)), r"augment.randaugment_ops=2 cannot be replayed: "
                                            r"set augment.randaugment_ops=0"),
    (dict(augment=dict(mixup=0.8), distill=dict(targets="labels", teacher=None)),
     r"one-hot labels, which the replayed mixup / cutmix would have to mix too"),
    (dict(augment=dict(interpolation="bicubic")), r"set augment.interpolation='bilinear'"),
    (dict(augment=dict(color_jitter=(0.1, 0.2, 0.3))), r"one strength"),
    (dict(train=dict(layer_decay=0.8)), r"train.layer_decay=0.8: TinyViT's distillation has "
                                        r"none; set train.layer_decay=1.0"),
    (dict(distill=dict(targets="labels", teacher="t")), r"takes no teacher"),
    (dict(distill=dict(targets="soft")), r"distill.targets must be one of \['stored', "
                                         r"'teacher', 'teacher_dense', 'labels'\]"),
    (dict(distill=dict(topk=0)), r"distill.topk must be"),
])
def test_bad_distillation_recipes_are_refused_on_loading(change, message):
    from poa_keras.finetune import load_finetune_recipe

    recipe = tiny_recipe(teacher="t")
    for name, values in change.items():
        recipe[name] = dict(recipe[name], **values)
    with pytest.raises(ValueError, match=message):
        load_finetune_recipe(recipe)


def test_folder_images_are_resized_and_centre_cropped_for_the_store(tmp_path):
    import tensorflow as tf

    from poa_keras.finetune import in_memory_images, labelled_data

    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        for i, (h, w) in enumerate(((40, 60), (50, 30), (36, 36))):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            tf.io.write_file(str(tmp_path / name / f"{i}.png"), tf.io.encode_png(image))
    recipe = dict(tiny_recipe(), data=dict(source="folder", path=str(tmp_path), val_fraction=0.34,
                                           image_size=24))
    data = labelled_data(recipe)
    images, labels = in_memory_images(data.train, 24, count=data.num_train)
    assert images.dtype == np.uint8 and images.shape == (data.num_train, 24, 24, 3)
    assert sorted(set(labels.tolist())) <= [0, 1] and len(labels) == data.num_train
    # one image by hand: the shorter side to 24 (antialiased bilinear), then the centre
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    one = tf.data.Dataset.from_tensors((image, 0))
    got = in_memory_images(one, 24)[0][0]
    resized = tf.image.resize(image.astype(np.float32), (24, 36), antialias=True).numpy()
    want = np.round(np.clip(resized[:, 6:30], 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_a_distillation_run_without_a_teacher_is_refused_before_anything_is_built(tmp_path):
    from poa_keras.finetune import finetune

    with pytest.raises(ValueError, match="distill.targets='stored' needs exactly one of "
                                         "distill.teacher"):
        finetune(tiny_recipe(), tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="neither a .keras file, an ImageClassifier "
                                                "preset directory"):
        finetune(tiny_recipe(teacher=str(tmp_path / "missing")), tmp_path / "run", verbose=0)


def test_the_22k_recipe_carries_the_papers_settings():
    from poa_keras.finetune import load_finetune_recipe

    recipe = load_finetune_recipe("tinyvit_21m_in22k_distill")
    train, distill = recipe["train"], recipe["distill"]
    assert recipe["model"]["config"] == "tinyvit_21m"
    assert recipe["model"]["config_args"] == {"drop_path_rate": 0.1}
    assert (train["epochs"], train["batch_size"], train["warmup_epochs"]) == (90, 4096, 5)
    assert (train["lr"], train["lr_scaling"], train["reference_batch"]) == (2.5e-4, "linear", 512)
    assert (train["weight_decay"], train["clip_grad"]) == (0.01, 5.0)
    assert (distill["topk"], distill["store_epochs"], distill["targets"]) == (100, 90, "stored")
    assert (recipe["augment"]["mixup"], recipe["augment"]["cutmix"]) == (0.0, 0.0)
    assert recipe["augment"]["color_jitter"] == 0.4
    # the teacher is an argument: without one the run stops before anything is built
    from poa_keras.finetune import check_distill_sources

    with pytest.raises(ValueError, match="--teacher"):
        check_distill_sources(recipe)

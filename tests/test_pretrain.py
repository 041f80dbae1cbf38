"""Recipes, checkpoints, resume after SIGKILL and the NaN stop (pretrain.py,
methods/checkpoint.py), on a tiny POA run: a 16 x 16 elastic ViT with one elastic subnet,
2 epochs of 2 steps."""
import os
import sys

import keras
import numpy as np
import pytest

from conftest import checkpoint_arrays as arrays
from conftest import checkpoint_state as state
from conftest import pretrain_killed_at_step
from poa_keras.methods import schedules
from poa_keras.methods.checkpoint import CheckpointManager
from poa_keras.methods.nan_guard import NonFiniteLoss
from poa_keras.pretrain import load_recipe, pretrain, recipe_names

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(  # one elastic plan, (32, 1): every run compiles one POA program
    method="poa",
    backbone=dict(config="vit_elastic_test", image_size=16, embed_dim=32, depth=2, head_dim=16,
                  min_width=32, min_depth=1, named_subnets={}),
    head=dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30)),
    data=dict(source="shapes", num_images=16, num_val=4, image_size=16, seed=0,
              steps_per_epoch=2, global_size=16, local_size=8, num_local=2),
    train=dict(epochs=2, batch_size=4, lr=1e-3, lr_scaling="none", warmup_epochs=0.5,
               min_lr=1e-4, warmup_teacher_temp_epochs=1, freeze_last_layer_epochs=0,
               momentum_teacher=0.9, final_momentum_teacher=0.99),
    checkpoint=dict(every_epochs=1, keep=3),
    seed=0,
)


# ------------------------------------------------------------------------------------ recipes

def test_shipped_recipes_load_and_build_their_schedules():
    from poa_keras.methods.simsiam import learning_rate_schedule

    assert {"demo", "demo_dino", "poa_vit_l16_in1k", "dino_vit_s16_in1k", "demo_simsiam",
            "demo_ssql", "ssql_resnet18_cifar", "ssql_resnet50_in1k"} <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        steps = recipe["data"].get("steps_per_epoch") or (
            recipe["data"].get("num_images", 1_281_167) // recipe["train"]["batch_size"])
        if recipe["method"] in ("simsiam", "ssql"):
            total = len(learning_rate_schedule(recipe["train"], steps_per_epoch=steps))
        else:
            defaults = (schedules.POA_DEFAULTS if recipe["method"] == "poa"
                        else schedules.DINO_DEFAULTS)
            total = schedules.Schedules.from_recipe(
                dict(recipe["train"], steps_per_epoch=steps), defaults=defaults).total_steps
        assert total == round(recipe["train"]["epochs"] * steps), name


def test_paper_recipe_matches_the_reference_numbers():
    r = load_recipe("poa_vit_l16_in1k")
    sched = schedules.Schedules.from_recipe(dict(r["train"], steps_per_epoch=800))
    assert sched.total_steps == 276_800            # vit_ee1200.yaml: "total iter: 276800"
    assert sched.lr.max() == pytest.approx(0.004 * (1600 / 1024) ** 0.5)
    assert r["head"]["out_dims"] == (8192, 16384, 32768, 65536)
    d = load_recipe("dino_vit_s16_in1k")
    sched = schedules.Schedules.from_recipe(
        dict(d["train"], steps_per_epoch=1251), defaults=schedules.DINO_DEFAULTS)
    assert sched.lr.max() == pytest.approx(5e-4 * 1024 / 256)


def test_recipe_overrides_and_errors(tmp_path):
    r = load_recipe("demo", ["train.epochs=7", "data.path=/x/y", "seed=3"])
    assert (r["train"]["epochs"], r["data"]["path"], r["seed"]) == (7, "/x/y", 3)
    with pytest.raises(ValueError, match="shipped recipes: .*demo"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unknown recipe section 'trian'"):
        load_recipe("demo", ["trian.epochs=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe("demo", ["epochs"])
    with pytest.raises(ValueError, match=r"train.epochs must be a positive integer, got 0.5"):
        load_recipe("demo", ["train.epochs=0.5"])
    with pytest.raises(ValueError, match="method must be one of"):
        load_recipe(dict(TINY, method="mea"))
    path = tmp_path / "mine.py"
    path.write_text("RECIPE = " + repr(TINY))
    assert load_recipe(str(path))["backbone"]["embed_dim"] == 32


def test_misspelt_keys_and_bad_values_are_refused_before_anything_is_built(tmp_path):
    cases = {
        "train.epoch=2": "unknown recipe key train.epoch (did you mean train.epochs?)",
        "train.warmup_epoch=1": "train.warmup_epoch (did you mean train.warmup_epochs?)",
        "train.momentum_techer=0.9": "(did you mean train.momentum_teacher?)",
        "optimizer.beta1=0.8": "(did you mean optimizer.beta_1?); valid optimizer (adamw) "
                               "keys: ['beta_1', 'beta_2', 'epsilon', 'name']",
        "checkpoint.kep=3": "(did you mean checkpoint.keep?)",
        "data.num_image=9": "(did you mean data.num_images?); valid data keys: [",
        "backbone.embed_dims=32": "(did you mean backbone.embed_dim?)",
        "train.lr=-1": "train.lr must be a number > 0, got -1",
        "train.momentum_teacher=1.5": "train.momentum_teacher must be a number in [0, 1]",
        "data.num_images=0": "data.num_images must be an integer >= 1, got 0",
        "train.centering='centre'": "got 'centre' (did you mean 'center'?)",
        "train.steps_per_epoch=3": "give data.steps_per_epoch instead",
        "backbone.embed_dim=40": "embed_dim=40 is not a multiple of head_dim=16",
        "data.on_bad_image='ignore'": "data.on_bad_image must be one of ['error', 'skip']",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError) as error:
            load_recipe(TINY, [override])
        assert message in str(error.value), (override, str(error.value))
    # a dict given to pretrain is checked too, before any data, model or directory is made
    bad = dict(TINY, train=dict(TINY["train"], epoch=3))
    with pytest.raises(ValueError, match="did you mean train.epochs"):
        pretrain(bad, tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()


def test_valid_train_keys_come_from_the_methods_defaults():
    from poa_keras.methods.dino import DINO_RECIPE
    from poa_keras.methods.poa import POA_RECIPE
    from poa_keras.pretrain import train_keys

    assert train_keys("poa") == set(POA_RECIPE) | {"epochs", "batch_size", "iter_num_scale"}
    assert train_keys("dino") == set(DINO_RECIPE) | {"epochs", "batch_size", "iter_num_scale"}
    assert "lambda_ie" not in train_keys("dino")
    with pytest.raises(ValueError, match=r"train.lambda_ie.*valid train \(DINO\) keys"):
        load_recipe(dict(TINY, method="dino", head=dict(out_dim=20, hidden_dim=32,
                                                         bottleneck_dim=16),
                         train=dict(TINY["train"], lambda_ie=0.5)))


def test_data_without_images_and_undecodable_files_fail_before_training(tmp_path):
    from poa_keras.pretrain import steps_per_epoch, training_images

    with pytest.raises(ValueError, match="holds 0 images"):
        steps_per_epoch(dict(TINY, data=dict(TINY["data"], steps_per_epoch=None)), 0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        keras.utils.save_img(folder / f"{i}.png", np.full((16, 16, 3), 40 * i, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    recipe = dict(TINY, data=dict(TINY["data"], source="folder", path=str(folder)))
    with pytest.raises(ValueError, match=r"1 of the 4 image files .*broken\.jpg"):
        pretrain(recipe, tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
    with pytest.warns(UserWarning, match=r"skipped 1 of the 4 image files"):
        ds, n = training_images(dict(recipe["data"], on_bad_image="skip"), 0)
    assert n == 3


# ------------------------------------------------------------------------ checkpoints / resume

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 2-epoch run."""
    out = tmp_path_factory.mktemp("straight")
    result = pretrain(TINY, out, verbose=0)
    return out, result


def test_run_writes_checkpoints_log_and_teacher(straight):
    out, result = straight
    manager = CheckpointManager(out / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001", "epoch_0002"]
    assert manager.latest().endswith("epoch_0002")
    final = state(manager.latest())
    assert (final["epoch"], final["step"]) == (2, 4)
    assert len(final["history"]) == 2 and np.isfinite(final["history"][-1]["loss"])
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert (out / "teacher" / "model.weights.h5").is_file()
    # The saved teacher is the trainer's EMA teacher.
    from poa_keras import Backbone
    teacher = Backbone.from_preset(str(out / "teacher"))
    assert teacher.name == "teacher_vit_elastic_test"   # the configuration, not "student"
    for a, b in zip(teacher.weights, result.trainer.teacher_backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def test_sigkill_then_resume_equals_the_uninterrupted_run(straight, tmp_path):
    out, _ = straight
    run = tmp_path / "killed"
    pretrain_killed_at_step(TINY, run, step=3)   # mid-epoch 2, after checkpoint 1
    manager = CheckpointManager(run / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001"]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".epoch")]
    # Up to the checkpoint, the killed run equals the uninterrupted one exactly.
    a, b = arrays(out / "checkpoints" / "epoch_0001"), arrays(manager.latest())
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert state(manager.latest())["host"] == state(out / "checkpoints" / "epoch_0001")["host"]

    result = pretrain(TINY, run, verbose=0)
    assert result.resumed_from.endswith("epoch_0001")
    final = state(manager.latest())
    assert (final["epoch"], final["step"]) == (2, 4)
    assert final["host"] == state(out / "checkpoints" / "epoch_0002")["host"]
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    a, b = arrays(out / "checkpoints" / "epoch_0002"), arrays(manager.latest())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_resume_refuses_another_recipe_and_nothing_to_resume_is_a_fresh_start(straight):
    out, _ = straight
    other = dict(TINY, seed=1)
    with pytest.raises(ValueError, match="another recipe.*seed"):
        pretrain(other, out, verbose=0)
    with pytest.raises(FileExistsError, match="resume"):
        pretrain(TINY, out, verbose=0, resume=False)


def test_a_resume_may_change_the_schedules_when_asked(straight, tmp_path):
    """A run resumed with another learning rate and more epochs: refused (naming the keys and
    how to allow them) unless allow_recipe_change names them; anything else stays refused."""
    import shutil

    out, _ = straight
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    changed = dict(TINY, train=dict(TINY["train"], lr=5e-4, epochs=3))
    with pytest.raises(ValueError, match=r"train.epochs 2 -> 3, train.lr 0.001 -> 0.0005.*"
                                         r"allow_recipe_change=\['train.epochs', 'train.lr'\]"):
        pretrain(changed, run, verbose=0)
    with pytest.raises(ValueError, match=r"train.epochs 2 -> 3\)"):
        pretrain(changed, run, verbose=0, allow_recipe_change=["train.lr"])
    with pytest.raises(ValueError, match=r"'train.batch_size' cannot change when a run resumes"):
        pretrain(changed, run, verbose=0, allow_recipe_change="train.lr,train.batch_size")
    bigger = dict(changed, train=dict(changed["train"], batch_size=8))
    with pytest.raises(ValueError, match=r"train.batch_size 4 -> 8.*new output directory"):
        pretrain(bigger, run, verbose=0, allow_recipe_change="train.lr,train.epochs")
    result = pretrain(changed, run, verbose=0, save_teacher=False,
                      allow_recipe_change="train.lr,train.epochs")
    assert result.recipe_changes == {"train.epochs": (2, 3), "train.lr": (1e-3, 5e-4)}
    final = state(CheckpointManager(run / "checkpoints").latest())
    assert (final["epoch"], final["step"]) == (3, 6)
    assert final["recipe"]["train"]["lr"] == 5e-4   # the next resume compares with this one
    assert result.trainer.schedules.lr.max() == pytest.approx(5e-4)


def test_an_unsound_state_is_never_checkpointed(tmp_path):
    """Weights near 1e30 (a diverged update with a finite loss) or NaN optimizer moments: the
    checkpoint is not written, the last good one stays the latest, and the callback stops the
    run with advice that can be followed."""
    from poa_keras.methods.checkpoint import PretrainCheckpoint
    from poa_keras.methods.nan_guard import NonFiniteState
    from poa_keras.pretrain import build_trainer

    trainer = build_trainer(load_recipe(TINY), steps=2)
    manager = CheckpointManager(tmp_path / "ckpt")
    good = manager.save(trainer, 1)
    v = trainer.backbone.cls_token
    v.assign(np.full(v.shape, 1e30, "float32"))
    with pytest.raises(NonFiniteState, match=r"variable .*cls_token reaches \|value\| = 1e\+30.*"
                                             r"epoch_0002 was not written.*epoch_0001"):
        manager.save(trainer, 2)
    assert manager.latest() == good and sorted(os.listdir(tmp_path / "ckpt")) == [
        "epoch_0001", "latest"]
    v.assign(np.zeros(v.shape, "float32"))
    moment = trainer.optimizer.variables[-1]
    moment.assign(np.full(moment.shape, np.nan, "float32"))
    with pytest.raises(NonFiniteState, match=r"optimizer variable .* NaN/inf"):
        manager.save(trainer, 2)
    saver = PretrainCheckpoint(manager, total_epochs=2, advice="Lower the lr.")
    saver.set_model(trainer)
    saver.on_epoch_end(1, {"loss": 1.0})
    assert isinstance(saver.error, NonFiniteState) and str(saver.error).endswith("Lower the lr.")
    assert trainer.stop_training and manager.latest() == good


def test_checkpoint_of_another_architecture_is_refused(straight, tmp_path):
    out, _ = straight
    from poa_keras.pretrain import build_trainer
    wider = load_recipe(TINY, ["backbone.embed_dim=48"])
    trainer = build_trainer(wider, steps=2)
    with pytest.raises(ValueError, match="has shape .* another architecture"):
        CheckpointManager(out / "checkpoints").restore(trainer)


class PoisonWeights(keras.callbacks.Callback):
    """Writes NaN into a student weight before the 3rd step (epoch 2)."""

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.host_step == 2:
            if BACKEND == "jax":
                self.model.jax_state_sync()  # variables hold the state again; fit re-reads them
            v = self.model.backbone.cls_token
            v.assign(np.full(v.shape, np.nan, "float32"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"nan at step 3 \(epoch 2.*epoch_0001.*"
                                            r"allow_recipe_change=\['train.lr'\]"):
        pretrain(TINY, tmp_path, verbose=0, callbacks=[PoisonWeights()])
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001"]
    assert all(np.isfinite(x).all() for x in arrays(manager.latest()).values())
    assert not (tmp_path / "teacher").exists()


def test_the_user_compilation_cache_without_keras_home(monkeypatch):
    from poa_keras.pretrain import compilation_cache_dir

    monkeypatch.delenv("KERAS_HOME", raising=False)
    assert compilation_cache_dir("user", "out") == os.path.join(
        os.path.expanduser("~"), ".keras", "jax_compilation_cache")


def test_tfds_source_says_what_it_needs(monkeypatch):
    from poa_keras.pretrain import training_images

    with pytest.raises(ValueError, match=r'data.source="tfds" needs data.name'):
        training_images({"source": "tfds"}, 0)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "poa_keras\[tfds\]"'):
        training_images({"source": "tfds", "name": "imagenette"}, 0)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's persistent compilation cache: TensorFlow "
                    "traces its programs again in every process, PyTorch compiles nothing")
def test_a_repeated_run_compiles_nothing_it_compiled_before(tmp_path):
    """pretrain(compilation_cache=DIR): the second identical run (another output directory,
    the same recipe) loads every XLA program from DIR instead of compiling it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from poa_keras.pretrain import compilation_cache_dir

    assert compilation_cache_dir("run", tmp_path / "out") == str(tmp_path / "out" /
                                                                  "jax_compilation_cache")
    with pytest.raises(ValueError, match="compilation_cache=3"):
        compilation_cache_dir(3, tmp_path)
    events = []

    def listener(event, **kwargs):
        if event.startswith("/jax/compilation_cache/"):
            events.append(event.rsplit("/", 1)[1])

    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.monitoring.register_event_listener(listener)
    recipe = dict(TINY, train=dict(TINY["train"], epochs=1))
    try:
        runs = []
        for run in ("first", "second"):
            events.clear()
            pretrain(recipe, tmp_path / run, verbose=0, save_teacher=False,
                     compilation_cache=tmp_path / "cache")
            # XLA programs compiled (cache misses) and loaded from the cache
            requests, hits = events.count("compile_requests_use_cache"), events.count("cache_hits")
            runs.append((requests - hits, hits))
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        jax.config.update("jax_compilation_cache_dir", previous[0])
        compilation_cache.reset_cache()
    (compiled_first, _), (compiled_second, loaded_second) = runs
    assert compiled_first >= 1 and compiled_second == 0 and loaded_second >= 1, runs
    assert any((tmp_path / "cache").iterdir())

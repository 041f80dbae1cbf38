"""Training on several devices through keras.distribution (methods/base.py): POA steps under
DataParallel on 8 simulated CPU devices equal the single-device steps, through fit on the
recipe's tf.data pipeline (multi-crop batches, views first) and through train_on_batch; bad
input is refused before any step. The 8 devices exist only in a fresh JAX process
(XLA_FLAGS=--xla_force_host_platform_device_count=8), so the comparison runs in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["backbone.config='vit_elastic_test'", "head.out_dims=(64, 128)", "head.hidden_dim=64",
        "head.bottleneck_dim=32", "data.num_images=32", "data.num_val=8", "data.num_local=0",
        "train.batch_size=8", "train.koleo_weight=0.1"]

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, keras, numpy as np
    from keras import ops
    from poa_keras.pretrain import (build_trainer, epoch_datasets, load_recipe,
                                    training_images, validate_recipe)

    tiny = json.loads(sys.argv[1])
    recipe = validate_recipe(load_recipe("demo", tiny))
    images = training_images(recipe["data"], 0)
    images = images[0] if isinstance(images, tuple) else images

    def run(distribution, how):
        keras.utils.set_random_seed(0)
        keras.distribution.set_distribution(distribution)
        trainer = build_trainer(recipe, steps=2)
        ds = epoch_datasets(recipe, images, 2, 0, 1)
        if how == "fit":
            history = trainer.fit(ds, epochs=1, steps_per_epoch=2, verbose=0).history
            losses = [float(history["loss"][-1])]
        else:
            batch = next(ds.as_numpy_iterator())   # one step, the same first plan as fit's
            losses = [float(trainer.train_on_batch(batch, return_dict=True)["loss"])]
        state = {"student": trainer.backbone.weights, "teacher": trainer.teacher_backbone.weights,
                 "heads": trainer.head.weights, "optimizer": trainer.optimizer.variables}
        out = {k: [np.asarray(ops.convert_to_numpy(v)) for v in vs] for k, vs in state.items()}
        sharding = str(trainer.backbone.weights[1].value.sharding)
        keras.distribution.set_distribution(None)
        return losses, out, sharding

    result = {"devices": len(jax.devices())}
    for how in ("fit", "train_on_batch"):
        single = run(None, how)
        parallel = run(keras.distribution.DataParallel(devices=jax.devices()), how)
        result[how] = {"losses": [single[0], parallel[0]], "sharding": parallel[2],
                       "max_diff": {k: max(float(np.max(np.abs(a - b)))
                                           for a, b in zip(single[1][k], parallel[1][k]))
                                    for k in single[1]}}
    # a batch of 6 on 8 devices: refused before any step
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    bad = validate_recipe(load_recipe("demo", tiny + ["train.batch_size=6"]))
    trainer = build_trainer(bad, steps=1)
    try:
        trainer.fit(epoch_datasets(bad, images, 1, 0, 1), epochs=1, steps_per_epoch=1, verbose=0)
        result["bad_batch"] = None
    except ValueError as error:
        result["bad_batch"] = str(error)
    print("RESULT " + json.dumps(result))
''')


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="keras.distribution trains through JAX's partitioner only; the "
                           "other backends' refusal is tested below")
def test_poa_steps_on_8_devices_equal_one_device(tmp_path):
    script = tmp_path / "distributed.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8").strip())
    done = subprocess.run([sys.executable, str(script), json.dumps(TINY)], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["devices"] == 8
    for how in ("fit", "train_on_batch"):
        run = result[how]
        assert "NamedSharding" in run["sharding"] and "'batch': 8" in run["sharding"], run
        np.testing.assert_allclose(run["losses"][1], run["losses"][0], rtol=1e-5)
        for part, diff in run["max_diff"].items():
            assert diff < 2e-5, (how, part, diff)
    assert "a batch of 6 (data leaf 'global') does not divide the data axis of 8 devices" in \
        result["bad_batch"]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="Keras' torch backend cannot even build a DataParallel distribution "
                           "(no distribution_lib); JAX trains under it (above)")
def test_a_distribution_on_another_backend_is_refused():
    from poa_keras.pretrain import build_trainer, load_recipe, validate_recipe

    recipe = validate_recipe(load_recipe("demo", TINY))
    trainer = build_trainer(recipe, steps=1)
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        batch = {"global": np.zeros((2, 8, 32, 32, 3), "float32"),
                 "local": np.zeros((2, 8, 16, 16, 3), "float32")}
        with pytest.raises(ValueError, match="on the JAX backend only, not 'tensorflow'"):
            trainer.train_on_batch(batch)
    finally:
        keras.distribution.set_distribution(None)


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="a distribution can be set on JAX only (the other backends refuse "
                           "it first, tested above)")
def test_a_generator_under_a_distribution_is_refused():
    from poa_keras.pretrain import build_trainer, load_recipe, validate_recipe

    trainer = build_trainer(validate_recipe(load_recipe("demo", TINY)), steps=1)
    batch = {"global": np.zeros((2, 8, 32, 32, 3), "float32")}

    def batches():
        yield batch

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        with pytest.raises(ValueError, match="takes a tf.data.Dataset or arrays .*not "
                                             "generator"):
            trainer.fit(batches(), epochs=1, steps_per_epoch=1, verbose=0)
    finally:
        keras.distribution.set_distribution(None)

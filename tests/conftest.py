import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from poa_keras import ElasticResNet, ElasticSwin, ElasticViT  # noqa: E402
from poa_keras.backbones.resnet import CONFIGS as RESNET_CONFIGS  # noqa: E402
from poa_keras.backbones.swin import CONFIGS as SWIN_CONFIGS  # noqa: E402

# A small elastic ViT with a 5 x 5 grid (widths 32..96 step 16, depths 2..6): 25 subnets.
SMALL_VIT = dict(image_size=32, patch_size=8, embed_dim=96, depth=6, head_dim=16, min_width=32,
                 min_depth=2, layer_scale_init=0.5, use_mask_token=True, net_select_scale=3)


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def _run_killed(runner, recipe, run_dir, step, prelude, counter):
    """Runs ``runner(recipe, run_dir)`` ("module.function") in a subprocess of this backend and
    SIGKILLs it when the expression ``counter`` (in a callback: ``self.model``, and
    ``self.batches``, the batches this process ran) reaches ``step`` after a batch."""
    module, function = runner.rsplit(".", 1)
    script = textwrap.dedent("""
        import os, signal, sys
        import keras
        from {module} import {function}
        {prelude}
        class Kill(keras.callbacks.Callback):
            batches = 0

            def on_train_batch_end(self, batch, logs=None):
                self.batches += 1
                if {counter} == {step}:
                    os.kill(os.getpid(), signal.SIGKILL)

        {function}({recipe!r}, sys.argv[1], verbose=0, callbacks=[Kill()])
        print("not killed")
    """).format(module=module, function=function, prelude=prelude, counter=counter,
                step=int(step), recipe=recipe)
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def pretrain_killed_at_step(recipe, run_dir, step, prelude=""):
    """Runs ``pretrain(recipe, run_dir)`` in a subprocess of this backend and SIGKILLs it after
    its ``host_step`` reaches ``step`` (a hard crash: no ``finally``, no atexit); ``prelude``
    is Python run first (e.g. thread settings). Fails unless the process died of the kill."""
    _run_killed("poa_keras.pretrain.pretrain", recipe, run_dir, step, prelude,
                counter="self.model.host_step")


def finetune_killed_at_step(recipe, run_dir, step, prelude=""):
    """``pretrain_killed_at_step`` for ``finetune(recipe, run_dir)`` (poa_keras/finetune.py):
    killed after its ``step``-th train step (a fresh run: the optimizer's step count)."""
    _run_killed("poa_keras.finetune.finetune", recipe, run_dir, step, prelude,
                counter="self.batches")


def checkpoint_arrays(checkpoint):
    """{"group/name": array} of a checkpoint directory's state.weights.h5."""
    import h5py

    with h5py.File(os.path.join(checkpoint, "state.weights.h5"), "r") as f:
        return {f"{g}/{k}": f[g][k][()] for g in f for k in f[g]}


def checkpoint_state(checkpoint):
    """A checkpoint directory's state.json."""
    import json

    with open(os.path.join(checkpoint, "state.json")) as f:
        return json.load(f)


def forward(model, images, subnet=None, training=False, **options):
    """The model's forward: jitted on JAX (eager JAX compiles op by op and is slow; programs
    are shared by models of one architecture), eager elsewhere (tracing a tf.function costs
    more than running a tiny model eagerly). ``options``: boolean call flags such as
    ``return_feature_maps=True``."""
    if keras.backend.backend() == "jax":
        return model.compiled_forward(subnet, training=training, **options)(images)
    return model(images, subnet=subnet, training=training, **options)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch CPU thread for a module (``pytestmark = pytest.mark.usefixtures(...)``):
    its thread pool spins when the cores are shared (a tiny forward measured 25x slower with 2
    threads than with 1 on a busy 2-core machine); restored after the module."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model, seed=0):
    """Gives every weight random values of a moderate scale, so that slicing errors show
    (LayerScale 1e-5, zero biases or zero mask tokens would hide them). The activation
    quantizers' calibrated ranges (state, not weights) are left as they are."""
    rng = np.random.default_rng(seed)
    model.set_weights([np.asarray(keras.ops.convert_to_numpy(v)) if v.name == "range"
                       else rng.normal(0.0, 0.2, size=tuple(v.shape)).astype("float32")
                       for v in model.weights])


def randomize_bn_variances(model, seed=2):
    """Gives every BatchNorm moving variance random positive values in [0.5, 2) (after
    ``randomize``, whose normal values would make some negative)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith("moving_variance"):
            variable.assign(rng.uniform(0.5, 2.0, size=tuple(variable.shape)))


@pytest.fixture(scope="session")
def small_vit():
    keras.utils.set_random_seed(0)
    model = ElasticViT(name="small_vit", **SMALL_VIT)
    randomize(model, seed=1)
    return model


@pytest.fixture(scope="session")
def tiny_swin():
    """The tiny elastic Swin (widths 16, 32; stage-3 depths 1..3; window 4), random weights."""
    keras.utils.set_random_seed(0)
    model = ElasticSwin(name="tiny_swin", **SWIN_CONFIGS["swin_elastic_test"])
    randomize(model, seed=1)
    return model


@pytest.fixture(scope="session")
def tiny_resnet():
    """The tiny elastic ResNet (widths 8 / 12, depths (1, 1-2, 2-3, 1)): random gains, betas,
    every channel non-trivial, so that slicing errors show."""
    keras.utils.set_random_seed(0)
    model = ElasticResNet(name="tiny_resnet", **RESNET_CONFIGS["resnet_elastic_test"])
    randomize(model, seed=1)
    return model


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")


@pytest.fixture
def cli(capsys):
    """Runs ``poa-keras ARGS`` in this process: parses the flags as absl would, calls main,
    resets the flags; returns (exit code, stdout, stderr)."""
    from absl import flags

    from poa_keras import cli as module

    def call(*args):
        try:
            argv = flags.FLAGS(["poa-keras", *args])
            code = module.main(argv)
        finally:
            flags.FLAGS.unparse_flags()
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call

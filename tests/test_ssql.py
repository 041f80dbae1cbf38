"""SimSiam and SSQL (losses/simsiam.py, heads/simsiam.py, methods/simsiam.py, methods/ssql.py)
and their recipes, on the tiny BatchNorm ResNet ("resnet_bn_test": 2 basic blocks, 32 x 32
images), batches of 4 images (8 views).

The machine is slow to compile, so the SSQL trainer is shared by the module (its state is
restored from a snapshot before each experiment); the fresh trainer of the resume test loads
its program from a JAX compilation cache of this module."""
import json
import os

import keras
import numpy as np
import pytest
from conftest import pretrain_killed_at_step, to_np

from poa_keras.elastic.layers import HostInitializer
from poa_keras.heads.simsiam import SimSiamPredictor, SimSiamProjector
from poa_keras.losses import (cosine_similarity, negative_cosine, normalized_std, simsiam_loss,
                              ssql_loss)
from poa_keras.methods import SSQL, SimSiam
from poa_keras.methods.checkpoint import CheckpointManager
from poa_keras.methods.simsiam import learning_rate_schedule
from poa_keras.quantization import BitSampler, QuantConfig, quantization_scope

BACKEND = keras.backend.backend()
COMPILED = BACKEND in ("jax", "tensorflow")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONE = "resnet_bn_test"      # feature width 16
HEADS = dict(projector=dict(hidden_dim=24, out_dim=20), predictor=dict(hidden_dim=12))
RECIPE = dict(epochs=2, steps_per_epoch=4, batch_size=4, lr=0.05, weight_decay=5e-4)
LR = 0.05


# ---------------------------------------------------------------------------------- helpers

def views(seed, batch=4):
    """A batch of two views: {"global": (2, B, 32, 32, 3)}."""
    rng = np.random.default_rng(seed)
    return {"global": rng.normal(0.0, 1.0, (2, batch, 32, 32, 3)).astype("float32")}


def make_trainer(cls=SSQL, seed=0, **recipe):
    from poa_keras.backbones import from_config_name

    keras.utils.set_random_seed(seed)
    trainer = cls(from_config_name(BACKBONE), projector=dict(HEADS["projector"]),
                  predictor=dict(HEADS["predictor"]), recipe=dict(RECIPE, **recipe))
    trainer.compile(optimizer=keras.optimizers.SGD(momentum=0.9))
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def snapshot(trainer):
    return [to_np(v) for v in trainer.variables + trainer.optimizer.variables]


def restore(trainer, state):
    for v, value in zip(trainer.variables + trainer.optimizer.variables, state):
        v.assign(value.astype(v.dtype))


def step(trainer, data):
    logs = trainer.train_on_batch(data, return_dict=True)
    return {k: float(v) for k, v in logs.items()}


def trainable(trainer):
    return [to_np(v) for v in trainer.trainable_variables]


class pinned_bits:
    """Runs the trainer's steps at fixed bit-widths (its sampler is not used)."""

    def __init__(self, trainer, bits):
        self.trainer, self.bits = trainer, bits

    def __enter__(self):
        self.trainer.next_bits = lambda: self.bits

    def __exit__(self, *exc):
        del self.trainer.next_bits


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A JAX compilation cache for this module, so that a second trainer of the same
    architecture loads its step program instead of compiling it (restored afterwards)."""
    if BACKEND != "jax":
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def ssql(jax_cache):
    trainer = make_trainer(SSQL)
    return trainer, snapshot(trainer)


# ----------------------------------------------------------------------------------- losses

def _np_cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                        1e-8)


def value_and_grads(fn, *arrays):
    """fn(*tensors) and its gradient with respect to every input, on the current backend."""
    if BACKEND == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(arrays))))(*arrays)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors, unconnected_gradients="zero")
    else:
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    return float(to_np(value)), [to_np(g) for g in grads]


def test_losses_match_numpy_and_no_gradient_reaches_the_targets():
    rng = np.random.default_rng(0)
    p1, p2, p1q, p2q, z1, z2 = (rng.normal(size=(5, 7)).astype("float32") for _ in range(6))

    def d(p, z):
        return -_np_cos(p, z).mean()

    fp = (d(p1, z2) + d(p2, z1)) / 2
    q = (d(p1q, z2) + d(p2q, z1)) / 2
    np.testing.assert_allclose(to_np(cosine_similarity(p1, z1)), _np_cos(p1, z1), rtol=1e-5)
    np.testing.assert_allclose(float(to_np(negative_cosine(p1, z2))), d(p1, z2), rtol=1e-5)
    np.testing.assert_allclose(float(to_np(simsiam_loss(p1, p2, z1, z2))), fp, rtol=1e-5)
    loss, loss_fp, loss_q = (float(to_np(v)) for v in ssql_loss(p1, p2, p1q, p2q, z1, z2))
    np.testing.assert_allclose([loss, loss_fp, loss_q], [(fp + q) / 2, fp, q], rtol=1e-5)
    # a zero prediction: cosine 0, finite gradient (the norms' product is floored)
    zero = np.zeros_like(p1)
    assert float(to_np(negative_cosine(zero, z1))) == 0.0

    # Gradients: the targets (z1, z2: the FLOAT z) get none; the predictions get the analytic
    # gradient of -cos / B, weighted 1/4 in the SSQL loss (1/2 per branch, 1/2 per view pair).
    value, grads = value_and_grads(lambda *t: ssql_loss(*t)[0], p1, p2, p1q, p2q, z1, z2)
    np.testing.assert_allclose(value, (fp + q) / 2, rtol=1e-5)
    assert np.abs(grads[4]).max() == 0.0 and np.abs(grads[5]).max() == 0.0

    def dcos(p, z):  # d cos(p, z) / d p, per row
        pn, zn = np.linalg.norm(p, axis=-1, keepdims=True), np.linalg.norm(z, axis=-1,
                                                                           keepdims=True)
        return z / (pn * zn) - (p * z).sum(-1, keepdims=True) * p / (pn ** 3 * zn)

    for g, p, z in zip(grads[:4], (p1, p2, p1q, p2q), (z2, z1, z2, z1)):
        np.testing.assert_allclose(g, -dcos(p.astype(np.float64), z) / 5 / 4, rtol=1e-4,
                                   atol=1e-7)

    # the collapse indicator: std over the batch of the l2-normalised rows, mean over channels
    zn = z1 / np.linalg.norm(z1, axis=-1, keepdims=True)
    np.testing.assert_allclose(float(to_np(normalized_std(z1))), zn.std(0).mean(), rtol=1e-5)
    assert float(to_np(normalized_std(np.tile(z1[:1], (5, 1))))) < 1e-6   # collapsed
    with pytest.raises(ValueError, match=r"two \(B, D\) tensors of the same shape"):
        cosine_similarity(p1, z1[:, :3])


# ------------------------------------------------------------------------------------ heads

def _np_bn(x, gamma=None, beta=None, eps=1e-5):
    out = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)
    return out if gamma is None else out * gamma + beta


def _np_quant_weight(w, bits):
    """Symmetric per-output-channel fake quantization, written from REFERENCE.md §5."""
    scale = np.abs(w).max(axis=0) / ((2 ** bits - 1) / 2)
    q = np.clip(np.round(w / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return q * scale


def test_projector_and_predictor_layers_batch_norm_and_8_bit_projector_weights():
    keras.utils.set_random_seed(1)
    with HostInitializer.skipped():   # (no random draws for these wide layers)
        default = SimSiamProjector(16)
        assert (default.hidden_dim, default.out_dim) == (2048, 2048)
        wide = SimSiamProjector(4096, num_layers=2)
        assert (wide.hidden_dim, wide.out_dim) == (4096, 4096)   # max(in_dim, 2048)
    projector = SimSiamProjector(6, out_dim=4, hidden_dim=5)
    predictor = SimSiamPredictor(4, hidden_dim=3)
    norms = projector.norms
    assert [(n.center, n.scale, n.momentum, n.epsilon) for n in norms] == [
        (True, True, 0.9, 1e-5), (True, True, 0.9, 1e-5), (False, False, 0.9, 1e-5)]
    assert [len(n.trainable_weights) for n in norms] == [2, 2, 0]   # BN(affine=False): none
    assert not any(linear.use_bias for linear in projector.linears)
    # nested names: "<name>/linear_0/dense/kernel"
    assert projector.linears[0].dense.kernel.path == f"{projector.name}/linear_0/dense/kernel"
    # random BN gains / offsets, so that a swapped or missing one shows
    rng = np.random.default_rng(0)
    for n in norms[:2] + [predictor.norm]:
        n.gamma.assign(rng.uniform(0.5, 1.5, n.gamma.shape).astype("float32"))
        n.beta.assign(rng.normal(0, 0.3, n.beta.shape).astype("float32"))
    # The largest |w| of a channel divides to exactly +-(2^b - 1) / 2, a rounding tie: the
    # positive end always gives 2^(b-1) - 1, the negative end -2^(b-1) or -2^(b-1) + 1
    # depending on how a backend rounds the division. Each channel's largest weight is made
    # positive (a column sign flip) so that the comparison does not hinge on that tie.
    for linear in projector.linears:
        k = to_np(linear.dense.kernel)
        signs = np.sign(k[np.abs(k).argmax(axis=0), np.arange(k.shape[1])])
        linear.dense.kernel.assign((k * signs).astype("float32"))
    x = rng.normal(size=(8, 6)).astype("float32")
    kernels = [to_np(linear.dense.kernel) for linear in projector.linears]
    g = [(to_np(n.gamma), to_np(n.beta)) for n in norms[:2]]

    def np_projector(kernels):
        h = np.maximum(_np_bn(x @ kernels[0], *g[0]), 0)
        h = np.maximum(_np_bn(h @ kernels[1], *g[1]), 0)
        return _np_bn(h @ kernels[2])

    z = to_np(projector(x, training=True))
    np.testing.assert_allclose(z, np_projector(kernels), rtol=1e-4, atol=1e-5)
    # Inside a 2-bit weight / 4-bit activation scope: the projector's kernels at a FIXED 8
    # bits and no activation quantization; a float scope (32) leaves it in float.
    with quantization_scope(QuantConfig(2, 4, ranges="batch")):
        zq = to_np(projector(x, training=True))
        pq = to_np(predictor(z, training=True))
    np.testing.assert_allclose(zq, np_projector([_np_quant_weight(k, 8) for k in kernels]),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(zq - z).max() > 1e-4
    with quantization_scope(QuantConfig(32, 32)):
        np.testing.assert_allclose(to_np(projector(x, training=True)), z, rtol=1e-6, atol=1e-6)
    # the predictor: never quantized, Linear(no bias)-BN-ReLU-Linear(bias)
    h = np.maximum(_np_bn(z @ to_np(predictor.hidden.kernel), to_np(predictor.norm.gamma),
                          to_np(predictor.norm.beta)), 0)
    p = h @ to_np(predictor.out.kernel) + to_np(predictor.out.bias)
    np.testing.assert_allclose(pq, p, rtol=1e-4, atol=1e-5)
    assert predictor.hidden.bias is None
    # serialisation (registered classes)
    for layer in (projector, predictor):
        config = keras.saving.serialize_keras_object(layer)
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        SimSiamPredictor(4, hidden_dim=0)


# --------------------------------------------------------------------------------- trainers

def test_ssql_step_shares_the_weights_and_both_branches_send_gradients(ssql):
    """Steps from one state (plain first SGD steps, no weight decay) at pinned bit-widths:

    * the float branch does not depend on the bits (loss_fp equal at every width);
    * at float "bits" (32/32) the quantized branch IS the float branch (loss_q == loss_fp):
      same weights, same targets; the step is then a SimSiam step, delta_32 = -lr g_fp;
    * at 2/4 the loss differs from 8/8, and delta_24 = -lr (g_fp + g_q) / 2: the quantized
      branch's own gradient g_q = -(2 delta_24 - delta_32) / lr reaches the shared backbone,
      projector and predictor, and is not the float one (a stop-gradient anywhere in the
      quantized branch, or a branch with weights of its own, would fail this);
    * every step ran the one compiled program."""
    trainer, state = ssql
    trainer.recipe["weight_decay"] = 0.0
    data = views(1)
    before = [to_np(v) for v in trainer.trainable_variables]
    runs = {}
    try:
        for bits in ((32, 32), (8, 8), (2, 4)):
            restore(trainer, state)
            with pinned_bits(trainer, bits):
                logs = step(trainer, data)
            assert (logs["weight_bits"], logs["activation_bits"]) == bits
            assert trainer.last_bits == bits
            runs[bits] = (logs, [a - b for a, b in zip(trainable(trainer), before)])
    finally:
        trainer.recipe["weight_decay"] = RECIPE["weight_decay"]
    fp = runs[(32, 32)][0]["loss_fp"]
    for logs, _ in runs.values():
        np.testing.assert_allclose(logs["loss_fp"], fp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logs["loss"], (logs["loss_fp"] + logs["loss_q"]) / 2,
                                   rtol=1e-5, atol=1e-6)
        assert logs["lr"] == pytest.approx(LR)
    np.testing.assert_allclose(runs[(32, 32)][0]["loss_q"], fp, rtol=1e-5, atol=1e-6)
    q8, q24 = runs[(8, 8)][0]["loss_q"], runs[(2, 4)][0]["loss_q"]
    assert abs(q24 - q8) > 1e-3 and abs(q24 - fp) > 1e-3 and q8 != fp

    paths = [v.path for v in trainer.trainable_variables]
    g_fp = [-d / LR for d in runs[(32, 32)][1]]
    g_q = [-(2 * d24 - d32) / LR for d24, d32 in zip(runs[(2, 4)][1], runs[(32, 32)][1])]
    for part in ("resnet_bn_test", "projector", "predictor"):
        idx = [i for i, p in enumerate(paths) if p.startswith(part + "/")]
        assert idx, part
        n_fp, n_q, n_diff = (np.sqrt(sum(np.square(g[i]).sum() for i in idx))
                             for g in (g_fp, g_q, [a - b for a, b in zip(g_q, g_fp)]))
        assert n_q > 0.1 * n_fp and n_diff > 0.01 * n_fp, (part, n_fp, n_q, n_diff)
    if COMPILED:
        assert trainer.num_compilations == 1, trainer.compilation_report()


def test_drawn_bits_are_used_and_reuse_one_program(ssql):
    trainer, state = ssql
    restore(trainer, state)
    trainer.set_sampler_state({"bit_sampler": BitSampler(seed=0).get_state()})
    replay = BitSampler(seed=0)
    drawn = []
    for i in range(5):
        logs = step(trainer, views(10 + i))
        expected = replay.next()
        assert (logs["weight_bits"], logs["activation_bits"]) == expected
        assert trainer.last_bits == expected and np.isfinite(logs["loss"])
        drawn.append(expected)
    assert len(set(drawn)) >= 3   # different bit-widths ...
    if COMPILED:                  # ... one program
        assert trainer.num_compilations == 1, trainer.compilation_report()
    else:
        assert trainer.num_compilations == 0
    assert trainer.compiled_plans <= {None} and trainer.plans_seen == {None}


def test_weight_decay_is_pytorch_sgds_coupled_decay(ssql):
    """weight_decay_mode="l2": the logged loss is the SSQL loss alone, and the decay enters
    the gradient BEFORE the momentum (torch.optim.SGD): after one step from a zero velocity,
    velocity(wd) - velocity(0) = -lr wd w0 for every trainable variable (BatchNorm gains and
    offsets included). Keras' decoupled decay would leave the velocity untouched."""
    trainer, state = ssql
    out = {}
    try:
        for wd in (0.0, 0.1):
            restore(trainer, state)
            trainer.recipe["weight_decay"] = wd
            with pinned_bits(trainer, (4, 4)):
                logs = step(trainer, views(2))
            out[wd] = logs, [to_np(m) for m in trainer.optimizer.momentums]
    finally:
        trainer.recipe["weight_decay"] = RECIPE["weight_decay"]
    assert out[0.1][0]["loss"] == pytest.approx(out[0.0][0]["loss"], rel=1e-6, abs=1e-7)
    index = {id(v): i for i, v in enumerate(trainer.variables)}
    w0 = [state[index[id(v)]] for v in trainer.trainable_variables]
    for v, w, m0, m1 in zip(trainer.trainable_variables, w0, out[0.0][1], out[0.1][1]):
        np.testing.assert_allclose(m1 - m0, -LR * 0.1 * w, rtol=1e-3, atol=1e-6,
                                   err_msg=v.path)
    with pytest.raises(ValueError, match="would decay twice"):
        trainer.compile(optimizer=keras.optimizers.SGD(momentum=0.9, weight_decay=1e-4))
    assert trainer.optimizer.weight_decay is None   # the refused optimizer was not taken


def test_simsiam_step_equals_ssql_at_float_bits_and_an_independent_loss(ssql):
    """SimSiam and SSQL from the same weights: SimSiam's loss is the negative cosine of an
    independent forward (numpy on the eager model's z, p), and its step equals SSQL's step at
    float bit-widths (where L_q = L_fp); one program."""
    trainer, state = ssql
    restore(trainer, state)
    simsiam = make_trainer(SimSiam, seed=3)
    assert [v.shape for v in simsiam.variables + simsiam.optimizer.variables] == [
        v.shape for v in trainer.variables + trainer.optimizer.variables]
    restore(simsiam, state)   # the same architecture: the same variables, in order
    data = views(4)
    x = np.concatenate(list(data["global"]))
    z = simsiam.projector(simsiam.backbone(x, training=True)["pooled"], training=True)
    p = to_np(simsiam.predictor(z, training=True))
    z = to_np(z)
    expected = -(_np_cos(p[:4], z[4:]).mean() + _np_cos(p[4:], z[:4]).mean()) / 2
    restore(simsiam, state)   # the BN statistics the eager forward moved

    before = trainable(simsiam)
    logs = step(simsiam, data)
    assert set(logs) >= {"loss", "z_std", "lr", "grad_norm"} and "loss_q" not in logs
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-4, atol=1e-5)
    assert 0.0 < logs["z_std"] <= 1.0
    d_simsiam = [a - b for a, b in zip(trainable(simsiam), before)]
    with pinned_bits(trainer, (32, 32)):
        ssql_logs = step(trainer, data)
    np.testing.assert_allclose(ssql_logs["loss"], logs["loss"], rtol=1e-5, atol=1e-6)
    for a, b, v in zip(d_simsiam, [a - b for a, b in zip(trainable(trainer), before)],
                       simsiam.trainable_variables):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=v.path)
    step(simsiam, views(5))
    assert simsiam.num_compilations == (1 if COMPILED else 0)
    assert not hasattr(simsiam, "get_sampler_state")   # nothing host-side to checkpoint
    with pytest.raises(ValueError, match="trains on two views; the batch also has 2 local"):
        simsiam.views({"global": data["global"],
                       "local": np.zeros((2, 4, 16, 16, 3), "float32")})


def test_checkpoint_resume_gives_the_uninterrupted_weights_and_bits(ssql, tmp_path):
    """4 steps straight == 2 steps, a checkpoint, a FRESH trainer restored from it, 2 steps:
    the same weights, optimizer state and drawn bit-widths (the bit sampler's state is in the
    checkpoint)."""
    trainer, state = ssql
    batches = [views(20 + i) for i in range(4)]
    start = {"bit_sampler": BitSampler(seed=0).get_state()}

    def run(model, data):
        bits = []
        for d in data:
            logs = step(model, d)
            bits.append((logs["weight_bits"], logs["activation_bits"]))
        return bits

    restore(trainer, state)
    trainer.set_sampler_state(start)
    bits_straight = run(trainer, batches)
    final = snapshot(trainer)

    restore(trainer, state)
    trainer.set_sampler_state(start)
    bits_first = run(trainer, batches[:2])
    manager = CheckpointManager(tmp_path)
    path = manager.save(trainer, 1)
    saved = CheckpointManager.read_state(path)
    assert saved["host"]["sampler"]["bit_sampler"]["last"] == list(bits_first[-1])

    fresh = make_trainer(SSQL, seed=7)
    assert not np.allclose(to_np(fresh.trainable_variables[0]), state[0])
    manager.restore(fresh)
    assert fresh.host_step == 2
    bits_resumed = run(fresh, batches[2:])
    assert bits_first + bits_resumed == bits_straight
    for v, a, b in zip(fresh.variables + fresh.optimizer.variables, snapshot(fresh), final):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=v.path)
    if COMPILED:
        assert fresh.num_compilations == 1


def test_bad_bit_choices_and_recipe_keys_are_refused():
    from poa_keras.backbones import from_config_name

    backbone = from_config_name(BACKBONE)
    cases = {
        "weight_bits": ((1, 2), r"weight bit-widths 1 is not supported; valid: 2..8"),
        "activation_bits": ((4, 9), r"activation bit-widths 9 is not supported; valid: 2..8"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ValueError, match=rf"SSQL recipe .*{message}"):
            SSQL(backbone, dict(HEADS["projector"]), dict(HEADS["predictor"]),
                 recipe=dict(RECIPE, **{key: value}))
    with pytest.raises(ValueError, match="give at least one bit-width"):
        SSQL(backbone, dict(HEADS["projector"]), dict(HEADS["predictor"]),
             recipe=dict(RECIPE, weight_bits=()))
    with pytest.raises(ValueError, match=r"unknown recipe key 'weight_bit' \(did you mean "
                                         r"'weight_bits'\?\)"):
        SSQL(backbone, recipe=dict(RECIPE, weight_bit=(2, 4)))
    with pytest.raises(ValueError, match="weight_decay_mode must be one of"):
        SimSiam(backbone, recipe=dict(RECIPE, weight_decay_mode="adamw"))
    with pytest.raises(ValueError, match="the recipe needs 'epochs'"):
        SimSiam(backbone, recipe=dict(steps_per_epoch=2, batch_size=4))
    with pytest.raises(ValueError, match="predictor's dim 8 must equal the projector's out_dim"):
        SimSiam(backbone, projector=dict(out_dim=20, hidden_dim=8), predictor=dict(dim=8),
                recipe=RECIPE)


# ------------------------------------------------------------------------ recipes and runs

TINY = dict(
    method="ssql",
    backbone=dict(config=BACKBONE),
    head=dict(HEADS),
    data=dict(source="shapes", num_images=16, num_val=4, image_size=32, seed=0,
              steps_per_epoch=2, global_size=32),
    train=dict(epochs=2, batch_size=4, lr=0.05, weight_decay=5e-4, sampler_seed=3),
    checkpoint=dict(every_epochs=1, keep=3),
    seed=0,
)


def test_recipe_validation_of_the_two_view_methods():
    from poa_keras.pretrain import load_recipe, train_keys

    assert load_recipe(TINY)["method"] == "ssql"
    assert "weight_bits" in train_keys("ssql") and "weight_bits" not in train_keys("simsiam")
    assert "iter_num_scale" not in train_keys("ssql")
    cases = {
        "train.weight_bits=(1, 4)": "train.weight_bits: weight bit-widths 1 is not supported",
        "train.activation_bits=()": "train.activation_bits: activation bit-widths: give at "
                                    "least one bit-width",
        "train.weight_bits=4": "train.weight_bits must be a list of bit-widths, got 4",
        "train.momentum_teacher=0.9": "unknown recipe key train.momentum_teacher",
        "head.projector.hiden_dim=8": "head.projector.hiden_dim (did you mean "
                                      "head.projector.hidden_dim?)",
        "head.predictor.hidden_dim=0": "head.predictor.hidden_dim must be an integer >= 1",
        "head.out_dim=8": "unknown recipe key head.out_dim",
        "data.num_local=2": "data.num_local=2: ssql trains on the two global views only",
        "optimizer.name='adam'": "optimizer.name must be one of ['adamw', 'sgd']",
        "optimizer.beta_1=0.9": "unknown recipe key optimizer.beta_1; valid optimizer (sgd) "
                                "keys: ['momentum', 'name', 'nesterov']",
        "optimizer.momentum=1.5": "optimizer.momentum must be a number in [0, 1)",
        "train.weight_decay_mode='coupled'": "train.weight_decay_mode must be one of",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError) as error:
            load_recipe(TINY, [override])
        assert message in str(error.value), (override, str(error.value))
    simsiam = dict(TINY, method="simsiam", train=dict(TINY["train"]))
    simsiam["train"].pop("sampler_seed")
    assert load_recipe(simsiam)["method"] == "simsiam"
    with pytest.raises(ValueError, match=r"train.sampler_seed.*valid train \(SimSiam\) keys"):
        load_recipe(TINY, ["method='simsiam'"])


def test_the_ssql_paper_recipes_carry_the_papers_settings():
    """REFERENCE.md §5: CIFAR-10 ResNet-18 400 ep, batch 512, lr 0.05, wd 5e-4; ImageNet
    ResNet-50 100 ep, batch 256, lr 0.05, wd 1e-4; SGD 0.9, cosine to 0, no warmup, lr not
    scaled; RRC (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, flip, blur
    U(0.1, 2) p 0.5 on ImageNet only; weights 2..8, activations 4..8."""
    from poa_keras.pretrain import load_recipe

    cifar, imagenet = load_recipe("ssql_resnet18_cifar"), load_recipe("ssql_resnet50_in1k")
    for r, (config, epochs, batch, wd) in ((cifar, ("resnet18_cifar_bn", 400, 512, 5e-4)),
                                           (imagenet, ("resnet50_bn", 100, 256, 1e-4))):
        assert r["method"] == "ssql" and r["backbone"]["config"] == config
        t = r["train"]
        assert (t["epochs"], t["batch_size"], t["lr"], t["weight_decay"]) == (epochs, batch,
                                                                               0.05, wd)
        assert (t["lr_scaling"], t["warmup_epochs"], t["min_lr"]) == ("none", 0, 0.0)
        assert tuple(t["weight_bits"]) == tuple(range(2, 9))
        assert tuple(t["activation_bits"]) == tuple(range(4, 9))
        assert r["optimizer"] == {"name": "sgd", "momentum": 0.9}
        d = r["data"]
        assert (tuple(d["global_scale"]), tuple(d["color_jitter"]), d["jitter_prob"],
                d["grayscale_prob"], d["flip_prob"], d["num_local"]) == (
            (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0)
        lr = learning_rate_schedule(t, steps_per_epoch=10)
        assert len(lr) == 10 * epochs and lr[0] == 0.05 and lr[-1] < 1e-5
    assert tuple(cifar["data"]["blur_prob"]) == (0.0, 0.0, 0.0)
    assert (tuple(imagenet["data"]["blur_prob"]), tuple(imagenet["data"]["blur_sigma"])) == (
        (0.5, 0.5, 0.0), (0.1, 2.0))
    assert (cifar["data"]["source"], cifar["data"]["name"]) == ("tfds", "cifar10")


def _state(checkpoint):
    with open(os.path.join(checkpoint, "state.json")) as f:
        return json.load(f)


@pytest.mark.skipif(BACKEND != "torch", reason="the resume logic is backend-independent and "
                    "the in-process resume test runs on every backend; three runs in "
                    "subprocesses cost three compilations per compiled backend")
def test_ssql_run_killed_then_resumed_equals_the_uninterrupted_run(tmp_path):
    """The recipe runner with SSQL: a run SIGKILLed mid-epoch 2 and resumed ends with the
    weights, the bit sampler's state and the drawn bits of the uninterrupted run, and
    delivers the trained backbone as teacher/."""
    import h5py

    from poa_keras.pretrain import pretrain

    def arrays(checkpoint):
        with h5py.File(os.path.join(checkpoint, "state.weights.h5"), "r") as f:
            return {f"{g}/{k}": f[g][k][()] for g in f for k in f[g]}

    straight = pretrain(TINY, tmp_path / "straight", verbose=0)
    assert [h["epoch"] for h in straight.history] == [1, 2]
    assert straight.teacher is straight.trainer.backbone   # no EMA teacher
    from poa_keras import Backbone
    saved = Backbone.from_preset(str(tmp_path / "straight" / "teacher"))
    for a, b in zip(saved.weights, straight.trainer.backbone.weights):
        np.testing.assert_array_equal(to_np(a), to_np(b))

    run = tmp_path / "killed"
    # mid-epoch 2, after checkpoint 1; one torch thread as this module's process (same arithmetic)
    pretrain_killed_at_step(TINY, run, step=3, prelude="import torch; torch.set_num_threads(1)")
    manager = CheckpointManager(run / "checkpoints")
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["epoch_0001"]
    a, b = arrays(tmp_path / "straight" / "checkpoints" / "epoch_0001"), arrays(manager.latest())
    for key in a:   # up to the checkpoint, the killed run is the uninterrupted one
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    resumed = pretrain(TINY, run, verbose=0)
    assert resumed.resumed_from.endswith("epoch_0001")
    a = _state(tmp_path / "straight" / "checkpoints" / "epoch_0002")
    b = _state(manager.latest())
    assert a["host"] == b["host"] and (b["epoch"], b["step"]) == (2, 4)
    assert [(h["weight_bits"], h["activation_bits"]) for h in a["history"]] == [
        (h["weight_bits"], h["activation_bits"]) for h in b["history"]]
    a, b = arrays(tmp_path / "straight" / "checkpoints" / "epoch_0002"), arrays(manager.latest())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)

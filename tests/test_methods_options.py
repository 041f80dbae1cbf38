"""Per-variable optimisation and POA's options: lr multipliers and weight-decay exclusions in
PlannedTrainer (methods/base.py), layer decay / patch-embed multipliers and the ndim > 1 weight
decay of the teacher-student trainers (methods/dino.py), POA's last-layer freeze and iBOT
branch (methods/poa.py), the iBOT buffer losses (losses/ibot.py) and the masks of the data
pipeline (data/multicrop.py, data/masking.py).

Expected values come from numpy (the toy trainer's gradients and optimizer updates are written
out by hand), from hand-computed multiplier tables, or from differences between two runs of ONE
compiled program that differ only in a step value (weight decay, iBOT weight, lambda), whose
exact effect is known in closed form. The POA trainer is shared by the module and runs one fixed
subnet, so it compiles three programs: the plain plan, the iBOT plan, and the iBOT plan on a
batch without masks."""
import dataclasses
import types

import keras
import numpy as np
import pytest
from conftest import to_np

from poa_keras import ElasticViT
from poa_keras.data.masking import mask_batch, mask_upper_bound
from poa_keras.elastic.spec import ViTSubnet
from poa_keras.losses.ibot import (ibot_masked_token_loss, masked_sinkhorn_knopp,
                                   masked_token_positions)
from poa_keras.methods import DINO, POA
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.poa import POAPlan

BACKEND = keras.backend.backend()
COMPILED = BACKEND in ("jax", "tensorflow")


# ------------------------------------------------------------------------ toy: the mechanism
TOY_LR, TOY_WD = 0.1, 0.3


def toy_scale_at(step):
    return 0.25 if step % 2 == 0 else 1.5


class ToyLinear(PlannedTrainer):
    """loss = mean((x W + b - y)^2) + 0.5 |c|^2, with W (3, 2), b (2,), c (2,)."""

    def __init__(self, multipliers=None, no_decay=(), **kwargs):
        super().__init__(**kwargs)
        rng = np.random.default_rng(0)
        self.init = dict(W=rng.normal(0, 0.5, (3, 2)), b=rng.normal(0, 0.5, (2,)),
                         c=rng.normal(0, 0.5, (2,)))
        self.vars = {name: self.add_weight(shape=value.shape, initializer="zeros", name=name)
                     for name, value in self.init.items()}
        for name, value in self.init.items():
            self.vars[name].assign(value.astype("float32"))
        self.host = types.SimpleNamespace(multipliers=multipliers, no_decay=tuple(no_decay))

    def step_hyperparameters(self, step):
        return dict(learning_rate=TOY_LR, weight_decay=TOY_WD, scale=toy_scale_at(step))

    def lr_multipliers(self):
        m = self.host.multipliers
        return None if m is None else [m[name] for name in ("W", "b", "c")]

    def no_weight_decay_variables(self):
        return [self.vars[name] for name in self.host.no_decay]

    def compute_loss_and_logs(self, data, plan, training=True):
        x, y = (keras.ops.convert_to_tensor(t) for t in data)
        v = self.vars
        r = keras.ops.matmul(x, v["W"]) + v["b"] - y
        loss = keras.ops.mean(keras.ops.square(r)) + 0.5 * keras.ops.sum(keras.ops.square(v["c"]))
        return loss, {}


def toy_data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 2)).astype("float32")


def toy_grads(w, x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = x @ w["W"] + w["b"] - y
    n = r.size
    return dict(W=2.0 * x.T @ r / n, b=2.0 * r.sum(axis=0) / n, c=w["c"].copy())


def toy_multiplier(multipliers, name, step):
    m = 1.0 if multipliers is None else multipliers[name]
    if isinstance(m, tuple):
        m = m[0] * toy_scale_at(step)
    return m


def numpy_sgd(init, steps, multipliers, no_decay, x, y, first_step=0):
    """Keras SGD (decoupled decay w -= lr wd w, then w -= lr g) with each update scaled."""
    w = {k: v.astype(np.float64).copy() for k, v in init.items()}
    for step in range(first_step, first_step + steps):
        g = toy_grads(w, x, y)
        for name in w:
            decay = 0.0 if name in no_decay else TOY_WD
            delta = -TOY_LR * decay * w[name] - TOY_LR * g[name]
            w[name] = w[name] + toy_multiplier(multipliers, name, step) * delta
    return w


def numpy_adamw(init, steps, multipliers, no_decay, x, y, b1=0.9, b2=0.999, eps=1e-7):
    w = {k: v.astype(np.float64).copy() for k, v in init.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    for step in range(steps):
        g = toy_grads(w, x, y)
        t = np.float32(step + 1)
        # Keras forms 1 - beta ** t in float32 (1 - 0.999 loses 4 digits): so do we
        one = np.float32(1.0)
        alpha = float(np.float32(TOY_LR) * np.sqrt(one - np.float32(b2) ** t)
                      / (one - np.float32(b1) ** t))
        for name in w:
            decay = 0.0 if name in no_decay else TOY_WD
            decayed = w[name] - TOY_LR * decay * w[name]
            m[name] += (g[name] - m[name]) * (1 - b1)
            v2[name] += (g[name] ** 2 - v2[name]) * (1 - b2)
            new = decayed - alpha * m[name] / (np.sqrt(v2[name]) + eps)
            w[name] = w[name] + toy_multiplier(multipliers, name, step) * (new - w[name])
    return w


def toy_weights(model):
    return {name: to_np(v) for name, v in model.vars.items()}


MULTIPLIERS = dict(W=0.5, b=(2.0, "scale"), c=1.0)


def test_lr_multipliers_scale_each_update_exactly_sgd():
    """SGD with a constant multiplier (W), a step-value one (b: 2 * scale, 0.5 then 3) and none
    (c); b is also excluded from weight decay. Against numpy, and against the plain run:
    new - old = multiplier * (plain update) on the first step."""
    x, y = toy_data()
    plain = ToyLinear()
    plain.compile(optimizer=keras.optimizers.SGD(learning_rate=TOY_LR))
    scaled = ToyLinear(multipliers=MULTIPLIERS, no_decay=("b",))
    scaled.compile(optimizer=keras.optimizers.SGD(learning_rate=TOY_LR))
    init = dict(plain.init)
    plain.train_on_batch(x, y)
    scaled.train_on_batch(x, y)
    one_plain, one_scaled = toy_weights(plain), toy_weights(scaled)
    expected = numpy_sgd(init, 1, None, (), x, y)
    for name in init:
        np.testing.assert_allclose(one_plain[name], expected[name], rtol=1e-5, atol=1e-6)
    # old + m * delta(plain), with b's plain delta recomputed without its decay
    np.testing.assert_allclose(one_scaled["W"] - init["W"], 0.5 * (one_plain["W"] - init["W"]),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one_scaled["c"], one_plain["c"], rtol=1e-6, atol=1e-7)
    g_b = toy_grads({k: v.astype(np.float64) for k, v in init.items()}, x, y)["b"]
    np.testing.assert_allclose(one_scaled["b"] - init["b"], 2.0 * 0.25 * (-TOY_LR * g_b),
                               rtol=1e-5, atol=1e-7)
    for _ in range(3):  # the step value changes every step: still one program
        scaled.train_on_batch(x, y)
    expected = numpy_sgd(init, 4, MULTIPLIERS, ("b",), x, y)
    got = toy_weights(scaled)
    for name in init:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert scaled.num_compilations == (1 if COMPILED else 0)


def test_lr_multipliers_match_param_groups_for_adamw():
    """AdamW (decoupled decay inside the scaled update, moments of the unscaled step), two
    steps against numpy."""
    x, y = toy_data()
    model = ToyLinear(multipliers=MULTIPLIERS, no_decay=("b",))
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=TOY_LR))
    init = dict(model.init)
    for _ in range(2):
        model.train_on_batch(x, y)
    expected = numpy_adamw(init, 2, MULTIPLIERS, ("b",), x, y)
    got = toy_weights(model)
    for name in init:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_weight_decay_exclusions_survive_recompile():
    """Exclusions set before the first step, then again after compile() with a new optimizer
    and with the same (already built) one; the user's own exclusion (c) is kept."""
    x, y = toy_data()
    model = ToyLinear(no_decay=("b",))
    optimizer = keras.optimizers.SGD(learning_rate=TOY_LR)
    optimizer.exclude_from_weight_decay(var_list=[model.vars["c"]])
    model.compile(optimizer=optimizer)
    expected = dict(model.init)
    for step, new_optimizer in enumerate((None, "new", "same")):
        if new_optimizer == "new":
            optimizer = keras.optimizers.SGD(learning_rate=TOY_LR)
            model.compile(optimizer=optimizer)
        elif new_optimizer == "same":
            assert optimizer.built
            model.compile(optimizer=optimizer)
        no_decay = ("b", "c") if new_optimizer is None else ("b",)
        # iterations restart with a new optimizer: the step count is the optimizer's
        first = int(to_np(model.optimizer.iterations))
        model.train_on_batch(x, y)
        expected = numpy_sgd(expected, 1, None, no_decay, x, y, first_step=first)
        got = toy_weights(model)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"compile {step}: {name}")


def test_bad_multipliers_are_refused():
    x, y = toy_data()
    model = ToyLinear(multipliers=dict(W=1.0, b=(2.0, "no_such_value"), c=1.0))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=TOY_LR))
    with pytest.raises(KeyError, match="no_such_value"):
        model.train_on_batch(x, y)
    model = ToyLinear()
    model.lr_multipliers = lambda: [1.0, 2.0]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=TOY_LR))
    with pytest.raises(ValueError, match="2 entries for 3 trainable variables"):
        model.train_on_batch(x, y)


# ------------------------------------------------------------------- the teacher-student trainers
VIT = dict(image_size=16, patch_size=8, embed_dim=32, depth=2, head_dim=16, min_width=16,
           min_depth=1, use_mask_token=True)
HEADS = dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30))
PLAN = ViTSubnet(16, 1)
LR, WD = 0.05, 1.0
DECAY, PATCH = 0.5, 0.2
STEPS_PER_EPOCH = 10
FREEZE_STEPS, IBOT_START = 2, 4
RECIPE = dict(epochs=1, steps_per_epoch=STEPS_PER_EPOCH, batch_size=4, lr=LR,
              lr_scaling="none", min_lr=LR, warmup_epochs=0, warmup_teacher_temp_epochs=0,
              freeze_last_layer_epochs=FREEZE_STEPS / STEPS_PER_EPOCH, weight_decay=0.0,
              weight_decay_end=0.0, momentum_teacher=0.9, final_momentum_teacher=0.9,
              clip_grad=None, koleo_weight=0.0, layer_decay=DECAY, patch_embed_lr_mult=PATCH,
              ibot_weight=1.0, ibot_start_epoch=IBOT_START / STEPS_PER_EPOCH)


def expected_multiplier(path):
    """The layer-decay table for a depth-2 ViT, by hand: decay ** (3 - layer id)."""
    parts = path.split("/")
    if parts[0] != "student":
        return 1.0  # heads
    table = {"cls_token": DECAY ** 3, "pos_embed": DECAY ** 3, "mask_token": DECAY ** 3,
             "patch_embed": DECAY ** 3 * PATCH, "blocks_0": DECAY ** 2, "blocks_1": DECAY,
             "norm": 1.0}
    return table[parts[1]]


def test_dino_multipliers_and_weight_decay_exclusions():
    keras.utils.set_random_seed(2)
    backbone = ElasticViT(name="student", **VIT)
    recipe = {k: v for k, v in RECIPE.items() if k not in ("layer_decay", "patch_embed_lr_mult")}
    dino = DINO(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dim=20), recipe=recipe)
    variables = dino.trainable_variables
    assert dino.lr_multipliers() is None  # DINO's recipe: no layer decay
    dino.schedules = dataclasses.replace(dino.schedules, layer_decay=DECAY,
                                         patch_embed_lr_mult=PATCH)
    got = dict(zip([v.path for v in variables], dino.lr_multipliers()))
    assert got == pytest.approx({v.path: expected_multiplier(v.path) for v in variables})
    assert got["student/blocks_0/attn/qkv/dense/kernel"] == pytest.approx(0.25)
    assert got["student/patch_embed/proj/kernel"] == pytest.approx(0.025)
    excluded = {v.path for v in dino.no_weight_decay_variables()}
    assert excluded == {v.path for v in variables if len(v.shape) <= 1}
    assert "dino_head/last_layer/weight_v" not in excluded
    assert {"student/mask_token", "student/blocks_1/attn/qkv/dense/bias",
            "student/norm/norm/gamma"} <= excluded


def masks_for_batch(seed=0):
    masks = mask_batch(8, 2, 0.5, (0.1, 0.5), rng=seed, flat=True)   # 2B = 8 views, N = 4
    assert 0 < masks.sum() <= mask_upper_bound(8, 4)
    return masks.reshape(2, 4, 4)


def poa_batch(with_masks=True):
    rng = np.random.default_rng(0)
    data = {"global": rng.normal(size=(2, 4, 16, 16, 3)).astype("float32"),
            "local": rng.normal(size=(2, 4, 8, 8, 3)).astype("float32")}
    if with_masks:
        data["masks"] = masks_for_batch()
    return data


@pytest.fixture(scope="module")
def poa():
    keras.utils.set_random_seed(0)
    backbone = ElasticViT(name="student", **VIT)
    # every draw of this sampler is restored to its first: the one plan PLAN
    seed = next(s for s in range(100) if backbone.sampler(seed=s).next() == PLAN)
    trainer = POA(backbone, dict(HEADS), recipe=dict(RECIPE, sampler_seed=seed))
    # Random weights of a moderate scale (the init's 1e-6 cls token, zero biases and mask token
    # give gradients in the thousands), the teacher a copy of the student.
    rng = np.random.default_rng(5)
    for student, teacher in ((trainer.backbone, trainer.teacher_backbone),
                             (trainer.head, trainer.teacher_head)):
        for s, t in zip(student.weights, teacher.weights):
            value = rng.normal(0.0, 0.2, size=tuple(s.shape)).astype("float32")
            s.assign(value)
            t.assign(value)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=LR))
    state = types.SimpleNamespace(sampler=trainer.get_sampler_state(),
                                  weights=[to_np(v) for v in trainer.weights],
                                  schedules=trainer.schedules)
    return types.SimpleNamespace(trainer=trainer, start=state)


def run_step(poa, step, data, weight_decay=0.0, **recipe):
    """One POA step at the 0-based step count `step` from the module's initial state, with the
    given constant weight decay and recipe entries. Returns (logs, {path: weights after})."""
    trainer, start = poa.trainer, poa.start
    for v, w in zip(trainer.weights, start.weights):
        v.assign(w)
    trainer.optimizer.iterations.assign(step)
    trainer.set_sampler_state(start.sampler)
    total = start.schedules.total_steps
    trainer.schedules = dataclasses.replace(start.schedules,
                                            weight_decay=np.full(total, float(weight_decay)))
    saved = dict(trainer.recipe)
    trainer.recipe.update(recipe)
    try:
        logs = trainer.train_on_batch(data, return_dict=True)
    finally:
        trainer.recipe.clear()
        trainer.recipe.update(saved)
    logs = {k: float(v) for k, v in logs.items()}
    return logs, {v.path: to_np(v) for v in trainer.trainable_variables}


def test_weight_decay_on_ndim_above_one_with_layer_decay(poa):
    """Two runs of the same step that differ only in the weight decay (SGD, no clipping):
    after(wd) - after(0) = -multiplier * lr * wd * w0 for ndim > 1 variables, 0 otherwise."""
    data = poa_batch()
    step = FREEZE_STEPS  # past the freeze, before iBOT: the plain plan
    logs0, after0 = run_step(poa, step, data, weight_decay=0.0)
    logs1, after1 = run_step(poa, step, data, weight_decay=WD)
    assert poa.trainer.last_plan == poa.trainer.plan_for(PLAN)
    w0 = dict(zip([v.path for v in poa.trainer.weights], poa.start.weights))
    decayed = excluded = 0
    for path, a1 in after1.items():
        diff = a1 - after0[path]
        if len(a1.shape) <= 1:
            assert np.abs(diff).max() == 0.0, path
            excluded += 1
        else:
            expected = -expected_multiplier(path) * LR * WD * w0[path]
            np.testing.assert_allclose(diff, expected, rtol=2e-3,
                                       atol=2e-4 * np.abs(expected).max(), err_msg=path)
            assert np.abs(expected).max() > 0, path
            decayed += 1
    assert decayed >= 10 and excluded >= 10
    assert logs0["loss"] == logs1["loss"]  # the loss is computed before the update


def test_poa_last_layer_frozen_during_freeze_steps(poa):
    data = poa_batch()
    last = {v.path for v in poa.trainer.head.last_layer_variables()}
    assert len(last) == 4  # weight_v and (POA: trainable) weight_g of both heads
    w0 = dict(zip([v.path for v in poa.trainer.weights], poa.start.weights))
    for step in range(FREEZE_STEPS + 1):
        logs, after = run_step(poa, step, data, weight_decay=WD)
        assert (logs["width"], logs["depth"]) == (PLAN.width, PLAN.depth)
        assert poa.trainer.last_plan == poa.trainer.plan_for(PLAN)
        frozen = step < FREEZE_STEPS
        for path in last:
            moved = np.abs(after[path] - w0[path]).max()
            assert (moved == 0.0) if frozen else (moved > 1e-6), (step, path, moved)
        other = "projection_heads/head_0/mlp_2/kernel"
        assert np.abs(after[other] - w0[other]).max() > 1e-6
    if COMPILED:  # the freeze is a step value: no program of its own
        trainer = poa.trainer
        assert trainer.compiled_plans <= {trainer.plan_for(PLAN), trainer.plan_for(PLAN, True)}


def test_poa_ibot_branch(poa):
    data = poa_batch()
    # Before the start epoch: no iBOT, although the batch has masks.
    logs, _ = run_step(poa, IBOT_START - 1, data)
    assert poa.trainer.last_plan == poa.trainer.plan_for(PLAN) and logs["ibot"] == 0.0

    # From the start epoch: the iBOT plan, a finite positive term, part of the loss.
    logs, after_on = run_step(poa, IBOT_START, data)
    trainer = poa.trainer
    assert trainer.last_plan == trainer.plan_for(PLAN, ibot=True) and trainer.last_subnet == PLAN
    assert (logs["width"], logs["depth"]) == (PLAN.width, PLAN.depth)
    assert np.isfinite(logs["ibot"]) and logs["ibot"] > 0.0
    parts = sum(logs[k] for k in ("dino_intact", "dino_elastic", "same_view", "koleo", "ibot"))
    assert abs(logs["loss"] - parts) < 1e-4 * abs(logs["loss"])
    # The iBOT term is weighted by ibot_weight (a step value: same program).
    logs_half, _ = run_step(poa, IBOT_START, data, ibot_weight=0.5)
    assert logs_half["ibot"] == pytest.approx(0.5 * logs["ibot"], rel=1e-5)

    # Its gradient reaches the shared weights. lambda = 0: the elastic branch only, which runs
    # block 0 of the depth-1 subnet and never block 1; lambda = 1: the intact branch.
    # (SGD without clipping: the update is linear in ibot_weight; ibot_weight 2 vs 1 keeps the
    # plan, whereas 0 would switch the branch off.)
    def ibot_update(lam):
        _, on = run_step(poa, IBOT_START, data, lambda_ie=lam, ibot_weight=2.0)
        _, off = run_step(poa, IBOT_START, data, lambda_ie=lam, ibot_weight=1.0)
        return {p: on[p] - off[p] for p in on}

    elastic, intact = ibot_update(0.0), ibot_update(1.0)
    scale = max(np.abs(d).max() for d in elastic.values())
    assert scale > 0
    shared = ["student/blocks_0/attn/qkv/dense/kernel", "student/mask_token",
              "projection_heads/head_0/mlp_0/dense/kernel",
              "projection_heads/head_1/last_layer/weight_v"]
    for path in shared:
        assert np.abs(elastic[path]).max() > 1e-4 * scale, path
        assert np.abs(intact[path]).max() > 1e-4 * scale, path
    block1 = "student/blocks_1/mlp/fc1/dense/kernel"
    assert np.abs(elastic[block1]).max() <= 1e-6 * scale
    assert np.abs(intact[block1]).max() > 1e-4 * scale
    # the elastic student's width is 16: the mask token's channels past it get no gradient
    assert np.abs(elastic["student/mask_token"][PLAN.width:]).max() <= 1e-6 * scale

    # An iBOT step on a batch without masks: no iBOT branch (a retrace of the same plan).
    logs, _ = run_step(poa, IBOT_START, poa_batch(with_masks=False))
    assert trainer.last_plan == trainer.plan_for(PLAN, ibot=True) and logs["ibot"] == 0.0
    if COMPILED:
        assert trainer.compiled_plans == {trainer.plan_for(PLAN), trainer.plan_for(PLAN, True)}
        assert trainer.num_compilations == 3, trainer.compilation_report()


def test_poa_rejects_masks_of_the_wrong_shape(poa):
    data = poa_batch()
    data["masks"] = np.zeros((2, 4, 5), bool)
    with pytest.raises(ValueError, match=r"masks must have shape \(2, B, N\)"):
        poa.trainer.compute_loss_and_logs(data, POAPlan(PLAN, True))


def test_poa_ibot_patch_targets_with_centering():
    """centering="center": one patch center per head; targets from the old center, the new
    center the EMA of the mean teacher logit over the masked patches only."""
    keras.utils.set_random_seed(3)
    backbone = ElasticViT(name="student", **VIT)
    trainer = POA(backbone, dict(HEADS), recipe=dict(RECIPE, centering="center"))
    assert [tuple(c.shape) for c in trainer.ibot_centers] == [(1, 20), (1, 30)]
    rng = np.random.default_rng(6)
    c0 = rng.normal(size=(1, 20))
    center = trainer.ibot_centers[0]
    center.assign(c0.astype("float32"))
    logits = rng.normal(size=(6, 20))
    weights = np.array([0.5, 0.0, 0.5, 1.0, 0.0, 0.0])
    with trainer._step_scope({"teacher_temp": np.float32(0.07)}):
        probs = to_np(trainer.patch_targets(logits.astype("float32"),
                                            weights.astype("float32"), center))
    z = (logits - c0) / 0.07
    expected = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(-1, keepdims=True), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(to_np(center),
                               0.9 * c0 + 0.1 * logits[weights > 0].mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ iBOT buffer losses
def test_masked_token_positions_and_loss_match_the_dense_form():
    rng = np.random.default_rng(3)
    b, n, k = 6, 9, 7
    masks = rng.uniform(size=(b, n)) < 0.3
    masks[2] = False  # an image without masked patches
    teacher = rng.dirichlet(np.ones(k), size=(b, n))
    student = rng.normal(size=(b, n, k))
    size = int(masks.sum()) + 3
    indices, weights = masked_token_positions(masks, size)
    indices, weights = to_np(indices).astype(int), to_np(weights)
    flat = np.flatnonzero(masks.reshape(-1))
    np.testing.assert_array_equal(indices[:len(flat)], flat)    # every masked patch, in order
    per_image = np.maximum(masks.sum(axis=1), 1)
    np.testing.assert_allclose(weights[:len(flat)], 1.0 / per_image[flat // n], rtol=1e-6)
    np.testing.assert_array_equal(weights[len(flat):], 0.0)
    # dense reference: per image mean over its masked patches, then mean over all images
    log_q = student / 0.1 - np.log(np.exp(student / 0.1).sum(-1, keepdims=True))
    ce = -(teacher * log_q).sum(-1)
    dense = np.mean((ce * masks).sum(-1) / per_image)
    loss = ibot_masked_token_loss(teacher.reshape(b * n, k)[indices].astype("float32"),
                                  student.reshape(b * n, k)[indices].astype("float32"),
                                  weights, b)
    np.testing.assert_allclose(float(to_np(loss)), dense, rtol=1e-5)


def numpy_sinkhorn(logits, temp, iterations):
    """The reference's direct form on (M, K) logits: Q = exp(l / T)^T, ... (DINOv2)."""
    q = np.exp(logits / temp).T
    m, kk = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= kk
        q /= q.sum(axis=0, keepdims=True)
        q /= m
    return (q * m).T


def test_masked_sinkhorn_uses_the_masked_tokens_only():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(10, 6))
    weights = np.array([0.5, 0.0, 0.5, 1.0, 0.0, 0.25, 0.25, 0.25, 0.0, 0.25])
    valid = weights > 0
    got = to_np(masked_sinkhorn_knopp(logits.astype("float32"), weights.astype("float32"),
                                      0.5, 3))
    np.testing.assert_allclose(got[valid], numpy_sinkhorn(logits[valid], 0.5, 3), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_array_equal(got[~valid], 0.0)
    empty = to_np(masked_sinkhorn_knopp(logits.astype("float32"), np.zeros(10, "float32"),
                                        0.5, 3))
    assert np.all(empty == 0.0)   # no masked token at all: zeros, no NaN


# --------------------------------------------------------------------------------- the masks
def test_mask_upper_bound_by_hand_and_by_sampling():
    # 4 images, 2 masked; strata edges 0.1, 0.3, 0.5 of 16 patches: round(4.8) + round(8) = 13
    assert mask_upper_bound(4, 16, 0.5, (0.1, 0.5)) == 13
    assert mask_upper_bound(4, 16, 0.0, (0.1, 0.5)) == 0
    bound = mask_upper_bound(8, 16)
    totals = [mask_batch(8, 4, rng=seed).sum() for seed in range(200)]
    assert max(totals) <= bound
    assert max(totals) >= bound - 2    # and it is nearly reached


def test_multicrop_masks_shape_ratio_and_seed():
    from poa_keras.data.multicrop import multicrop_dataset

    images = (np.random.default_rng(0).uniform(size=(16, 40, 40, 3)) * 255).astype("uint8")

    def first_batches(**kwargs):
        ds = multicrop_dataset(images, 4, global_size=32, local_size=16, num_local=2, seed=3,
                               **kwargs)
        return list(ds.take(3).as_numpy_iterator())

    plain = first_batches()
    masked = first_batches(masks=True, mask_patch_size=8)
    again = first_batches(masks=True, mask_patch_size=8)
    assert "masks" not in plain[0]
    n = (32 // 8) ** 2
    for batch, base, same in zip(masked, plain, again):
        masks = batch["masks"]
        assert masks.shape == (2, 4, n) and masks.dtype == bool
        counts = masks.reshape(8, n).sum(axis=1)
        assert np.sum(counts > 0) == 4             # int(2B * 0.5) views masked
        assert counts[counts > 0].min() >= round(0.1 * n)
        assert counts.max() <= round(0.5 * n)
        assert counts.sum() <= mask_upper_bound(8, n)
        np.testing.assert_array_equal(masks, same["masks"])          # seeded
        np.testing.assert_array_equal(batch["global"], base["global"])  # views unchanged
    assert not np.array_equal(masked[0]["masks"], masked[1]["masks"])
    with pytest.raises(ValueError, match="mask_patch_size"):
        multicrop_dataset(images, 4, global_size=32, masks=True, mask_patch_size=7)
    with pytest.raises(ValueError, match="needs mask_patch_size"):
        multicrop_dataset(images, 4, global_size=32, masks=True)


def test_poa_without_elastic_student_is_the_intact_branch_alone(poa):
    """``elastic_student=False`` (the ablation of benchmarks/quality.py): the step of POA at
    lambda = 1 without the elastic branch -- the same loss, iBOT term and updated weights as
    the elastic trainer at lambda_ie = 1 (where the elastic terms have weight 0) -- and KoLeo of
    the intact student alone, checked against a brute-force numpy KoLeo."""
    from test_losses import np_koleo_brute_force

    keras.utils.set_random_seed(0)
    off = POA(ElasticViT(name="student", **VIT), dict(HEADS),
              recipe=dict(RECIPE, elastic_student=False, koleo_weight=0.0))
    assert off.sampler is None and off.get_sampler_state() is None and not off.runtime_depth
    assert [v.path for v in off.weights] == [v.path for v in poa.trainer.weights]
    off.compile(optimizer=keras.optimizers.SGD(learning_rate=LR))
    data = poa_batch()

    def off_step(step, **recipe):
        for v, w in zip(off.weights, poa.start.weights):
            v.assign(w)
        off.optimizer.iterations.assign(step)
        off.recipe.update(recipe)
        logs = off.train_on_batch(data, return_dict=True)
        return ({k: float(v) for k, v in logs.items()},
                {v.path: to_np(v) for v in off.trainable_variables})

    # iBOT phase, KoLeo off: equal to the elastic trainer at lambda = 1.
    ref_logs, ref_after = run_step(poa, IBOT_START, data, lambda_ie=1.0, koleo_weight=0.0)
    logs, after = off_step(IBOT_START, koleo_weight=0.0)
    assert off.last_plan == POAPlan(None, True) and "width" not in logs
    assert ref_logs["dino_elastic"] == 0.0 and ref_logs["same_view"] == 0.0
    for key in ("loss", "dino_intact", "ibot"):
        assert logs[key] == pytest.approx(ref_logs[key], rel=1e-5), key
    assert logs["dino_elastic"] == 0.0 and logs["same_view"] == 0.0 and logs["ibot"] > 0
    for path, value in ref_after.items():
        np.testing.assert_allclose(after[path], value, rtol=1e-4, atol=1e-6, err_msg=path)

    # KoLeo: the intact student's, summed over the two global views (weight 0.1).
    for v, w in zip(off.weights, poa.start.weights):
        v.assign(w)
    views = data["global"]
    cls = [to_np(off.backbone(views[i], training=True)["cls"]) for i in range(2)]
    expected = 0.1 * sum(np_koleo_brute_force(c) for c in cls)
    logs, _ = off_step(FREEZE_STEPS, koleo_weight=0.1)
    assert logs["koleo"] == pytest.approx(expected, rel=1e-4)

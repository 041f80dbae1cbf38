"""DINO and POA trainers (methods/dino.py, methods/poa.py) on a tiny elastic ViT.

The machine is slow to compile, so every trainer runs one fixed plan: POA's sampler state is
restored before each step (which also tests get/set_sampler_state), and the session shares one
trainer per method with the family contract (tests/family_contract.py: vit_poa, vit_dino)."""
import keras
import numpy as np
import pytest
from conftest import to_np
from family_contract import VIT_PLAN as PLAN
from family_contract import (VIT_TRAIN, restart_sampler, unchanged, vit_batch, vit_dino,
                             vit_poa)

from poa_keras import ElasticViT, ViTSubnet
from poa_keras.methods import POA

BACKEND = keras.backend.backend()
COMPILED = BACKEND in ("jax", "tensorflow")


def batch():
    return vit_batch()


def weights(variables):
    return [to_np(v) for v in variables]


def step(trainer, data):
    logs = trainer.train_on_batch(data, return_dict=True)
    return {k: float(v) for k, v in logs.items()}


@pytest.fixture(scope="module")
def poa():
    return vit_poa()


def poa_state(trainer):
    student = trainer.backbone.weights + trainer.head.weights
    teacher = trainer.teacher_backbone.weights + trainer.teacher_head.weights
    return student, teacher


def test_poa_step_teacher_ema_both_branches_and_plan(poa):
    data = batch()
    student_vars, teacher_vars = poa_state(poa)
    trainable = {id(v) for v in poa.trainable_variables}
    assert not any(id(v) in trainable for v in teacher_vars)
    s0, t0 = weights(student_vars), weights(teacher_vars)
    runs = {}
    for lam in (0.0, 1.0, 0.5):
        for v, w in zip(student_vars + teacher_vars, s0 + t0):
            v.assign(w)
        restart_sampler(poa)
        poa.recipe["lambda_ie"] = lam
        logs = step(poa, data)
        assert poa.last_subnet == PLAN and poa.last_plan == poa.plan_for(PLAN)
        assert (logs["width"], logs["depth"]) == (PLAN.width, PLAN.depth)
        runs[lam] = (logs, weights(student_vars), weights(teacher_vars))
    poa.recipe["lambda_ie"] = 0.8
    assert poa.num_compilations <= 1  # lambda is a step value: one program for the plan

    # Teacher: exactly the EMA of the intact student after the step (no gradient reached it).
    m = poa.schedules.at(0)["momentum"]
    _, s_after, t_after = runs[0.5]
    for a, b, s in zip(t_after, t0, s_after):
        np.testing.assert_allclose(a, m * b + (1 - m) * s, atol=1e-5)

    # SGD, no clipping: the update is linear in lambda, d(0.5) = (d(0) + d(1)) / 2.
    deltas = {lam: [a - b for a, b in zip(runs[lam][1], s0)] for lam in runs}
    scale = max(np.abs(d).max() for d in deltas[1.0])
    for d0, d1, dh in zip(deltas[0.0], deltas[1.0], deltas[0.5]):
        np.testing.assert_allclose(dh, (d0 + d1) / 2, atol=1e-3 * scale)
    # lambda = 0: only the elastic branch trains. It changes weights inside the subnet ...
    assert max(np.abs(d).max() for d in deltas[0.0]) > 1e-3 * scale
    for v, d0, d1 in zip(student_vars, deltas[0.0], deltas[1.0]):
        # ... and nothing outside it: the block the depth-1 subnet skips, the channels past w.
        if "blocks_1" in v.path and v.trainable:   # not the quantizers' (unused) ranges
            assert np.abs(d0).max() == 0.0, v.path
            assert np.abs(d1).max() > 0.0, v.path
        if "patch_embed" in v.path and len(v.shape) == 4:
            assert np.abs(d0[..., PLAN.width:]).max() == 0.0
            assert np.abs(d0[..., :PLAN.width]).max() > 0.0
    # ... so the elastic branch moves the shared weights: lambda = 0.5 differs from lambda = 1.
    assert any(np.abs(dh - d1).max() > 1e-2 * scale
               for dh, d1 in zip(deltas[0.5], deltas[1.0]))
    l0, l1 = runs[0.0][0], runs[1.0][0]
    assert l1["dino_elastic"] == 0.0 and l1["same_view"] == 0.0 and l0["dino_intact"] == 0.0


def test_poa_loss_decreases(poa):
    data = batch()
    losses = []
    for _ in range(6):
        restart_sampler(poa)
        logs = step(poa, data)
        losses.append(logs["loss"])
        assert abs(logs["loss"] - sum(logs[k] for k in ("dino_intact", "dino_elastic",
                                                        "same_view", "koleo"))) < 1e-4
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert poa.num_compilations <= 1, poa.compilation_report()


def test_poa_one_program_per_width_and_run_time_depth_equals_static_depth(poa):
    """DESIGN contract 6 on the micro ViT (widths 16, 32 x depths 1, 2; the sampler draws
    (16, 1), (16, 2), (32, 1)). The shared trainer runs the depth as a run-time block mask on
    JAX and TensorFlow (the plan is the width) and as a static plan on PyTorch; a trainer in the
    other mode (the run-time path forced on PyTorch, where its conditional runs eagerly) gives
    the same step. Over the whole grid: at most one program per width."""
    data = batch()
    with unchanged(poa):
        other = POA(ElasticViT(name="student", **VIT_TRAIN),
                    dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30)),
                    recipe=dict(poa.recipe), runtime_depth=not poa.runtime_depth)
        other.compile(optimizer=keras.optimizers.SGD(learning_rate=poa.recipe["lr"]))
        assert poa.runtime_depth == COMPILED and other.runtime_depth != poa.runtime_depth
        for a, b in zip(poa.weights, other.weights):
            b.assign(keras.ops.convert_to_numpy(a))   # a copy: JAX donates the buffers
        restart_sampler(poa)
        other.set_sampler_state(poa.get_sampler_state())
        a, b = step(poa, data), step(other, data)
        assert poa.last_subnet == other.last_subnet == PLAN
        runtime = poa if poa.runtime_depth else other
        assert runtime.last_plan == ViTSubnet(PLAN.width, VIT_TRAIN["depth"]) != PLAN
        assert (a["width"], a["depth"]) == (b["width"], b["depth"]) == (PLAN.width, PLAN.depth)
        for name in ("loss", "dino_intact", "dino_elastic", "same_view", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
        for x, y in zip(poa.weights, other.weights):
            np.testing.assert_allclose(to_np(x), to_np(y), rtol=1e-5, atol=1e-6,
                                       err_msg=x.path)

        seen = {PLAN}
        for _ in range(40):
            step(poa, data)
            seen.add(poa.last_subnet)
            if len(seen) == 3:
                break
        assert seen == {ViTSubnet(16, 1), ViTSubnet(16, 2), ViTSubnet(32, 1)}, seen
        if COMPILED:
            assert poa.compiled_plans == {ViTSubnet(16, 2), ViTSubnet(32, 2)}
            assert poa.num_compilations == 2, poa.compilation_report()
        else:
            assert poa.num_compilations == other.num_compilations == 0


@pytest.fixture(scope="module")
def dino():
    return vit_dino()


def test_dino_center_update(dino):
    data = batch()
    center0 = to_np(dino.center)
    g = keras.ops.convert_to_tensor(data["global"].reshape(8, 16, 16, 3))
    t_logits = to_np(dino.teacher_head(dino.teacher_backbone(g, training=False)["cls"]))
    step(dino, data)
    expected = 0.9 * center0 + 0.1 * t_logits.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(to_np(dino.center), expected, atol=1e-5)


def test_dino_loss_decreases(dino):
    data = batch()
    losses = [step(dino, data)["loss"] for _ in range(5)]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert dino.num_compilations <= 1

"""Mixed precision (issue 12 item 6): the trainers train under ``mixed_bfloat16`` on every
backend -- variables, the EMA teacher, the optimizer state and the losses stay float32 -- and
one step matches the float32 step of the same trainer; float16 computation (no loss scaling)
is refused with a clear error.

The float32 side is the micro ViT trainers the family contract and test_methods share (each
put back as it was with ``unchanged``); the bfloat16 side is built the same way under the
policy, so each backend compiles one more program per method."""
import keras
import numpy as np
import pytest
from conftest import to_np
from family_contract import (VIT_PLAN, VIT_RECIPE, VIT_TRAIN, dino_trainer, poa_trainer,
                             restart_sampler, train_step, unchanged, vit_batch, vit_dino,
                             vit_poa)

from poa_keras import ElasticViT
from poa_keras.methods import DINO

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per operation) and the
# student temperature (0.1) multiplies the features' rounding by 10 in the logits, so a loss
# of order 1 moves by about 0.01-0.02 (measured on the micro ViT: DINO 1.1 % on TensorFlow,
# under 1 % on JAX and PyTorch; POA under 0.1 %) and the SGD update (proportional to the
# gradient) by a few % (relative norm over every variable).
LOSS_RTOL, LOSS_ATOL = 1e-2, 3e-2
UPDATE_RTOL = 5e-2


def _under(policy, build):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(previous)


def _poa_bf16():
    keras.utils.set_random_seed(0)
    backbone = ElasticViT(name="student", **VIT_TRAIN)
    return poa_trainer(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30)),
                       dict(VIT_RECIPE, koleo_weight=0.0), VIT_PLAN)


def _update_error(before, after_f32, after_bf16):
    """|| d_bf16 - d_f32 || / || d_f32 || over every variable (d: the step's change)."""
    num = den = 0.0
    for w0, a, b in zip(before, after_f32, after_bf16):
        num += float(np.sum(((b - w0) - (a - w0)) ** 2))
        den += float(np.sum((a - w0) ** 2))
    return (num / den) ** 0.5


def test_poa_step_under_mixed_bfloat16_matches_float32():
    f32 = vit_poa()
    bf16 = _under("mixed_bfloat16", _poa_bf16)
    assert bf16.backbone.compute_dtype == "bfloat16" and bf16.head.compute_dtype == "bfloat16"
    assert {v.dtype for v in bf16.weights} == {"float32"}
    assert {v.dtype for v in bf16.teacher_backbone.weights} == {"float32"}
    data = vit_batch()
    with unchanged(f32):
        # the same initial weights (both were built from seed 0 as the same architecture)
        for a, b in zip(f32.weights, bf16.weights):
            b.assign(keras.ops.convert_to_numpy(a))   # a copy: JAX donates the buffers
        before = [to_np(v) for v in f32.weights]
        restart_sampler(f32)
        restart_sampler(bf16)
        logs32, logs16 = train_step(f32, data), train_step(bf16, data)
        after32 = [to_np(v) for v in f32.weights]
    after16 = [to_np(v) for v in bf16.weights]
    assert {v.dtype for v in bf16.optimizer.variables if "iteration" not in v.path} \
        <= {"float32"}
    for name in ("loss", "dino_intact", "dino_elastic", "same_view"):
        assert logs16[name] == pytest.approx(logs32[name], rel=LOSS_RTOL, abs=LOSS_ATOL), name
    error = _update_error(before, after32, after16)
    assert 0.0 < error < UPDATE_RTOL, error   # > 0: the bfloat16 step really ran in bfloat16


def test_dino_loss_under_mixed_bfloat16_matches_float32():
    f32 = vit_dino()

    def build():
        keras.utils.set_random_seed(1)
        return dino_trainer(ElasticViT(name="dino_student", **VIT_TRAIN))

    bf16 = _under("mixed_bfloat16", build)
    data = vit_batch()
    with unchanged(f32):
        for a, b in zip(f32.weights, bf16.weights):
            b.assign(keras.ops.convert_to_numpy(a))   # a copy: JAX donates the buffers
        logs32, logs16 = train_step(f32, data), train_step(bf16, data)
    assert bf16.center.dtype == "float32"
    assert logs16["loss"] == pytest.approx(logs32["loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
    assert logs16["loss"] != logs32["loss"]
    assert all(np.isfinite(to_np(v)).all() for v in bf16.weights)


def test_float16_is_refused_with_the_way_out():
    def build():
        backbone = ElasticViT(name="student", **VIT_TRAIN)
        trainer = DINO(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dim=20),
                       recipe=dict(VIT_RECIPE))
        trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3))
        return trainer

    trainer = _under("mixed_float16", build)
    with pytest.raises(ValueError, match=r"float16 .*mixed_float16.*loss scaling.*"
                                         r"mixed_bfloat16"):
        trainer.train_on_batch(vit_batch())

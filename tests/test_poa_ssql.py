"""POA x SSQL (methods/poa.py, ``quant_weight_bits``): the elastic student runs fake-quantized
at host-drawn bit-widths that are run-time values of the step, on the micro ViT."""
import json

import keras
import numpy as np
import pytest
from conftest import to_np
from family_contract import VIT_PLAN as PLAN
from family_contract import VIT_RECIPE, VIT_TRAIN, unchanged, vit_batch, vit_poa

from poa_keras import ElasticViT, ViTSubnet
from poa_keras.methods import POA

BACKEND = keras.backend.backend()
COMPILED = BACKEND in ("jax", "tensorflow")
HEADS = dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30))
QUANT = dict(quant_weight_bits=(2, 3, 4, 8), quant_activation_bits=(4, 8),
             quant_probability=0.5, quant_intact_probability=0.5, quant_seed=5)


def _trainer(**recipe):
    keras.utils.set_random_seed(0)
    trainer = POA(ElasticViT(name="student", **VIT_TRAIN), dict(HEADS),
                  recipe=dict(VIT_RECIPE, koleo_weight=0.0, **recipe))
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=VIT_RECIPE["lr"]))
    return trainer


@pytest.fixture(scope="module")
def quant_poa():
    return _trainer(**QUANT)


def _step(trainer, data):
    return {k: float(v) for k, v in trainer.train_on_batch(data, return_dict=True).items()}


def _pin(trainer, subnet, bits):
    """The next step runs ``subnet`` at ``bits``: the samplers are bypassed."""
    trainer.next_subnet = lambda: subnet
    trainer.next_bits = lambda: (bits, False)


def _unpin(trainer):
    for name in ("next_subnet", "next_bits"):
        trainer.__dict__.pop(name, None)


def test_float_step_equals_poa_and_quantized_step_changes_only_the_elastic_branch(quant_poa):
    plain = vit_poa()
    data = vit_batch()
    with unchanged(plain), unchanged(quant_poa):
        # both start from the fresh weights of this module's trainer: the shared plain trainer
        # may have been trained by other test files of this worker (a trained student's
        # same-view term can be nearly insensitive to the elastic branch)
        for a, b in zip(quant_poa.weights, plain.weights):
            b.assign(keras.ops.convert_to_numpy(a))
        start = [to_np(v) for v in quant_poa.weights]
        plain.next_subnet = lambda: PLAN
        try:
            reference = _step(plain, data)
        finally:
            plain.__dict__.pop("next_subnet")
        after_plain = [to_np(v) for v in plain.weights]
        runs = {}
        for bits in ((32, 32), (2, 4), (8, 8)):
            for v, w in zip(quant_poa.weights, start):
                v.assign(w)
            _pin(quant_poa, PLAN, bits)
            runs[bits] = (_step(quant_poa, data), [to_np(v) for v in quant_poa.weights])
        _unpin(quant_poa)
    logs, weights = runs[(32, 32)]
    assert (logs["weight_bits"], logs["activation_bits"]) == (32.0, 32.0)
    for name in ("loss", "dino_intact", "dino_elastic", "same_view"):
        assert logs[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name
    for x, y in zip(weights, after_plain):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    low, _ = runs[(2, 4)]
    assert (low["weight_bits"], low["activation_bits"]) == (2.0, 4.0)
    # the intact student and the teacher stay float: their term is unchanged
    assert low["dino_intact"] == pytest.approx(reference["dino_intact"], rel=1e-5)
    # the elastic student's terms see the 2-bit weights; 8/8 is much closer to float
    gap_low = abs(low["same_view"] - reference["same_view"])
    gap_8 = abs(runs[(8, 8)][0]["same_view"] - reference["same_view"])
    assert gap_low > 1e-4 and gap_low > 3 * gap_8, (gap_low, gap_8)
    # both branches share the weights: the quantized elastic branch moves the student
    assert max(np.abs(a - b).max() for a, b in zip(runs[(2, 4)][1], after_plain)) > 1e-7


def test_bits_are_run_time_values_one_program_per_width(quant_poa):
    data = vit_batch()
    seen_bits, seen_subnets, intact_bits = set(), set(), set()
    with unchanged(quant_poa):
        before = quant_poa.num_compilations
        for _ in range(12):
            logs = _step(quant_poa, data)
            bits = (logs["weight_bits"], logs["activation_bits"])
            seen_bits.add(bits)
            seen_subnets.add(quant_poa.last_subnet)
            if quant_poa.last_subnet == quant_poa.backbone.full_subnet:
                intact_bits.add(bits)
    assert (32.0, 32.0) in seen_bits and len(seen_bits) >= 3, seen_bits
    # the intact size runs only quantized (the float intact size is the intact student)
    assert intact_bits and (32.0, 32.0) not in intact_bits, intact_bits
    if COMPILED:
        # every plan is a width at the intact depth; the bit-widths never compile
        assert quant_poa.compiled_plans <= {ViTSubnet(16, 2), ViTSubnet(32, 2)}
        assert quant_poa.num_compilations == len(quant_poa.compiled_plans)
        assert quant_poa.num_compilations - before <= 2


def test_sampler_state_holds_the_bit_draws(quant_poa):
    state = json.loads(json.dumps(quant_poa.get_sampler_state()))
    assert set(state) == {"subnets", "bits", "intact_rng"}

    def draws(trainer, n=8):
        out = []
        for _ in range(n):
            trainer.next_plan()
            out.append((trainer.last_subnet, trainer._host.bits))
        return out

    expected = draws(quant_poa)
    other = _trainer(**dict(QUANT, quant_seed=99, sampler_seed=7))
    other.set_sampler_state(state)
    assert draws(other) == expected
    quant_poa.set_sampler_state(state)   # the shared trainer draws as before
    with pytest.raises(ValueError, match="has no bit draws"):
        other.set_sampler_state(vit_poa().get_sampler_state())


def test_bad_quantization_settings():
    with pytest.raises(ValueError, match="valid: 2..8"):
        _trainer(quant_weight_bits=(1, 4))
    with pytest.raises(ValueError, match="quant_probability=1.5 must lie in"):
        _trainer(quant_weight_bits=(4,), quant_probability=1.5)
    with pytest.raises(ValueError, match="needs elastic_student=True"):
        _trainer(quant_weight_bits=(4,), elastic_student=False)

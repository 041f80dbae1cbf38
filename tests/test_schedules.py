"""Schedules against their formulas (REFERENCE.md §1 "Schedules and recipe", §2 DINO), each
expected value written out here with math.cos / math.sqrt at chosen steps."""
import math

import numpy as np
import pytest

from poa_keras.methods.schedules import (DINO_DEFAULTS, Schedules, cosine_schedule, cosine_span,
                                         cosine_value, last_layer_lr_schedule,
                                         linear_warmup_schedule, momentum_schedule, scaled_lr,
                                         teacher_temp_schedule, weight_decay_multiplier,
                                         weight_decay_schedule)


def cos_formula(base, final, i, n):
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))


def test_cosine_without_warmup():
    s = cosine_schedule(1.0, 0.1, 100)
    assert s.shape == (100,) and s.dtype == np.float64
    assert s[0] == pytest.approx(1.0)
    assert s[50] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))  # = 0.55
    assert s[50] == pytest.approx(0.55)
    assert s[99] == pytest.approx(cos_formula(1.0, 0.1, 99, 100))
    assert s[99] != 0.1 and abs(s[99] - 0.1) < 1e-3  # one step short of final, as DINO
    assert np.all(np.diff(s) < 0)


def test_cosine_with_warmup():
    base, final, start, T, W = 4e-3, 2e-5, 1e-4, 200, 20
    s = cosine_schedule(base, final, T, warmup_steps=W, warmup_start=start)
    assert s[0] == pytest.approx(start)
    assert s[7] == pytest.approx(start + (base - start) * 7 / 19)  # np.linspace(start, base, W)
    assert s[W - 1] == pytest.approx(base)  # the last warmup step reaches base ...
    assert s[W] == pytest.approx(base)  # ... and the cosine starts from base
    assert s[W + 90] == pytest.approx(cos_formula(base, final, 90, T - W))  # the middle
    assert s[T - 1] == pytest.approx(cos_formula(base, final, T - 1 - W, T - W))


@pytest.mark.parametrize("truncate,total,warmup", [(0.78, 100, 10), (0.9, 90, 9), (0.78, 1000, 0)])
def test_truncated_cosine(truncate, total, warmup):
    base, final = 4e-3, 2e-5
    s = cosine_schedule(base, final, total, warmup_steps=warmup, truncate=truncate)
    n = math.floor(total / truncate) - warmup  # the full cosine, cut at `total`
    assert cosine_span(total, warmup, truncate) == n
    assert len(s) == total
    assert s[warmup] == pytest.approx(base)
    mid = (total - warmup) // 2
    assert s[warmup + mid] == pytest.approx(cos_formula(base, final, mid, n))
    last = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (total - 1 - warmup) / n))
    assert s[-1] == pytest.approx(last, rel=1e-12)
    assert s[-1] > final + 0.01 * (base - final)  # stays clear of min_lr
    assert s[-1] > cosine_schedule(base, final, total, warmup_steps=warmup)[-1]


def test_truncated_cosine_worked_example():
    # 100 steps, 10 warmup, iter_num_scale 0.78: the cosine spans int(100 / 0.78) - 10 = 118
    # steps and the run stops at its step 89.
    s = cosine_schedule(1.0, 0.0, 100, warmup_steps=10, truncate=0.78)
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 118)))
    assert s[-1] == pytest.approx(0.14177, abs=1e-5)


def test_cosine_value_matches_array_and_holds_past_the_end():
    args = (4e-3, 2e-5, 150)
    kwargs = dict(warmup_steps=15, warmup_start=0.0, truncate=0.78)
    s = cosine_schedule(*args, **kwargs)
    for step in (0, 1, 14, 15, 16, 80, 149):
        assert cosine_value(step, *args, **kwargs) == pytest.approx(s[step], rel=1e-12)
    assert cosine_value(10_000, *args, **kwargs) == pytest.approx(s[-1])


def test_weight_decay_and_momentum():
    T = 300
    wd = weight_decay_schedule(T)
    assert wd[0] == pytest.approx(0.04)
    assert wd[150] == pytest.approx(cos_formula(0.04, 0.4, 150, T))
    assert wd[-1] == pytest.approx(cos_formula(0.04, 0.4, T - 1, T))
    assert np.all(np.diff(wd) > 0)
    mom = momentum_schedule(T, truncate=0.78)  # POA: 0.992 -> 0.9999, truncated
    n = math.floor(T / 0.78)
    assert mom[0] == pytest.approx(0.992)
    assert mom[100] == pytest.approx(cos_formula(0.992, 0.9999, 100, n))
    assert mom[-1] == pytest.approx(cos_formula(0.992, 0.9999, T - 1, n))
    assert mom[-1] < 0.9999
    dino = momentum_schedule(T, 0.996, 1.0)
    assert dino[0] == pytest.approx(0.996) and dino[-1] == pytest.approx(
        cos_formula(0.996, 1.0, T - 1, T))


def test_teacher_temperature_warmup():
    W, T = 30, 100
    t = teacher_temp_schedule(T, W)
    assert t[0] == pytest.approx(0.04)
    assert t[10] == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert t[W - 1] == pytest.approx(0.07)
    assert np.all(t[W:] == 0.07) and len(t) == T
    # a warmup longer than the run is cut where the run ends
    short = teacher_temp_schedule(10, 30)
    assert len(short) == 10 and short[-1] == pytest.approx(0.04 + 0.03 * 9 / 29)
    np.testing.assert_array_equal(linear_warmup_schedule(1.0, 2.0, 0, 3), [2.0, 2.0, 2.0])


def test_last_layer_freeze():
    lr = cosine_schedule(1e-3, 1e-6, 50, warmup_steps=10)
    frozen = last_layer_lr_schedule(lr, 12)
    assert np.all(frozen[:12] == 0.0)
    np.testing.assert_array_equal(frozen[12:], lr[12:])
    assert lr[5] > 0  # the input is not modified


def test_scaled_lr():
    assert scaled_lr(0.004, 1600) == pytest.approx(0.004 * math.sqrt(1600 / 1024))  # 0.005
    assert scaled_lr(0.004, 1600) == pytest.approx(0.005)
    assert scaled_lr(0.004, 256, "sqrt", reference_batch=1024) == pytest.approx(0.002)
    assert scaled_lr(5e-4, 1024, "linear") == pytest.approx(5e-4 * 1024 / 256)  # DINO
    assert scaled_lr(1.5e-4, 4096, "linear", reference_batch=256) == pytest.approx(2.4e-3)
    assert scaled_lr(0.1, 64, "none") == 0.1
    with pytest.raises(ValueError, match="unknown lr scaling rule 'cube'"):
        scaled_lr(0.1, 64, "cube")


def test_weight_decay_multiplier():
    assert weight_decay_multiplier((16, 8)) == 1.0
    assert weight_decay_multiplier((8,)) == 0.0


def test_schedules_from_recipe():
    recipe = dict(epochs=20, steps_per_epoch=10, batch_size=1600, warmup_epochs=2,
                  warmup_teacher_temp_epochs=5, crops="ignored")
    s = Schedules.from_recipe(recipe)  # POA ViT defaults for the rest
    T, W, base = 200, 20, 0.004 * math.sqrt(1600 / 1024)
    n = math.floor(T / 0.78) - W
    assert s.total_steps == T
    assert s.at(0) == pytest.approx(dict(lr=0.0, last_layer_lr=0.0, weight_decay=0.04,
                                         momentum=0.992, teacher_temp=0.04))
    assert s.at(W - 1)["lr"] == pytest.approx(base)
    assert s.at(W + 50)["lr"] == pytest.approx(cos_formula(base, 2e-5, 50, n))
    assert s.at(9)["last_layer_lr"] == 0.0  # frozen for the first epoch
    assert s.at(10)["last_layer_lr"] == pytest.approx(s.at(10)["lr"]) and s.at(10)["lr"] > 0
    assert s.at(49)["teacher_temp"] == pytest.approx(0.07)
    last = s.at(T - 1)
    assert last["lr"] == pytest.approx(cos_formula(base, 2e-5, T - 1 - W, n))
    assert last["weight_decay"] == pytest.approx(
        cos_formula(0.04, 0.4, T - 1, math.floor(T / 0.78)))
    assert s.at(10 * T) == last  # held past the end
    assert (s.clip_grad, s.layer_decay, s.patch_embed_lr_mult) == (1.5, 0.9, 0.2)

    dino = Schedules.from_recipe(dict(epochs=20, batch_size=512), steps_per_epoch=5,
                                 defaults=DINO_DEFAULTS)  # 100 steps, 50 of warmup
    dino_base = 5e-4 * 512 / 256
    assert dino.at(0)["momentum"] == pytest.approx(0.996)
    assert dino.at(49)["lr"] == pytest.approx(dino_base)
    assert dino.at(99)["lr"] == pytest.approx(cos_formula(dino_base, 1e-6, 49, 50))
    assert dino.at(99)["momentum"] == pytest.approx(cos_formula(0.996, 1.0, 99, 100))
    assert dino.clip_grad == 3.0
    # iter_num_scale is accepted as the reference's name for truncate
    swin = Schedules.from_recipe(dict(epochs=10, steps_per_epoch=10, batch_size=1024,
                                      iter_num_scale=0.9, warmup_epochs=0))
    assert swin.at(99)["lr"] == pytest.approx(cos_formula(0.004, 2e-5, 99, 111))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer in \[0, "
                                         r"total_steps=10\], got 11"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="truncate"):
        cosine_schedule(1.0, 0.0, 10, truncate=1.5)
    with pytest.raises(ValueError, match="needs 'batch_size'"):
        Schedules.from_recipe(dict(epochs=1, steps_per_epoch=1))
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        cosine_value(-1, 1.0, 0.0, 10)

"""The collapse diagnostics of eval/collapse.py against brute-force numpy / scipy, and the rule
on the numbers of the one collapse we recorded
(benchmarks/results/quality_demo_torch_old_dino_baseline.jsonl)."""
import math

import numpy as np
import pytest
from scipy import stats

from poa_keras.eval.collapse import collapse_verdict, similarity_spread, teacher_entropy


def test_similarity_spread_matches_a_sorted_brute_force():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    k = 5
    expected = []
    for q in queries:
        sims = sorted((float(np.dot(q, b) / np.linalg.norm(q) / np.linalg.norm(b))
                       for b in bank), reverse=True)
        expected.append(sims[0] - sims[k - 1])
    assert similarity_spread(bank, queries, k) == pytest.approx(np.median(expected), rel=1e-9)
    # identical features: zero spread; k beyond the bank is clipped
    same = np.ones((4, 3))
    assert similarity_spread(same, same, k=10) == pytest.approx(0.0, abs=1e-12)


def test_teacher_entropy_matches_scipy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 10))
    temp = 0.5
    probs = np.exp(logits / temp) / np.exp(logits / temp).sum(axis=1, keepdims=True)
    expected = float(np.mean([stats.entropy(p) for p in probs]))
    got = teacher_entropy([logits, np.zeros((6, 4))], temp)
    assert got[0] == pytest.approx(expected, rel=1e-9)
    assert got[1] == pytest.approx(math.log(4), rel=1e-12)   # uniform


def test_collapse_rule_on_the_recorded_demo_runs():
    poa_full, old_dino_full, init_full = 0.176, 0.00222, 0.000967   # recorded spreads
    healthy = collapse_verdict(poa_full, [1.0, 1.2], [256, 512])
    assert not healthy["collapsed"] and healthy["reasons"] == []
    old = collapse_verdict(old_dino_full, [1.0], 512, reference_spread=poa_full)
    assert old["collapsed"] and "reference" in old["reasons"][0]
    assert old["spread_ratio"] == pytest.approx(old_dino_full / poa_full, rel=1e-3)
    assert collapse_verdict(init_full, reference_spread=poa_full)["collapsed"]
    # a seed-to-seed difference of a healthy teacher is no collapse
    assert not collapse_verdict(0.6 * poa_full, reference_spread=poa_full)["collapsed"]
    # ties, and a teacher output within 0.5 nats of uniform, without any reference
    assert collapse_verdict(5e-5)["collapsed"]
    near_uniform = collapse_verdict(0.2, [math.log(256) - 0.3], 256)
    assert near_uniform["collapsed"] and "uniform" in near_uniform["reasons"][0]
    assert not collapse_verdict(0.2, [math.log(256) - 0.7], 256)["collapsed"]


def test_collapse_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="num_prototypes"):
        collapse_verdict(0.1, [1.0, 2.0], [256])
    with pytest.raises(ValueError, match="reference_spread"):
        collapse_verdict(0.1, reference_spread=0.0)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        similarity_spread(np.ones(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match="same feature dimension"):
        similarity_spread(np.ones((3, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="teacher_temp"):
        teacher_entropy(np.ones((2, 3)), 0.0)

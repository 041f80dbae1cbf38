"""Subnet grid, block selection and the sampler against the reference rules."""
import json
from collections import Counter

import numpy as np
import pytest

from poa_keras.elastic import SubnetSampler, ViTSubnet, block_ids, grid_values, selection_weights
from poa_keras.backbones.vit import CONFIGS


def test_block_selection_12_of_24():
    assert block_ids(24, 12) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]


@pytest.mark.parametrize("max_depth", [4, 6, 12, 24, 32])
def test_block_selection_formula(max_depth):
    for depth in range(1, max_depth + 1):
        j = np.arange(depth)
        expected = np.floor((max_depth - 1) * j / max(depth - 1, 1)).astype(int).tolist()
        got = block_ids(max_depth, depth)
        assert got == expected
        assert got[0] == 0 and (depth == 1 or got[-1] == max_depth - 1)
        assert len(set(got)) == depth


def test_block_selection_rejects_bad_depth():
    with pytest.raises(ValueError, match=r"depth=0 must lie in \[1, 24\]"):
        block_ids(24, 0)


def test_vit_l_teacher_grid_has_143_subnets():
    cfg = CONFIGS["vit_l16_elastic"]
    widths = grid_values(cfg["min_width"], cfg["embed_dim"], cfg["head_dim"])
    depths = grid_values(cfg["min_depth"], cfg["depth"], 1)
    assert widths == [384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024]
    assert depths == list(range(12, 25))
    assert len(widths) * len(depths) == 143
    assert cfg["named_subnets"] == {"small": (384, 12), "base": (768, 12), "large": (1024, 24)}


def test_selection_weights_match_reference_rule():
    # Reference: ws, ds = linspace(scale, 1, n); count(i, j) = round(ws_i * ds_j). Written out
    # by hand for a 3 x 3 grid with scale 3: ws = ds = (3, 2, 1).
    expected = np.array([[9, 6, 3], [6, 4, 2], [3, 2, 1]])
    np.testing.assert_array_equal(selection_weights(3, 3, 3), expected)
    w = selection_weights(11, 13, 3)
    assert w.shape == (11, 13) and w[0, 0] == 9 and w[-1, -1] == 1
    assert (np.diff(w, axis=0) <= 0).all() and (np.diff(w, axis=1) <= 0).all()


def _grid_sampler(seed=0):
    specs = [ViTSubnet(w, d) for w in (32, 48, 64) for d in (2, 3, 4)]
    counts = selection_weights(3, 3, 3).reshape(-1)
    return specs, counts, SubnetSampler(specs, counts, exclude=[ViTSubnet(64, 4)], seed=seed)


def test_sampler_frequencies_match_reference_weights():
    specs, counts, sampler = _grid_sampler()
    n = 20000
    drawn = Counter(sampler.next() for _ in range(n))
    assert ViTSubnet(64, 4) not in drawn  # the intact network is never drawn
    total = counts[:-1].sum()
    for spec, count in zip(specs[:-1], counts[:-1]):
        p = count / total
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(drawn[spec] - n * p) <= 4 * sigma + 1, (spec, drawn[spec], n * p)


def test_sampler_cycles_through_a_permutation():
    specs, counts, sampler = _grid_sampler(seed=3)
    cycle = [sampler.next() for _ in range(len(sampler))]
    expected = Counter({s: c for s, c in zip(specs[:-1], counts[:-1])})
    assert Counter(cycle) == expected


def test_sampler_state_survives_save_and_restore(tmp_path):
    _, _, sampler = _grid_sampler(seed=7)
    for _ in range(17):
        sampler.next()
    sampler.save(tmp_path / "sampler.json")
    json.loads((tmp_path / "sampler.json").read_text())  # plain JSON, no pickle
    expected = [sampler.next() for _ in range(60)]  # crosses a reshuffle
    _, _, fresh = _grid_sampler(seed=99)
    fresh.restore(tmp_path / "sampler.json")
    assert [fresh.next() for _ in range(60)] == expected


def test_sampler_rejects_state_of_another_grid(tmp_path):
    _, _, sampler = _grid_sampler()
    sampler.save(tmp_path / "s.json")
    other = SubnetSampler([ViTSubnet(32, 2)], [3])
    with pytest.raises(ValueError, match="another subnet grid"):
        other.restore(tmp_path / "s.json")

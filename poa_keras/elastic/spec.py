"""Subnet specifications and the subnet grid of an elastic backbone.

A spec is a small frozen, hashable value: it can key a cache of compiled programs and travel
through a trainer as a static per-step "plan".
"""
from __future__ import annotations

import dataclasses

import numpy as np

from poa_keras.validation import check_integral


@dataclasses.dataclass(frozen=True, order=True)
class ViTSubnet:
    """A sub-network of an elastic ViT: the first `width` channels and `depth` of the blocks."""

    width: int
    depth: int

    def __post_init__(self):   # 64.5 is refused, not truncated; numpy ints become ints
        object.__setattr__(self, "width", check_integral(self.width, "width"))
        object.__setattr__(self, "depth", check_integral(self.depth, "depth"))

    def __str__(self):
        return f"ViTSubnet(width={self.width}, depth={self.depth})"


@dataclasses.dataclass(frozen=True, order=True)
class SwinSubnet:
    """A sub-network of an elastic Swin: base width `width` (stage i has width * 2**i channels,
    head dim fixed) and `depth` blocks in stage 3 (the only elastic stage depth)."""

    width: int
    depth: int

    def __post_init__(self):   # 64.5 is refused, not truncated; numpy ints become ints
        object.__setattr__(self, "width", check_integral(self.width, "width"))
        object.__setattr__(self, "depth", check_integral(self.depth, "depth"))

    def __str__(self):
        return f"SwinSubnet(width={self.width}, depth={self.depth})"


@dataclasses.dataclass(frozen=True, order=True)
class ResNetSubnet:
    """A sub-network of an elastic ResNet: `width` = the bottleneck mid width of stage 1 (stage
    i uses width * 2**i; block outputs are not elastic) and `depths` = blocks per stage."""

    width: int
    depths: tuple

    def __post_init__(self):
        object.__setattr__(self, "width", check_integral(self.width, "width"))
        object.__setattr__(self, "depths", tuple(check_integral(d, "every stage depth")
                                                 for d in self.depths))

    def __str__(self):
        return f"ResNetSubnet(width={self.width}, depths={self.depths})"


@dataclasses.dataclass(frozen=True, order=True)
class IntactSubnet:
    """The one "subnet" of a non-elastic backbone (BatchNorm ResNet, TinyViT): the intact
    network. It has no fields, so every IntactSubnet() is equal to every other."""

    def __str__(self):
        return "IntactSubnet()"


def block_ids(max_depth: int, depth: int) -> list[int]:
    """Blocks kept for `depth` of `max_depth`: floor((Lmax - 1) * j / (L - 1)), j = 0..L-1.

    Computed in exact integer arithmetic, so no float rounding can move a block.
    """
    if not 1 <= depth <= max_depth:
        raise ValueError(f"depth={depth} must lie in [1, {max_depth}]")
    if depth == 1:
        return [0]
    return [((max_depth - 1) * j) // (depth - 1) for j in range(depth)]


def grid_values(minimum: int, maximum: int, step: int) -> list[int]:
    """minimum, minimum + step, ..., maximum (both ends must lie on the grid)."""
    if minimum > maximum:
        raise ValueError(f"minimum {minimum} is larger than maximum {maximum}")
    if (maximum - minimum) % step:
        raise ValueError(f"{maximum} - {minimum} is not a multiple of the step {step}")
    return list(range(minimum, maximum + 1, step))


def selection_weights(num_widths: int, num_depths: int, net_select_scale: float) -> np.ndarray:
    """How many times each (width, depth) pair appears in the sampling list.

    ws and ds run linearly from `net_select_scale` down to 1 across widths and depths (smallest
    first), and pair (i, j) appears round(ws_i * ds_j) times: small nets are drawn more often.
    Returns an int array of shape (num_widths, num_depths).
    """
    ws = np.linspace(net_select_scale, 1, num_widths)
    ds = np.linspace(net_select_scale, 1, num_depths)
    return np.round(ws[:, None] * ds[None, :]).astype(np.int64)

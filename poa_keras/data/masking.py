"""Block-wise patch masks for masked-patch objectives (BEiT / iBOT / DINOv2 style), in numpy.

`block_mask` builds one (grid_h, grid_w) boolean mask (True = masked) out of random rectangles
whose aspect ratio is log-uniform in [min_aspect, 1/min_aspect], as BEiT's masking generator
does; unlike BEiT it then tops the mask up, patch by patch along its border, so that exactly
round(ratio * grid_h * grid_w) patches are masked (BEiT stops when no further block fits and
can fall short of the target).

`mask_batch` masks int(batch_size * mask_prob) images of a batch, with ratios spread evenly over
`ratio_range` (the i-th masked image draws its ratio from the i-th of as many equal sub-ranges),
leaves the others unmasked and shuffles the order, as iBOT / DINOv2 collate their masks.

`mask_upper_bound` is the most patches `mask_batch` can mask in a batch with given settings: a
trainer gathers the masked tokens into a buffer of that static size (DINOv2's "upperbound").

Everything random comes from `rng`: a numpy Generator, or an int seed, or None (fresh entropy).
"""
import math

import numpy as np


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _grid_hw(grid):
    if isinstance(grid, (int, np.integer)):
        return int(grid), int(grid)
    grid_h, grid_w = (int(g) for g in grid)
    return grid_h, grid_w


def block_mask(grid_h, grid_w, ratio, rng=None, min_block=4, max_block=None, min_aspect=0.3,
               attempts=10):
    """One block-wise mask.

    Args:
      grid_h, grid_w: the patch grid.
      ratio: fraction of patches to mask, in [0, 1]; exactly round(ratio * grid_h * grid_w)
        patches are masked.
      rng: numpy Generator, int seed or None.
      min_block: smallest block area in patches (BEiT/iBOT: 4).
      max_block: largest block area in patches (default: no limit beyond the target).
      min_aspect: block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect].
      attempts: tries per block before giving up on blocks and topping up patch by patch.

    Returns:
      bool array (grid_h, grid_w), True where a patch is masked.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {grid_h} x {grid_w}")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    rng = _as_rng(rng)
    total = grid_h * grid_w
    target = int(round(ratio * total))
    mask = np.zeros((grid_h, grid_w), bool)
    count = 0
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    while count < target:
        remaining = target - count
        if max_block is not None:
            remaining = min(remaining, max_block)
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min(min_block, remaining), remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= grid_h and 1 <= w <= grid_w):
                continue
            top = int(rng.integers(0, grid_h - h + 1))
            left = int(rng.integers(0, grid_w - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:   # never overshoot the target
                block[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < target:
        _top_up(mask, target - count, rng)
    return mask


def _top_up(mask, missing, rng):
    """Masks `missing` more patches, preferring unmasked neighbours of masked ones (so that the
    mask stays block-like), then any unmasked patch."""
    for _ in range(missing):
        free = ~mask
        grown = np.zeros_like(mask)
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(grown & free)
        if candidates.size == 0:
            candidates = np.flatnonzero(free)
        mask.flat[candidates[rng.integers(0, candidates.size)]] = True


def mask_batch(batch_size, grid, mask_prob=0.5, ratio_range=(0.1, 0.5), rng=None, flat=False,
               **block_kw):
    """Masks for a batch, iBOT / DINOv2 style.

    Args:
      batch_size: number of images B.
      grid: patch grid, an int (square) or (grid_h, grid_w).
      mask_prob: fraction of the images that get a mask: exactly int(B * mask_prob) of them.
      ratio_range: (low, high) masking ratios; the masked images' ratios are stratified over it.
      rng: numpy Generator, int seed or None.
      flat: return (B, grid_h * grid_w) (row-major patch order, as the iBOT loss takes it)
        instead of (B, grid_h, grid_w).
      **block_kw: passed to `block_mask` (min_block, max_block, min_aspect, attempts).

    Returns:
      bool array (B, grid_h, grid_w) (or (B, grid_h * grid_w) with flat=True); images without a
      mask are all False.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    low, high = (float(r) for r in ratio_range)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    rng = _as_rng(rng)
    grid_h, grid_w = _grid_hw(grid)
    num_masked = int(batch_size * mask_prob)
    edges = np.linspace(low, high, num_masked + 1)
    masks = np.zeros((batch_size, grid_h, grid_w), bool)
    for i in range(num_masked):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[i] = block_mask(grid_h, grid_w, ratio, rng, **block_kw)
    masks = masks[rng.permutation(batch_size)]
    return masks.reshape(batch_size, grid_h * grid_w) if flat else masks


def mask_upper_bound(batch_size, num_patches, mask_prob=0.5, ratio_range=(0.1, 0.5)):
    """The most patches `mask_batch(batch_size, grid, mask_prob, ratio_range)` can mask in one
    batch of `num_patches` patches per image: the i-th masked image draws its ratio below the
    upper edge of its stratum and `block_mask` masks exactly round(ratio * N) patches, so the
    total is at most sum_i round(edge_{i+1} * N) (DINOv2's collate "upperbound", which rounds
    down because its generator does).

    Returns:
      An int in [0, batch_size * num_patches].
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    low, high = (float(r) for r in ratio_range)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    num_masked = int(batch_size * mask_prob)
    edges = np.linspace(low, high, num_masked + 1)
    return int(sum(int(round(edge * num_patches)) for edge in edges[1:]))


# ----- MAE's per-image random masking ----------------------------------------------------------

def num_visible_patches(num_patches, mask_ratio):
    """MAE's number of visible (encoded) patches: ``int(num_patches * (1 - mask_ratio))`` (49
    of 196 at 0.75). The ratio must lie in (0, 1) and leave at least one patch visible."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float, np.floating)) \
            or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1) (MAE: 0.75), got {mask_ratio!r}")
    visible = int(int(num_patches) * (1.0 - float(mask_ratio)))
    if visible < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch of {num_patches} "
                         f"(int({num_patches} x (1 - {mask_ratio})) = 0): the largest ratio "
                         f"for {num_patches} patches is below {1 - 1 / int(num_patches):.4g}")
    return visible


def random_masking_noise(batch_size, num_patches, rng=None):
    """MAE's masking noise for one batch, (batch_size, num_patches) float32: per image a random
    permutation of 0..N-1 (the ranks of U[0, 1) noise, so that no two values tie: argsort then
    gives the same order on every backend). ``argsort(noise)[:, :K]`` are the visible patches
    (MAE's ``ids_shuffle`` rule: the K lowest noise values), every image its own."""
    rng = _as_rng(rng)
    noise = rng.random((int(batch_size), int(num_patches)))
    return np.argsort(np.argsort(noise, axis=1), axis=1).astype("float32")

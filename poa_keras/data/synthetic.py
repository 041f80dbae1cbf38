"""An embedded, procedurally generated image dataset: coloured shapes on textured backgrounds.

`make_shapes(n)` draws `n` labelled RGB images in numpy (no download, no files), deterministic by
seed, at any resolution. It is the default data set for demos, recipes and tests: large enough
for self-supervised learning to show (the class is carried by the SHAPE only), small enough to
generate in seconds (10k images of 64 x 64: about 4 s on one core; 10k of 32 x 32: about 1 s).

What varies per image, independently of the class:
  - colours (``palette``): "light_on_dark" (the default) draws the foreground uniformly in
    [0.55, 1]^3 and the background base colour in [0, 0.45]^3 -- random tints, but the shape is
    always the lighter part; "any" draws the foreground uniformly in RGB and the background at
    least 0.35 away from it in every channel (modulo 1), so the shape may be lighter or darker
    in each channel. Either way colour alone says nothing about the class. "any" is much
    harder for small networks (measured, 32 x 32 images, 300 steps: a supervised ViT reaches
    25 % val accuracy on "any" vs 48 % on "light_on_dark"; a randomly initialised ViT's CLS
    k-NN 13 % vs 24 %), and self-supervised pretraining of the CPU demo only shows on
    "light_on_dark";
  - background: one of smooth noise, stripes (random frequency, angle, phase) or a linear
    gradient around the base colour, plus a little pixel noise;
  - size (circumradius 0.20-0.36 of the image side), position (the shape stays mostly
    inside), rotation (uniform, 0-360 degrees), a mild linear shading of the foreground.

Images are uint8 (N, H, W, 3) in [0, 255] (divide by 255 for floats in [0, 1]); labels are
int32 (N,) in [0, num_classes); classes are balanced (counts differ by at most one). Labels are
meant for evaluation (k-NN, linear probe), never for the self-supervised training itself.
"""
import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart",
                 "bar", "semicircle")
BACKGROUNDS = ("noise", "stripes", "gradient")
PALETTES = ("light_on_dark", "any")

_CHUNK_PIXELS = 1 << 19   # pixels rendered at once (128 images of 64 x 64): cache-friendly
_NOISE_GRID = 6           # resolution of the smooth background noise before upsampling
_TEXTURE_AMP = 0.15       # background texture amplitude around the base colour
_MIN_CONTRAST = 0.35      # smallest per-channel distance between foreground and base background


# ----- signed distance fields ------------------------------------------------------------------
# Each takes rotated, centred pixel coordinates u, v (n, H, W) and the circumradius r (n, 1, 1)
# in pixels, and returns (approximately) the signed distance to the outline in pixels: negative
# inside. Anti-aliasing then comes for free: coverage = clip(0.5 - d, 0, 1).

def _box(u, v, half_u, half_v):
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _polygon(u, v, r, sides):
    apothem = r * np.cos(np.pi / sides)
    d = None
    for k in range(sides):
        theta = 2.0 * np.pi * k / sides
        dk = u * np.float32(np.cos(theta)) + v * np.float32(np.sin(theta)) - apothem
        d = dk if d is None else np.maximum(d, dk)
    return d


def _circle(u, v, r):
    return np.sqrt(u * u + v * v) - r


def _square(u, v, r):
    half = 0.78 * r
    return _box(u, v, half, half)


def _triangle(u, v, r):
    return _polygon(u, v, 1.1 * r, 3)


def _star(u, v, r, points=5, inner=0.45):
    # Fold the plane into the wedge between a tip (angle 0) and a valley (angle pi/points); the
    # outline there is the straight edge from the tip (1, 0) to the valley, in units of r.
    wedge = np.pi / points
    theta = np.arctan2(v, u)
    phi = np.abs(np.mod(theta + wedge, 2.0 * wedge) - wedge)
    rad = np.sqrt(u * u + v * v)
    tip = np.array([1.0, 0.0])
    valley = inner * np.array([np.cos(wedge), np.sin(wedge)])
    edge = valley - tip
    normal = np.array([-edge[1], edge[0]])   # points away from the centre
    normal /= np.linalg.norm(normal)
    offset = float(normal @ tip)
    return (rad * (np.cos(phi) * np.float32(normal[0]) + np.sin(phi) * np.float32(normal[1]))
            - np.float32(offset) * r)


def _cross(u, v, r):
    arm, half_width = 0.95 * r, 0.3 * r
    return np.minimum(_box(u, v, arm, half_width), _box(u, v, half_width, arm))


def _ring(u, v, r):
    return np.abs(np.sqrt(u * u + v * v) - 0.75 * r) - 0.25 * r


def _crescent(u, v, r):
    outer = _circle(u, v, r)
    bite = _circle(u - 0.45 * r, v, 0.8 * r)
    return np.maximum(outer, -bite)


def _heart(u, v, r):
    # A square on its corner with two half-discs on its upper sides, centred on the origin.
    side = r
    half_diag = side / np.sqrt(2.0)
    v = v + 0.073 * r  # centre the whole outline vertically
    a = (u + v) / np.sqrt(2.0)
    b = (v - u) / np.sqrt(2.0)
    diamond = _box(a, b, side / 2, side / 2)
    lobe_v = -half_diag / 2                    # the upper sides' midpoints (v points down)
    left = _circle(u + half_diag / 2, v - lobe_v, side / 2)
    right = _circle(u - half_diag / 2, v - lobe_v, side / 2)
    return np.minimum(diamond, np.minimum(left, right))


def _bar(u, v, r):
    return _box(u, v, r, 0.28 * r)


def _semicircle(u, v, r):
    v = v - 0.42 * r   # the flat side at v = 0.42 r, the round side reaching v = -0.58 r
    return np.maximum(np.sqrt(u * u + v * v) - r, v)


_SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star,
           "cross": _cross, "ring": _ring, "crescent": _crescent, "heart": _heart, "bar": _bar,
           "semicircle": _semicircle}


# ----- rendering -------------------------------------------------------------------------------

def _interp_matrix(size, grid):
    """(size, grid) linear-interpolation weights that upsample `grid` samples to `size` pixels."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _draw_params(rng, num_images, size, num_classes, palette="light_on_dark"):
    """Every random choice of every image, drawn at once so that chunking does not matter."""
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int32)
    radius = rng.uniform(0.20, 0.36, num_images) * size
    margin = 0.9 * radius
    p = dict(
        labels=labels,
        radius=radius,
        cy=rng.uniform(margin, size - margin),
        cx=rng.uniform(margin, size - margin),
        angle=rng.uniform(0.0, 2.0 * np.pi, num_images),
        fg=rng.uniform(0.0, 1.0, (num_images, 3)),
        bg_offset=rng.uniform(_MIN_CONTRAST, 1.0 - _MIN_CONTRAST, (num_images, 3)),
        bg_kind=rng.integers(0, len(BACKGROUNDS), num_images),
        tex_colour=rng.uniform(-1.0, 1.0, (num_images, 3)),
        tex_angle=rng.uniform(0.0, 2.0 * np.pi, num_images),
        stripe_freq=rng.uniform(1.5, 5.0, num_images),      # cycles per image side
        stripe_phase=rng.uniform(0.0, 2.0 * np.pi, num_images),
        noise_grid=rng.uniform(-1.0, 1.0, (num_images, _NOISE_GRID, _NOISE_GRID)),
        shade_angle=rng.uniform(0.0, 2.0 * np.pi, num_images),
        shade_amp=rng.uniform(0.0, 0.25, num_images),
    )
    if palette == "any":
        p["bg"] = np.mod(p["fg"] + p["bg_offset"], 1.0)  # >= 0.35 from fg in every channel
    else:
        # Same stream consumption as "any" up to here (fg and bg_offset are redrawn from the
        # uniforms above by an affine map), so the shapes, sizes and textures do not change.
        p["fg"] = 0.55 + 0.45 * p["fg"]
        p["bg"] = 0.45 * (p["bg_offset"] - _MIN_CONTRAST) / (1.0 - 2.0 * _MIN_CONTRAST)
    return p


def _render_chunk(p, sl, size, class_names, noise_rng):
    f32 = np.float32
    n = sl.stop - sl.start
    take = {k: np.asarray(v[sl]) for k, v in p.items()}
    ys = (np.arange(size, dtype=f32) + 0.5)[None, :, None]
    xs = (np.arange(size, dtype=f32) + 0.5)[None, None, :]
    col = lambda a: a.astype(f32)[:, None, None]  # noqa: E731  (n,) -> (n, 1, 1)

    # Background: base colour + a scalar texture wave (n, H, W) along a colour direction.
    t_cos, t_sin = col(np.cos(take["tex_angle"])), col(np.sin(take["tex_angle"]))
    proj = (xs * t_cos + ys * t_sin) / f32(size)                        # (n, H, W), ~[-1.4, 1.4]
    wave = np.empty((n, size, size), f32)
    kinds = take["bg_kind"]
    for kind, name in enumerate(BACKGROUNDS):
        idx = np.nonzero(kinds == kind)[0]
        if idx.size == 0:
            continue
        if name == "noise":   # bilinear upsampling of a coarse random grid: M @ grid @ M^T
            m = _interp_matrix(size, _NOISE_GRID)
            w = m @ take["noise_grid"][idx].astype(f32) @ m.T
            w /= np.maximum(np.abs(w).max(axis=(1, 2), keepdims=True), 1e-6)
        elif name == "stripes":
            w = np.sin(f32(2.0 * np.pi) * col(take["stripe_freq"][idx]) * proj[idx]
                       + col(take["stripe_phase"][idx]))
        else:  # gradient: -1 .. 1 across the image along tex_angle
            q = proj[idx]
            lo = q.min(axis=(1, 2), keepdims=True)
            hi = q.max(axis=(1, 2), keepdims=True)
            w = 2.0 * (q - lo) / np.maximum(hi - lo, 1e-6) - 1.0
        wave[idx] = w
    # In-place arithmetic from here on: the (n, H, W, 3) passes dominate the run time.
    image = wave[..., None] * (f32(_TEXTURE_AMP) * take["tex_colour"].astype(f32))[:, None, None]
    image += take["bg"].astype(f32)[:, None, None, :]

    # Foreground: signed distance of the rotated, centred coordinates, grouped by class.
    dy, dx = ys - col(take["cy"]), xs - col(take["cx"])
    c, s = col(np.cos(take["angle"])), col(np.sin(take["angle"]))
    u = dx * c + dy * s
    v = -dx * s + dy * c
    r = col(take["radius"])
    dist = np.empty((n, size, size), f32)
    for k, name in enumerate(class_names):
        idx = np.nonzero(take["labels"] == k)[0]
        if idx.size:
            dist[idx] = _SHAPES[name](u[idx], v[idx], r[idx])
    coverage = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
    # Linear shading 1 + amp * (d . direction) / r, built from a row part and a column part.
    shade_x = dx * col(take["shade_amp"] * np.cos(take["shade_angle"]) / take["radius"])
    shade_y = dy * col(take["shade_amp"] * np.sin(take["shade_angle"]) / take["radius"])
    shade = (1.0 + shade_x) + shade_y
    fg = shade[..., None] * take["fg"].astype(f32)[:, None, None, :]
    fg -= image
    fg *= coverage
    image += fg
    # A little grey pixel noise (one value per pixel: generating it per channel costs 3x).
    image += (noise_rng.random((n, size, size, 1), dtype=f32) - f32(0.5)) * f32(0.07)
    image *= f32(255.0)
    np.rint(image, out=image)
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


def make_shapes(num_images, image_size=64, seed=0, classes=SHAPE_CLASSES,
                palette="light_on_dark"):
    """Generates the shapes data set.

    Args:
      num_images: how many images.
      image_size: side of the square images in pixels (any size >= 8; default 64).
      seed: int; the same (num_images, image_size, seed, classes) gives identical arrays.
      classes: which shapes to use, a subset of `SHAPE_CLASSES` (label k = classes[k]).
      palette: "light_on_dark" (default) or "any", see the module docstring.

    Returns:
      images: uint8 (num_images, image_size, image_size, 3), values 0..255.
      labels: int32 (num_images,), balanced over the classes.
      class_names: tuple of str, the name of each label.
    """
    num_images = int(num_images)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    size = int(image_size)
    if size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    class_names = tuple(classes)
    unknown = [c for c in class_names if c not in _SHAPES]
    if unknown or not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes}")
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {PALETTES}, got {palette!r}")
    rng = np.random.default_rng(seed)
    params = _draw_params(rng, num_images, size, len(class_names), palette)
    # Pixel noise comes from its own stream, consumed chunk by chunk in order.
    noise_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1])
    images = np.empty((num_images, size, size, 3), np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, num_images, chunk):
        sl = slice(start, min(start + chunk, num_images))
        images[sl] = _render_chunk(params, sl, size, class_names, noise_rng)
    return images, params["labels"], class_names


def train_val_split(images, labels, val_fraction=0.2, seed=0):
    """Stratified split: each class gives round(val_fraction * its count) images to validation.

    Returns ((train_images, train_labels), (val_images, val_labels)); the order inside each part
    is shuffled (by `seed`).
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    val_idx, train_idx = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == k)[0])
        n_val = int(round(val_fraction * idx.size))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train_idx = rng.permutation(np.concatenate(train_idx)) if train_idx else np.zeros(0, int)
    val_idx = rng.permutation(np.concatenate(val_idx)) if val_idx else np.zeros(0, int)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def load_shapes(num_train=10_000, num_val=2_000, image_size=64, seed=0, classes=SHAPE_CLASSES,
                palette="light_on_dark"):
    """The shapes data set, split: ((x_train, y_train), (x_val, y_val), class_names).

    Generates num_train + num_val images with `make_shapes` and splits them stratified, so both
    parts come from the same distribution and are balanced (the split sizes can differ from
    num_train / num_val by the per-class rounding, at most num_classes / 2).
    """
    total = int(num_train) + int(num_val)
    images, labels, names = make_shapes(total, image_size=image_size, seed=seed, classes=classes,
                                        palette=palette)
    train, val = train_val_split(images, labels, val_fraction=num_val / max(total, 1), seed=seed)
    return train, val, names

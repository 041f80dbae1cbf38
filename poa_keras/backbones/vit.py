"""ElasticViT: a DINOv2-style Vision Transformer whose every (width, depth) sub-network can be run
by slicing (``model(x, subnet=spec)``) or extracted as a standalone ViT (``model.extract(spec)``).

Layout: patch embedding (strided conv) -> [mask token] -> cls token -> learned position
embedding (bicubic-interpolated for other input sizes) -> pre-norm blocks (optional LayerScale,
stochastic depth) -> final LayerNorm. Images are channels-last (B, H, W, C).
"""
from __future__ import annotations

import functools
import math
import re

import keras
import numpy as np
from keras import ops

from poa_keras.backbones.base import Backbone, layer_decay_multiplier
from poa_keras.elastic.layers import (ElasticBlock, ElasticLayerNorm, ElasticPatchEmbed,
                                      HostInitializer)
from poa_keras.elastic.position import sincos_position_embedding  # noqa: F401 (public here too)
from poa_keras.elastic.spec import ViTSubnet, block_ids, grid_values, selection_weights
from poa_keras.validation import image_hw


def _cubic(d, a=-0.75):
    """Keys' cubic convolution kernel (a = -0.75 as torch's bicubic) at distance |d|."""
    d = abs(d)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


#: How the position embedding is resized to another grid (``pos_embed_resize``):
#: "size": bicubic to the target size, torch's ``interpolate(size=...)`` (source step g_in /
#: g_out); "dino": the rule of the DINO, DINOv2 and POA code, ``interpolate(scale_factor=(g_out
#: + 0.1) / g_in)``, whose source step is g_in / (g_out + 0.1) (REFERENCE.md §5b, flag).
POS_EMBED_RESIZE_RULES = ("size", "dino")
DINO_INTERPOLATE_OFFSET = 0.1


def pos_embed_scale(size_out: int, size_in: int, rule: str = "size") -> float:
    """The source step per output sample of a position-embedding resize under ``rule``."""
    if rule == "size":
        return size_in / size_out
    if rule == "dino":
        return size_in / (size_out + DINO_INTERPOLATE_OFFSET)
    raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZE_RULES}, got {rule!r}")


#: The position embeddings an ElasticViT can have (``pos_embed``).
POS_EMBED_KINDS = ("learned", "sincos")


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(size_out: int, size_in: int, scale: float | None = None) -> np.ndarray:
    """(size_out, size_in) matrix M such that M @ v is v resized bicubically.

    Half-pixel centres (align_corners=False), border samples repeated, no antialiasing: torch's
    bicubic ``interpolate``. ``scale`` is the source step per output sample: None gives
    size_in / size_out (``interpolate(size=...)``); DINO's ``interpolate(scale_factor=s)``
    steps by 1 / s (``pos_embed_scale``). A fixed matrix makes the result identical on every
    backend.
    """
    m = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out if scale is None else float(scale)
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), size_in - 1)] += _cubic(k - t)
    return m.astype(np.float32)


# -- layer ids for layer-wise lr decay (DINOv2/POA's get_params_groups_with_decay) ---------------
_BLOCK = re.compile(r"^blocks_(\d+)$")
_EMBEDDING_PARTS = ("patch_embed", "cls_token", "pos_embed", "mask_token")


def vit_layer_id(path, num_layers):
    """Layer id of a ViT variable from its Keras path (e.g. "vit/blocks_3/attn/qkv/dense/kernel"
    -> 4, "vit/patch_embed/proj/kernel" -> 0, "dino_head/mlp_0/..." -> num_layers + 1):
    0 = patch embed, cls/pos/mask tokens; i + 1 = block i; num_layers + 1 = everything after
    the blocks (final norm, heads)."""
    parts = str(path).split("/")
    if any(part in _EMBEDDING_PARTS for part in parts):
        return 0
    for part in parts:
        match = _BLOCK.match(part)
        if match:
            block = int(match.group(1))
            if block >= num_layers:
                raise ValueError(f"{path}: block {block} out of range for {num_layers} blocks")
            return block + 1
    return int(num_layers) + 1


def vit_lr_multiplier(path, num_layers, layer_decay=1.0, patch_embed_lr_mult=1.0):
    """lr multiplier of one ViT variable: layer decay by its layer id, times
    patch_embed_lr_mult (POA 0.2) for the patch embedding's own weights."""
    multiplier = layer_decay_multiplier(vit_layer_id(path, num_layers), int(num_layers) + 1,
                                        layer_decay)
    if "patch_embed" in str(path).split("/"):
        multiplier *= float(patch_embed_lr_mult)
    return multiplier


def layer_decay_multipliers(num_layers, decay):
    """lr multiplier per ViT layer id, float64 array of length num_layers + 2:
    ``decay ** (num_layers + 1 - layer_id)`` (ids as ``vit_layer_id``)."""
    if int(num_layers) != num_layers or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {num_layers}")
    return np.array([layer_decay_multiplier(i, int(num_layers) + 1, decay)
                     for i in range(int(num_layers) + 2)], dtype=np.float64)


_PATCH_VARIANTS = (16, 14, 8)
_SIZES = {  # name: (width, depth, head_dim)
    "ti": (192, 12, 64),
    "s": (384, 12, 64),
    "b": (768, 12, 64),
    "l": (1024, 24, 64),
    "h": (1280, 32, 80),
}
CONFIGS = {}
for _size, (_w, _d, _h) in _SIZES.items():
    for _p in _PATCH_VARIANTS:
        CONFIGS[f"vit_{_size}{_p}"] = dict(image_size=224, patch_size=_p, embed_dim=_w, depth=_d,
                                           head_dim=_h)
CONFIGS.update({
    # The POA ViT-L/16 elastic teacher: widths 384..1024 (11), depths 12..24 (13), 143 subnets.
    "vit_l16_elastic": dict(
        image_size=224, patch_size=16, embed_dim=1024, depth=24, head_dim=64, min_width=384,
        min_depth=12, layer_scale_init=1e-5, use_mask_token=True, net_select_scale=3,
        named_subnets={"small": (384, 12), "base": (768, 12), "large": (1024, 24)}),
    # Tiny elastic ViT for tests: widths 32, 48, 64; depths 2..4.
    "vit_elastic_test": dict(
        image_size=32, patch_size=8, embed_dim=64, depth=4, head_dim=16, min_width=32,
        min_depth=2, layer_scale_init=1e-5, use_mask_token=True, net_select_scale=3,
        named_subnets={"small": (32, 2), "base": (64, 2), "large": (64, 4)}),
    # The CPU demo (recipes/demo.py): 32 x 32 images, patch 8 (16 tokens), widths 48..96 by
    # 16 (3..6 heads of 16), depths 3..6: 16 subnets, 0.69 M parameters intact.
    "vit_elastic_demo": dict(
        image_size=32, patch_size=8, embed_dim=96, depth=6, head_dim=16, min_width=48,
        min_depth=3, layer_scale_init=1e-5, use_mask_token=True, net_select_scale=3,
        named_subnets={"small": (48, 3), "base": (96, 3), "large": (96, 6)}),
    # MAE encoders (REFERENCE.md §3): fixed 2-D sin-cos position embedding, no LayerScale, no
    # mask token (MAE drops the masked patches). MAE-Lite's ViT-Tiny has 12 heads of 16
    # (5,486,592 trainable parameters; with its fixed table 5,524,416 as the paper counts).
    "mae_vit_tiny16": dict(image_size=224, patch_size=16, embed_dim=192, depth=12, head_dim=16,
                           pos_embed="sincos"),
    "mae_vit_small16": dict(image_size=224, patch_size=16, embed_dim=384, depth=12,
                            head_dim=32, pos_embed="sincos"),
    "mae_vit_base16": dict(image_size=224, patch_size=16, embed_dim=768, depth=12, head_dim=64,
                           pos_embed="sincos"),
    "mae_vit_large16": dict(image_size=224, patch_size=16, embed_dim=1024, depth=24,
                            head_dim=64, pos_embed="sincos"),
    # The CPU demos of MAE (recipes/demo_mae*.py): 32 x 32 images, patch 4 (64 patches, 16
    # visible at 0.75). The student: width 64 (4 heads of 16), 4 blocks; the distillation
    # teacher: width 128 (8 heads), 4 blocks.
    "vit_mae_demo": dict(image_size=32, patch_size=4, embed_dim=64, depth=4, head_dim=16,
                         pos_embed="sincos"),
    "vit_mae_demo_wide": dict(image_size=32, patch_size=4, embed_dim=128, depth=4, head_dim=16,
                              pos_embed="sincos"),
})
# The released models of the zoo (docs/zoo.md). DINO: DeiT-style ViT-S / B at patch 16 and 8,
# its own position-embedding resize rule. DINOv2: trained at 518 (a 37 x 37 grid at patch 14),
# LayerScale (init 1.0 before training), a mask token, the same resize rule.
for _size in ("s", "b"):
    for _p in (16, 8):
        CONFIGS[f"dino_vit_{_size}{_p}"] = dict(CONFIGS[f"vit_{_size}{_p}"],
                                                pos_embed_resize="dino")
for _size in ("s", "b", "l"):
    CONFIGS[f"dinov2_vit_{_size}14"] = dict(
        CONFIGS[f"vit_{_size}14"], image_size=518, layer_scale_init=1.0, use_mask_token=True,
        pos_embed_resize="dino")
del _size, _w, _d, _h, _p


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticViT(Backbone):
    """Vision Transformer with elastic width (multiples of `head_dim`) and depth.

    Args:
        image_size: training resolution; sets the position-embedding grid.
        patch_size: side of the square patches.
        embed_dim: full (maximum) width.
        depth: full (maximum) number of blocks.
        head_dim: channels per attention head, fixed across widths (heads = width / head_dim).
        min_width, min_depth: smallest sub-network (default: no elasticity).
        mlp_ratio: MLP hidden width / width.
        layer_scale_init: LayerScale initial value, or None for no LayerScale.
        drop_path_rate: stochastic depth rate (same for every block if `drop_path_uniform`,
            else linearly increasing from 0).
        use_mask_token: create a learned mask token for masked-image objectives.
        net_select_scale: sampling weight of the smallest subnet (see `SubnetSampler`).
        named_subnets: {name: (width, depth)} of well-known sizes.
        pos_embed_resize: how the position embedding is resized for another input size:
            "size" (default; bicubic to the target grid, torch's ``interpolate(size=...)``)
            or "dino" (the DINO / DINOv2 / POA code's ``scale_factor = (g + 0.1) / sqrt(N)``,
            which samples the source grid slightly differently: the interpolation weights
            of an output position differ by up to 0.35 in L1 at the demo's 16 px local crops,
            4 x 4 -> 2 x 2). Recorded in presets; recipes that
            claim a paper's settings use "dino", and so must a model converted from those
            checkpoints to reproduce them at every size.
        pos_embed: "learned" (a trained table at ``image_size``'s grid, resized by
            ``pos_embed_resize`` for other sizes) or "sincos" (MAE's fixed 2-D sin-cos
            embedding, ``sincos_position_embedding``: no weight; regenerated for every grid
            size and, in a subnet, at the active width, so that an extracted subnet computes
            the very same table). Recorded in presets.

    Call: ``model(images, subnet=None, masks=None, training=None, keep=None)`` with images
    (B, H, W, C) and optional boolean masks (B, H/p * W/p); ``keep``: a run-time block mask
    (``block_keep``), with which the subnet's depth is ignored. Returns ``{"cls": (B, w), "patch_tokens":
    (B, N, w), "pooled": (B, w)}`` (final-norm tokens; pooled = cls).
    On request (``return_blocks=True``) the dict also holds ``"blocks"``: one (B, 1 + N, w)
    tensor per block the subnet runs, in order, each passed through the final LayerNorm
    (DINOv2's ``get_intermediate_layers(norm=True)``); the last one is the final output. The
    default call (``return_blocks=False``) is unchanged.
    """

    subnet_class = ViTSubnet
    supports_masks = True
    configs = CONFIGS
    family = "ViT"

    def __init__(self, image_size=224, patch_size=16, embed_dim=768, depth=12, head_dim=64,
                 min_width=None, min_depth=None, mlp_ratio=4.0, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, layer_scale_init=None, drop_path_rate=0.0,
                 drop_path_uniform=True, norm_epsilon=1e-6, use_mask_token=False, in_channels=3,
                 net_select_scale=3, named_subnets=None, pos_embed_resize="size",
                 pos_embed="learned", **kwargs):
        super().__init__(**kwargs)
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}")
        if pos_embed_resize not in POS_EMBED_RESIZE_RULES:
            raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZE_RULES}, got "
                             f"{pos_embed_resize!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        min_width = embed_dim if min_width is None else min_width
        min_depth = depth if min_depth is None else min_depth
        for what, value in (("embed_dim", embed_dim), ("min_width", min_width)):
            if value % head_dim:
                raise ValueError(f"{what}={value} is not a multiple of head_dim={head_dim}")
        if not head_dim <= min_width <= embed_dim:
            raise ValueError(f"min_width={min_width} must lie in [{head_dim}, {embed_dim}]")
        if not 1 <= min_depth <= depth:
            raise ValueError(f"min_depth={min_depth} must lie in [1, {depth}]")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.head_dim = int(head_dim)
        self.min_width = int(min_width)
        self.min_depth = int(min_depth)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias, self.proj_bias, self.ffn_bias = bool(qkv_bias), bool(proj_bias), \
            bool(ffn_bias)
        self.layer_scale_init = layer_scale_init
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_uniform = bool(drop_path_uniform)
        self.norm_epsilon = float(norm_epsilon)
        self.use_mask_token = bool(use_mask_token)
        self.in_channels = int(in_channels)
        self.net_select_scale = float(net_select_scale)
        self._named = {k: ViTSubnet(*map(int, v)) for k, v in (named_subnets or {}).items()}
        for k, spec in self._named.items():
            self.validate_subnet(spec)
        self.grid_size = self.image_size // self.patch_size
        self.pos_embed_resize = pos_embed_resize
        self.pos_embed_kind = pos_embed
        self._sincos_tables = {}
        if pos_embed == "sincos":
            bad = [w for w in self.widths if w % 4]
            if bad:
                raise ValueError(f"pos_embed='sincos' needs widths that are multiples of 4; "
                                 f"widths {bad} of {self.widths} are not")

        policy = self.dtype_policy
        self.patch_embed = ElasticPatchEmbed(patch_size, embed_dim, in_channels, dtype=policy,
                                             name="patch_embed")
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]
        self.blocks = [
            ElasticBlock(embed_dim, head_dim, mlp_ratio, qkv_bias, proj_bias, ffn_bias,
                         layer_scale_init, rates[i], norm_epsilon, dtype=policy,
                         name=f"blocks_{i}")
            for i in range(depth)
        ]
        self.norm = ElasticLayerNorm(embed_dim, norm_epsilon, dtype=policy, name="norm")
        self.build()

    def build(self, input_shape=None):
        self.patch_embed.build()
        self.cls_token = self.add_weight(
            shape=(1, 1, self.embed_dim), name="cls_token",
            initializer=HostInitializer("normal", stddev=1e-6))
        self.pos_embed = None   # fixed sin-cos: computed for each grid, not a weight
        if self.pos_embed_kind == "learned":
            self.pos_embed = self.add_weight(
                shape=(1, 1 + self.grid_size ** 2, self.embed_dim), name="pos_embed",
                initializer=HostInitializer("truncated_normal", stddev=0.02))
        self.mask_token = (self.add_weight(shape=(self.embed_dim,), name="mask_token",
                                           initializer=HostInitializer("zeros"))
                           if self.use_mask_token else None)
        for block in self.blocks:
            block.build()
        self.norm.build()
        self.built = True

    # -- the grid ------------------------------------------------------------------------------
    @property
    def widths(self):
        return grid_values(self.min_width, self.embed_dim, self.head_dim)

    @property
    def depths(self):
        return grid_values(self.min_depth, self.depth, 1)

    @property
    def full_subnet(self):
        return ViTSubnet(self.embed_dim, self.depth)

    @property
    def named_subnets(self):
        return dict(self._named)

    def subnets(self):
        """Every (width, depth) of the grid, width-major, smallest first."""
        return [ViTSubnet(w, d) for w in self.widths for d in self.depths]

    def sampling_counts(self, net_select_scale=None):
        scale = self.net_select_scale if net_select_scale is None else net_select_scale
        return selection_weights(len(self.widths), len(self.depths), scale).reshape(-1).tolist()

    def validate_subnet(self, spec):
        widths, depths = self.widths, self.depths
        if spec.width not in widths:
            raise ValueError(f"width={spec.width} is not on the grid of {self.name}; valid "
                             f"widths: {widths}")
        if spec.depth not in depths:
            raise ValueError(f"depth={spec.depth} is out of range for {self.name}; valid "
                             f"depths: {depths[0]}..{depths[-1]}")

    def subnet_from_kwargs(self, width=None, depth=None):
        spec = ViTSubnet(self.embed_dim if width is None else width,   # the spec refuses 64.5
                         self.depth if depth is None else depth)
        self.validate_subnet(spec)
        return spec

    def feature_dim(self, subnet=None):
        spec = self.resolve_subnet(subnet)
        return self.embed_dim if spec is None else spec.width

    def layer_id(self, path):
        """Layer ids of DINOv2/POA (``vit_layer_id``): 0 = patch embed and tokens, i + 1 =
        block i, depth + 1 = final norm; the patch embedding's own weights also get
        ``patch_embed_lr_mult`` (``is_patch_embedding``)."""
        return vit_layer_id(path, self.depth)

    @property
    def max_layer_id(self):
        return self.depth + 1

    def is_patch_embedding(self, path):
        return "patch_embed" in str(path).split("/")

    def full_depth_subnet(self, subnet):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return ViTSubnet(spec.width, self.depth)

    def block_ids(self, subnet=None):
        """Indices of the blocks a subnet runs (all of them for the full network)."""
        spec = self.resolve_subnet(subnet)
        return list(range(self.depth)) if spec is None else block_ids(self.depth, spec.depth)

    def subnet_params(self, subnet=None):
        """Parameter count of a subnet (equals ``extract(subnet).count_params()``)."""
        spec = self.resolve_subnet(subnet) or self.full_subnet
        w, d = spec.width, spec.depth
        hidden = int(w * self.mlp_ratio)
        per_block = (
            4 * w  # two LayerNorms
            + w * 3 * w + (3 * w if self.qkv_bias else 0)
            + w * w + (w if self.proj_bias else 0)
            + w * hidden + w * hidden + ((hidden + w) if self.ffn_bias else 0)
            + (2 * w if self.layer_scale_init else 0)
        )
        embed = self.patch_size ** 2 * self.in_channels * w + w
        positions = (1 + self.grid_size ** 2) * w if self.pos_embed_kind == "learned" else 0
        tokens = w + positions + (w if self.use_mask_token else 0)
        return embed + tokens + d * per_block + 2 * w

    def subnet_flops(self, spec=None, image_size=None, include_norms=False, breakdown=False):
        """Analytic forward FLOPs of one image through a subnet (None: the intact network).

        Convention: a multiply-add counts as 2 FLOPs. Counted, with N = 1 + (H/p)(W/p) tokens,
        P = (H/p)(W/p) patches, width w, MLP hidden h = int(w * mlp_ratio), per block:

        * ``qkv``: 2 N w (3w); ``attn_scores`` (Q K^T over all heads): 2 N^2 w;
          ``attn_values`` (A V): 2 N^2 w; ``proj``: 2 N w^2; ``mlp``: 2 N w h (fc1) + 2 N h w
          (fc2);

        plus ``patch_embed``: 2 P (p^2 C) w (the strided conv as a matmul). With
        ``include_norms``, ``norms``: 7 FLOPs per normalised element (mean, centring, square,
        variance sum, scaling, gamma, beta) for the 2 LayerNorms of every block and the final
        one, i.e. 7 N w (2 d + 1).

        Not counted: bias adds, softmax, GELU, LayerScale, residual adds, the mask token and the
        position-embedding add (element-wise work: XLA's cost analysis, which counts it, with
        GELU's erf as a polynomial, finds 6-12 % more than this on ``vit_elastic_demo`` and up
        to 30 % more on narrow widths such as 32), and the bicubic resize of the position
        embedding at another image size (once per call, not per image). The heads of a trainer
        are not part of the backbone.

        Args:
            spec: a subnet (spec, name or tuple) or None for the intact network.
            image_size: an int or (height, width); default the configuration's ``image_size``.
            include_norms: also count the LayerNorms (see above).
            breakdown: return a dict of the terms above and their ``total`` instead of an int.
        """
        spec = self.resolve_subnet(spec) or self.full_subnet
        height, width_px = image_hw(self.image_size if image_size is None else image_size)
        for what, size in (("height", height), ("width", width_px)):
            if size <= 0 or size % self.patch_size:
                raise ValueError(f"image {what} {size} is not a positive multiple of the patch "
                                 f"size {self.patch_size}")
        patches = (height // self.patch_size) * (width_px // self.patch_size)
        n = 1 + patches
        w, d = spec.width, spec.depth
        hidden = int(w * self.mlp_ratio)
        terms = {
            "patch_embed": 2 * patches * self.patch_size ** 2 * self.in_channels * w,
            "qkv": d * 2 * n * w * 3 * w,
            "attn_scores": d * 2 * n * n * w,
            "attn_values": d * 2 * n * n * w,
            "proj": d * 2 * n * w * w,
            "mlp": d * 2 * n * w * hidden * 2,
        }
        if include_norms:
            terms["norms"] = 7 * n * w * (2 * d + 1)
        return self._flops_total(terms, breakdown)

    # -- forward -------------------------------------------------------------------------------
    def _check_images(self, images):
        return self._check_image_sizes(images, self.patch_size)

    def _position_embedding(self, grid_h, grid_w, width):
        if self.pos_embed is None:   # "sincos": MAE's fixed table, at this grid and width
            key = (grid_h, grid_w, width)
            if key not in self._sincos_tables:
                self._sincos_tables[key] = sincos_position_embedding(grid_h, grid_w, width)[None]
            return ops.convert_to_tensor(self._sincos_tables[key], dtype=self.compute_dtype)
        pos = self.pos_embed if width == self.embed_dim else self.pos_embed[..., :width]
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return pos
        g = self.grid_size
        patch_pos = ops.reshape(ops.cast(pos[:, 1:], "float32"), (g, g, width))
        rule = self.pos_embed_resize
        rows = ops.convert_to_tensor(bicubic_resize_matrix(grid_h, g,
                                                           pos_embed_scale(grid_h, g, rule)))
        cols = ops.convert_to_tensor(bicubic_resize_matrix(grid_w, g,
                                                           pos_embed_scale(grid_w, g, rule)))
        patch_pos = ops.einsum("hi,ijc->hjc", rows, patch_pos)
        patch_pos = ops.einsum("wj,hjc->hwc", cols, patch_pos)
        patch_pos = ops.cast(ops.reshape(patch_pos, (1, grid_h * grid_w, width)), pos.dtype)
        return ops.concatenate([pos[:, :1], patch_pos], axis=1)

    def call(self, images, subnet=None, masks=None, training=None, return_blocks=False,
             keep=None, quant=None, visible_ids=None, return_attention=None,
             return_representations=False):
        with self.quantization(quant, training):
            return self._forward(images, subnet, masks, training, return_blocks, keep,
                                 visible_ids, return_attention, return_representations)

    def _probed_positions(self, return_attention, run_depth):
        """The positions (among the blocks run) whose attention logits are asked for."""
        if return_attention is None:
            return []
        if isinstance(return_attention, str):
            if return_attention != "all":
                raise ValueError(f"return_attention={return_attention!r}: give 'all', a block "
                                 f"position or a list of them (0..{run_depth - 1}, or negative "
                                 "from the last)")
            return list(range(run_depth))
        items = ([return_attention] if isinstance(return_attention, (int, np.integer))
                 else list(return_attention))
        positions = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not (
                    -run_depth <= item < run_depth):
                raise ValueError(f"return_attention: block {item!r} is not one of the "
                                 f"{run_depth} blocks this subnet runs (0..{run_depth - 1}, or "
                                 f"-{run_depth}..-1 from the last)")
            positions.append(int(item) % run_depth)
        return positions

    def _embed_visible(self, x, pos, visible_ids):
        """MAE's encoder input: position-embed every patch, keep the ``visible_ids`` (B, K)
        of each image (in that order), prepend the position-embedded CLS token."""
        num_patches = x.shape[1]
        if len(visible_ids.shape) != 2 or visible_ids.shape[1] is None or not (
                1 <= visible_ids.shape[1] <= num_patches):
            raise ValueError(f"visible_ids must be (batch, K) patch indices with 1 <= K <= "
                             f"{num_patches} (the patches of these images); got shape "
                             f"{tuple(visible_ids.shape)}")
        x = x + pos[:, 1:]
        ids = ops.expand_dims(ops.cast(visible_ids, "int32"), -1)
        return pos[:, :1], ops.take_along_axis(x, ids, axis=1)

    def _forward(self, images, subnet, masks, training, return_blocks, keep,
                 visible_ids=None, return_attention=None, return_representations=False):
        spec = self.resolve_subnet(subnet)
        probing = return_attention is not None or return_representations
        if keep is not None and (return_blocks or probing):
            raise ValueError("return_blocks, return_attention and return_representations need "
                             "a static depth: give the subnet, not keep")
        if masks is not None and visible_ids is not None:
            raise ValueError("give masks (mask tokens replace patches) or visible_ids (only "
                             "those patches are encoded, MAE), not both")
        grid_h, grid_w = self._check_images(images)
        width = self.embed_dim if spec is None else spec.width
        active = None if width == self.embed_dim else width  # None: no slicing at all
        x = self.patch_embed(images, active=active)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError(f"{self.name} was built without a mask token "
                                 "(use_mask_token=False); it cannot take masks")
            token = self.mask_token if active is None else self.mask_token[:width]
            x = ops.where(ops.expand_dims(masks, -1), ops.cast(token, x.dtype), x)
        cls = self.cls_token if active is None else self.cls_token[..., :width]
        cls = ops.zeros_like(x[:, :1]) + ops.cast(cls, x.dtype)
        pos = ops.cast(self._position_embedding(grid_h, grid_w, width), x.dtype)
        if visible_ids is None:
            x = ops.concatenate([cls, x], axis=1)
            x = x + pos
        else:
            cls_pos, x = self._embed_visible(x, pos, visible_ids)
            x = ops.concatenate([cls + cls_pos, x], axis=1)
        run = self.run_block_ids(spec, keep)[0]
        probed = set(self._probed_positions(return_attention, len(run)))
        block_outputs = [] if return_blocks else None
        logits, representations = [], {}
        for position, (i, flat) in enumerate(run):
            if position in probed or return_representations:
                x, probes = self.blocks[i](x, active=active, training=training, probe=True)
                if position in probed:
                    logits.append(probes["attention_logits"])
                if return_representations:
                    representations[f"block_{position}"] = probes["norm1"][:, 1:]
            else:
                x = self.blocks[i](x, active=active, training=training,
                                   keep=self.keep_flag(keep, flat))
            if block_outputs is not None:
                block_outputs.append(x)
        x = self.norm(x, active=active)
        out = {"cls": x[:, 0], "patch_tokens": x[:, 1:], "pooled": x[:, 0]}
        if return_blocks:   # only on request: per-block outputs, final norm applied
            out["blocks"] = [self.norm(b, active=active) for b in block_outputs[:-1]] + [x]
        if return_attention is not None:
            order = self._probed_positions(return_attention, len(run))
            by_position = dict(zip(sorted(probed), logits))
            out["attention_logits"] = [by_position[p] for p in order]
        if return_representations:
            representations["norm"] = x[:, 1:]
            out["representations"] = representations
        return out

    # -- looking inside --------------------------------------------------------------------------
    def layer_representations(self, images, subnet=None):
        """MAE-Lite's CKA representations: the input of every block the subnet runs after its
        norm1 (``block_0`` ... ``block_{d-1}``), then the final norm's output (``norm``); each
        (B, N, w), the CLS token dropped."""
        return self(images, subnet=subnet, training=False,
                    return_representations=True)["representations"]

    def attention_logits(self, images, subnet=None, blocks="all"):
        """[(B, heads, 1 + N, 1 + N)] pre-softmax logits ``q kᵀ / sqrt(head_dim)`` (CLS first)
        of the chosen blocks: "all", a position among the blocks the subnet runs, or a list
        (negatives count from the last)."""
        return self(images, subnet=subnet, training=False,
                    return_attention=blocks)["attention_logits"]

    # -- extraction ----------------------------------------------------------------------------
    def extract(self, subnet):
        """A new ElasticViT of exactly this size, alpha folded into its kernels.

        ``extract(s)(x)`` equals ``self(x, subnet=s)``. The final LayerNorm is kept.
        """
        spec = self.resolve_subnet(subnet) or self.full_subnet
        w, d = spec.width, spec.depth
        config = self.get_config()
        config.update(
            embed_dim=w, depth=d, min_width=min(self.min_width, w),
            min_depth=min(self.min_depth, d), name=f"{self.name}_w{w}_d{d}",
            named_subnets={},  # the teacher's names mean other blocks in a smaller grid
        )
        with HostInitializer.skipped():  # every weight is overwritten below
            sub = ElasticViT.from_config(config)
        hidden = int(w * self.mlp_ratio)

        def put(variable, value):
            variable.assign(value)

        def host(variable):
            return np.asarray(ops.convert_to_numpy(variable))

        kernel, bias = self.patch_embed.sliced_weights(w, on_host=True)
        put(sub.patch_embed.proj.kernel, kernel)
        put(sub.patch_embed.proj.bias, bias)
        put(sub.cls_token, host(self.cls_token)[..., :w])
        if self.pos_embed is not None:
            put(sub.pos_embed, host(self.pos_embed)[..., :w])
        if self.use_mask_token:
            put(sub.mask_token, host(self.mask_token)[:w])

        def copy_norm(src, dst):
            gamma, beta = src.sliced_weights(w, on_host=True)
            put(dst.norm.gamma, gamma)
            put(dst.norm.beta, beta)

        def copy_dense(src, dst, active_in, active_out):
            kernel, bias = src.sliced_weights(active_in, active_out, on_host=True)
            put(dst.dense.kernel, kernel)
            if bias is not None:
                put(dst.dense.bias, bias)

        for j, i in enumerate(block_ids(self.depth, d)):
            src, dst = self.blocks[i], sub.blocks[j]
            copy_norm(src.norm1, dst.norm1)
            copy_norm(src.norm2, dst.norm2)
            copy_dense(src.attn.qkv, dst.attn.qkv, w, w)
            copy_dense(src.attn.proj, dst.attn.proj, w, w)
            copy_dense(src.mlp.fc1, dst.mlp.fc1, w, hidden)
            copy_dense(src.mlp.fc2, dst.mlp.fc2, hidden, w)
            if src.ls1 is not None:
                put(dst.ls1.gamma, src.ls1.sliced_weights(w, on_host=True))
                put(dst.ls2.gamma, src.ls2.sliced_weights(w, on_host=True))
        copy_norm(self.norm, sub.norm)
        return sub

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
            depth=self.depth, head_dim=self.head_dim, min_width=self.min_width,
            min_depth=self.min_depth, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias, ffn_bias=self.ffn_bias,
            layer_scale_init=self.layer_scale_init, drop_path_rate=self.drop_path_rate,
            drop_path_uniform=self.drop_path_uniform, norm_epsilon=self.norm_epsilon,
            use_mask_token=self.use_mask_token, in_channels=self.in_channels,
            net_select_scale=self.net_select_scale,
            named_subnets={k: [s.width, s.depth] for k, s in self._named.items()},
            pos_embed_resize=self.pos_embed_resize, pos_embed=self.pos_embed_kind,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(**config)

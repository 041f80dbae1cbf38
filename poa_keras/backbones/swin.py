"""ElasticSwin: a Swin Transformer whose (base width, stage-3 depth) sub-networks can be run by
slicing (``model(x, subnet=spec)``) or extracted as a standalone Swin (``model.extract(spec)``),
as POA's elastic Swin (REFERENCE.md §1 "Elastic Swin"; alipay/POA,
poa/models/swin_transformer.py).

Layout: patch embedding (a strided conv, patch 4) -> LayerNorm -> 4 stages of Swin blocks
(windows M x M, shifted windows on odd blocks), a 2 x 2 patch merging between stages (4C ->
LayerNorm -> Linear 4C -> 2C) -> one LayerNorm per stage output (``norm_{s}``; ``norm_3`` is
the final norm). Images and feature maps are channels-last. The window pieces and the merge
channel order are documented in ``poa_keras/elastic/window.py``.

Elasticity: base width w (multiples of ``head_dim`` from ``min_width`` to ``embed_dim``; stage
s has w * 2**s channels and w * 2**s / head_dim heads), and the depth d of stage 3 (index 2;
the other stages keep their depth), whose blocks are ``spec.block_ids(depths[2], d)`` -- the
ViT rule. A kept block keeps its own window shift (the parity of its index in the full stage,
as the reference's elastic forward does), so an extracted stage 3 need not alternate: the
``shifts`` argument stores the pattern.

Differences from the reference, on purpose: the patch-embed LayerNorm normalises over the
active width (the reference normalises over the full width and then slices, so its extracted
nets differ from its elastic forward); the merge order is Swin's (see window.py). No mask token:
the iBOT branch of POA is not supported for Swin (``supports_masks = False``).

Input sizes: any height and width that are multiples of the patch size. Stage s + 1 has
ceil(H_s / 2) x ceil(W_s / 2) tokens (odd maps are zero-padded before merging) and maps whose
sides are not multiples of the window are zero-padded for the attention (mmdet/POA padding),
e.g. 96 px local crops with patch 4 and window 7: 24 -> 12 -> 6 -> 3 tokens per side.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from poa_keras.backbones.base import Backbone
from poa_keras.elastic.layers import ElasticLayerNorm, ElasticPatchEmbed, HostInitializer
from poa_keras.elastic.spec import SwinSubnet, block_ids, grid_values, selection_weights
from poa_keras.elastic.window import ElasticPatchMerging, ElasticSwinBlock
from poa_keras.validation import image_hw

ELASTIC_STAGE = 2   # stage 3 (0-based index 2) is the only stage of elastic depth

CONFIGS = {
    # Static Swin-T / S / B (Liu et al. 2021): head dim 32, window 7; their parameter counts
    # (plus the stage norms 0..2). Maps that fit one window keep their shift and are padded
    # (POA/mmdet); the official code instead switches the shift off there (stage 4 at 224),
    # which a converter of official checkpoints would have to add.
    "swin_t": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                   head_dim=32, window_size=7),
    "swin_s": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 18, 2),
                   head_dim=32, window_size=7),
    "swin_b": dict(image_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                   head_dim=32, window_size=7),
    # The POA elastic Swin teacher (swin_ssl_default_config.yaml): widths 96, 112, 128;
    # stage-3 depths 6..18; head dim 16; 39 subnets.
    "swin_elastic": dict(
        image_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), head_dim=16,
        window_size=7, min_width=96, min_depth=6, net_select_scale=2,
        named_subnets={"tiny": (96, 6), "small": (96, 18), "base": (128, 18)}),
    # Tiny elastic Swin for tests (fast to compile): widths 16, 32; stage-3 depths 1..3; 6
    # subnets. Stage 2 has a shifted block on a map of 4 windows; the kept stage-3 blocks of
    # depth 2 (blocks 0 and 2) break the shift alternation.
    "swin_elastic_test": dict(
        image_size=32, patch_size=2, embed_dim=32, depths=(1, 2, 3, 1), head_dim=16,
        window_size=4, min_width=16, min_depth=1, net_select_scale=2,
        named_subnets={"tiny": (16, 1), "small": (16, 3), "base": (32, 3)}),
    # Small elastic Swin for CPU demos: widths 32, 48, 64; stage-3 depths 2..6; 15 subnets.
    "swin_elastic_demo": dict(
        image_size=64, patch_size=4, embed_dim=64, depths=(2, 2, 6, 2), head_dim=16,
        window_size=4, min_width=32, min_depth=2, net_select_scale=2,
        named_subnets={"tiny": (32, 2), "small": (32, 6), "base": (64, 6)}),
}

_EMBEDDING_PARTS = ("patch_embed", "patch_norm")


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticSwin(Backbone):
    """Swin Transformer with elastic base width (multiples of `head_dim`) and stage-3 depth.

    Args:
        image_size: training resolution (the default size of ``subnet_flops``).
        patch_size: side of the square patches of the patch embedding.
        embed_dim: full (maximum) base width; stage s has embed_dim * 2**s channels.
        depths: blocks per stage (4 stages) of the full network.
        head_dim: channels per attention head, fixed across widths and stages.
        window_size: side M of the attention windows.
        min_width: smallest base width (default: no width elasticity).
        min_depth: smallest stage-3 depth (default: no depth elasticity).
        mlp_ratio: MLP hidden width / width.
        drop_path_rate: stochastic depth rate: the same for every block if
            `drop_path_uniform`, else rising linearly from 0 over all blocks (Swin, POA).
        shifts: per stage, per block, whether its windows are shifted; default: the odd blocks
            of every stage (Swin). Extraction writes the pattern of the blocks it keeps.
        net_select_scale: sampling weight of the smallest subnet (POA: 2 for Swin).
        named_subnets: {name: (width, depth)} of well-known sizes.

    Call: ``model(images, subnet=None, training=None, return_feature_maps=False)`` with images
    (B, H, W, C). Returns ``{"cls": (B, 8w), "pooled": (B, 8w)}``: cls = pooled = the mean of
    the final-norm tokens. With ``return_feature_maps=True`` (dense tasks) also
    ``"feature_maps"``: a list of the 4 normalised stage outputs (``norm_s``), (B, H_s, W_s,
    w 2**s) with H_0 = H / patch, H_{s+1} = ceil(H_s / 2). They are on request only: trainers
    treat every output as one tensor, and stage norms 0..2 cost nothing unless asked for.
    """

    subnet_class = SwinSubnet
    supports_masks = False
    configs = CONFIGS
    family = "Swin"

    def __init__(self, image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                 head_dim=16, window_size=7, min_width=None, min_depth=None, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, drop_path_uniform=False, norm_epsilon=1e-5,
                 in_channels=3, shifts=None, net_select_scale=2, named_subnets=None, **kwargs):
        super().__init__(**kwargs)
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must give 4 stages of at least one block each, got "
                             f"{depths}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        min_width = embed_dim if min_width is None else min_width
        min_depth = depths[ELASTIC_STAGE] if min_depth is None else min_depth
        for what, value in (("embed_dim", embed_dim), ("min_width", min_width)):
            if value % head_dim:
                raise ValueError(f"{what}={value} is not a multiple of head_dim={head_dim}")
        if not head_dim <= min_width <= embed_dim:
            raise ValueError(f"min_width={min_width} must lie in [{head_dim}, {embed_dim}]")
        if not 1 <= min_depth <= depths[ELASTIC_STAGE]:
            raise ValueError(f"min_depth={min_depth} must lie in [1, {depths[ELASTIC_STAGE]}] "
                             "(the depth of stage 3)")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        if shifts is None:
            shifts = [[j % 2 == 1 for j in range(d)] for d in depths]
        shifts = [[bool(b) for b in stage] for stage in shifts]
        if [len(stage) for stage in shifts] != list(depths):
            raise ValueError(f"shifts must give one flag per block of depths {depths}, got "
                             f"{[len(stage) for stage in shifts]} flags per stage")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.depths = depths
        self.head_dim = int(head_dim)
        self.window_size = int(window_size)
        self.min_width = int(min_width)
        self.min_depth = int(min_depth)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_uniform = bool(drop_path_uniform)
        self.norm_epsilon = float(norm_epsilon)
        self.in_channels = int(in_channels)
        self.shifts = shifts
        self.net_select_scale = float(net_select_scale)
        self.num_stages = len(depths)
        self._named = {k: SwinSubnet(*map(int, v)) for k, v in (named_subnets or {}).items()}
        for spec in self._named.values():
            self.validate_subnet(spec)

        policy = self.dtype_policy
        total = sum(depths)
        rates = ([self.drop_path_rate] * total if drop_path_uniform
                 else [float(r) for r in np.linspace(0.0, self.drop_path_rate, total)])
        self.patch_embed = ElasticPatchEmbed(patch_size, embed_dim, in_channels, dtype=policy,
                                             name="patch_embed")
        self.patch_norm = ElasticLayerNorm(embed_dim, norm_epsilon, dtype=policy,
                                           name="patch_norm")
        self.stages, self.downsamples, self.norms = [], [], []
        for s, depth in enumerate(depths):
            dim = self.stage_width(s)
            offset = sum(depths[:s])
            self.stages.append([
                ElasticSwinBlock(dim, head_dim, window_size, shifts[s][j], mlp_ratio, qkv_bias,
                                 drop_path=rates[offset + j], norm_epsilon=norm_epsilon,
                                 dtype=policy, name=f"stages_{s}_blocks_{j}")
                for j in range(depth)])
            if s < self.num_stages - 1:
                self.downsamples.append(ElasticPatchMerging(dim, norm_epsilon, dtype=policy,
                                                            name=f"downsample_{s}"))
            self.norms.append(ElasticLayerNorm(dim, norm_epsilon, dtype=policy,
                                               name=f"norm_{s}"))
        self.build()

    def build(self, input_shape=None):
        self.patch_embed.build()
        self.patch_norm.build()
        for stage in self.stages:
            for block in stage:
                block.build()
        for layer in self.downsamples + self.norms:
            layer.build()
        self.built = True

    def stage_width(self, stage, width=None):
        """Channels of stage `stage` for base width `width` (default: the full network's)."""
        return (self.embed_dim if width is None else int(width)) * 2 ** int(stage)

    # -- the grid ------------------------------------------------------------------------------
    @property
    def widths(self):
        return grid_values(self.min_width, self.embed_dim, self.head_dim)

    @property
    def stage3_depths(self):
        return grid_values(self.min_depth, self.depths[ELASTIC_STAGE], 1)

    @property
    def full_subnet(self):
        return SwinSubnet(self.embed_dim, self.depths[ELASTIC_STAGE])

    @property
    def named_subnets(self):
        return dict(self._named)

    def subnets(self):
        """Every (width, stage-3 depth) of the grid, width-major, smallest first."""
        return [SwinSubnet(w, d) for w in self.widths for d in self.stage3_depths]

    def sampling_counts(self, net_select_scale=None):
        scale = self.net_select_scale if net_select_scale is None else net_select_scale
        return selection_weights(len(self.widths), len(self.stage3_depths),
                                 scale).reshape(-1).tolist()

    def validate_subnet(self, spec):
        widths, depths = self.widths, self.stage3_depths
        if spec.width not in widths:
            raise ValueError(f"width={spec.width} is not on the grid of {self.name}; valid "
                             f"widths: {widths}")
        if spec.depth not in depths:
            raise ValueError(f"depth={spec.depth} (stage 3) is out of range for {self.name}; "
                             f"valid depths: {depths[0]}..{depths[-1]}")

    def subnet_from_kwargs(self, width=None, depth=None):
        spec = SwinSubnet(self.embed_dim if width is None else width,   # the spec refuses 64.5
                          self.depths[ELASTIC_STAGE] if depth is None else depth)
        self.validate_subnet(spec)
        return spec

    def feature_dim(self, subnet=None):
        """Channels of cls / pooled: the last stage's width, 8 w."""
        spec = self.resolve_subnet(subnet)
        return self.stage_width(self.num_stages - 1, None if spec is None else spec.width)

    def block_ids(self, subnet=None):
        """Per stage, the indices of the blocks a subnet runs (all for the full network)."""
        spec = self.resolve_subnet(subnet)
        ids = [list(range(d)) for d in self.depths]
        if spec is not None:
            ids[ELASTIC_STAGE] = block_ids(self.depths[ELASTIC_STAGE], spec.depth)
        return ids

    def full_depth_subnet(self, subnet):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return SwinSubnet(spec.width, self.depths[ELASTIC_STAGE])

    def subnet_depths(self, subnet=None):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return tuple(spec.depth if s == ELASTIC_STAGE else d for s, d in enumerate(self.depths))

    @property
    def max_layer_id(self):
        return sum(self.depths) + 1

    def is_patch_embedding(self, path):
        """The patch embedding and its norm (POA's "patch_embed" parameters)."""
        return any(part in _EMBEDDING_PARTS for part in str(path).split("/"))

    def layer_id(self, path):
        """Layer ids over all blocks of the full network, in order (DINOv2/POA rule
        ``layer_decay ** (num_layers + 1 - layer_id)``, num_layers = sum(depths)): 0 = patch
        embedding and its norm (which also get ``patch_embed_lr_mult``); block j of stage s =
        sum(depths[:s]) + j + 1; the patch merging before stage s + 1 = the id of that stage's
        first block (POA's get_swin_lr_decay_rate); the stage norms and anything else (heads)
        = num_layers + 1."""
        num_layers = sum(self.depths)
        if self.is_patch_embedding(path):
            return 0
        for part in str(path).split("/"):
            pieces = part.split("_")
            if len(pieces) == 4 and pieces[0] == "stages" and pieces[2] == "blocks":
                s, j = int(pieces[1]), int(pieces[3])
                if s >= self.num_stages or j >= self.depths[s]:
                    raise ValueError(f"{path}: block {j} of stage {s} out of range for depths "
                                     f"{self.depths}")
                return sum(self.depths[:s]) + j + 1
            if len(pieces) == 2 and pieces[0] == "downsample" and pieces[1].isdigit():
                s = int(pieces[1])
                if s >= self.num_stages - 1:
                    raise ValueError(f"{path}: no patch merging after stage {s}")
                return sum(self.depths[:s + 1]) + 1
        return num_layers + 1

    # -- sizes ---------------------------------------------------------------------------------
    def _image_hw(self, image_size):
        h, w = image_hw(self.image_size if image_size is None else image_size)
        for what, size in (("height", h), ("width", w)):
            if size <= 0 or size % self.patch_size:
                raise ValueError(f"image {what} {size} is not a positive multiple of the patch "
                                 f"size {self.patch_size}")
        return h, w

    def stage_resolutions(self, image_size=None):
        """[(H_s, W_s)] tokens per side of every stage for an image size (int or (h, w))."""
        h, w = self._image_hw(image_size)
        h, w = h // self.patch_size, w // self.patch_size
        sizes = []
        for _ in range(self.num_stages):
            sizes.append((h, w))
            h, w = -(-h // 2), -(-w // 2)
        return sizes

    def subnet_params(self, subnet=None):
        """Parameter count of a subnet (equals ``extract(subnet).count_params()``)."""
        spec = self.resolve_subnet(subnet) or self.full_subnet
        table = (2 * self.window_size - 1) ** 2
        total = self.patch_size ** 2 * self.in_channels * spec.width + spec.width  # conv
        total += 2 * spec.width                                                    # its norm
        for s, depth in enumerate(self.subnet_depths(spec)):
            c = self.stage_width(s, spec.width)
            hidden = int(c * self.mlp_ratio)
            per_block = (4 * c + c * 3 * c + (3 * c if self.qkv_bias else 0) + c * c + c
                         + table * (c // self.head_dim) + 2 * c * hidden + hidden + c)
            total += depth * per_block + 2 * c                                     # + norm_s
            if s < self.num_stages - 1:
                total += 2 * 4 * c + 4 * c * 2 * c                                 # merging
        return total

    def subnet_flops(self, spec=None, image_size=None, include_norms=False, breakdown=False):
        """Analytic forward FLOPs of one image through a subnet (None: the intact network).

        Convention (as ``ElasticViT.subnet_flops``): a multiply-add counts as 2 FLOPs. With
        stage s at H_s x W_s tokens (L = H_s W_s), padded to multiples of the window M for the
        attention (Lp tokens, N = M^2 per window), width c and MLP hidden h, per block:

        * ``qkv``: 2 Lp c (3c); ``attn_scores``: 2 Lp N c; ``attn_values``: 2 Lp N c;
          ``proj``: 2 Lp c^2 (the padded tokens are computed too); ``mlp``: 2 L c h 2;

        plus ``patch_embed``: 2 L_0 (p^2 C_in) w and ``merge``: 2 L_{s+1} (4c)(2c) per patch
        merging. With ``include_norms``, ``norms``: 7 FLOPs per normalised element (the patch
        norm, 2 per block, the merge norms over 4c, the 4 stage norms).

        Not counted: bias adds, the relative position bias and mask adds, softmax, GELU,
        residual adds, rolls, padding (element-wise work), the heads of a trainer.
        """
        spec = self.resolve_subnet(spec) or self.full_subnet
        sizes = self.stage_resolutions(image_size)
        m = self.window_size
        n_win = m * m
        terms = dict.fromkeys(("patch_embed", "qkv", "attn_scores", "attn_values", "proj",
                               "mlp", "merge"), 0)
        norms = 0
        l0 = sizes[0][0] * sizes[0][1]
        terms["patch_embed"] = 2 * l0 * self.patch_size ** 2 * self.in_channels * spec.width
        norms += l0 * spec.width
        for s, depth in enumerate(self.subnet_depths(spec)):
            h, w = sizes[s]
            c = self.stage_width(s, spec.width)
            hidden = int(c * self.mlp_ratio)
            tokens = h * w
            padded = math.ceil(h / m) * m * math.ceil(w / m) * m
            terms["qkv"] += depth * 2 * padded * c * 3 * c
            terms["attn_scores"] += depth * 2 * padded * n_win * c
            terms["attn_values"] += depth * 2 * padded * n_win * c
            terms["proj"] += depth * 2 * padded * c * c
            terms["mlp"] += depth * 2 * tokens * c * hidden * 2
            norms += depth * 2 * tokens * c + tokens * c
            if s < self.num_stages - 1:
                merged = sizes[s + 1][0] * sizes[s + 1][1]
                terms["merge"] += 2 * merged * 4 * c * 2 * c
                norms += merged * 4 * c
        if include_norms:
            terms["norms"] = 7 * norms
        return self._flops_total(terms, breakdown)

    # -- forward -------------------------------------------------------------------------------
    def _check_images(self, images):
        return self._check_image_sizes(
            images, self.patch_size,
            hint=f": {self.name} takes any height and width that are multiples of "
                 f"{self.patch_size} (maps that do not fit the window {self.window_size} are "
                 "padded)")

    def call(self, images, subnet=None, masks=None, training=None, return_feature_maps=False,
             keep=None, quant=None):
        with self.quantization(quant, training):
            return self._forward(images, subnet, masks, training, return_feature_maps, keep)

    def _forward(self, images, subnet, masks, training, return_feature_maps, keep):
        if masks is not None:
            raise ValueError(f"{self.name} ({type(self).__name__}) takes no masks: it has no "
                             "mask token (the iBOT branch is ViT-only; set ibot_weight=0)")
        spec = self.resolve_subnet(subnet)
        grid_h, grid_w = self._check_images(images)
        elastic = spec is not None and spec.width != self.embed_dim
        ids = self.run_block_ids(spec, keep)
        width = spec.width if elastic else self.embed_dim
        active = width if elastic else None
        x = self.patch_embed(images, active=active)
        x = ops.reshape(x, (-1, grid_h, grid_w, width))
        x = self.patch_norm(x, active=active)
        maps = []
        last = self.num_stages - 1
        for s, stage in enumerate(self.stages):
            active = self.stage_width(s, width) if elastic else None
            for j, flat in ids[s]:
                x = stage[j](x, active=active, training=training,
                             keep=self.keep_flag(keep, flat))
            if return_feature_maps or s == last:
                maps.append(self.norms[s](x, active=active))
            if s < last:
                x = self.downsamples[s](x, active=active)
        pooled = ops.mean(maps[-1], axis=(1, 2))
        out = {"cls": pooled, "pooled": pooled}
        if return_feature_maps:
            out["feature_maps"] = maps
        return out

    def layer_representations(self, images, subnet=None):
        """The tensors the layer-wise analysis (``eval/analysis.py``, CKA) compares, in depth
        order, run in inference mode and in float (outside any fake quantization):
        ``{"stage_{s}_block_{j}": (B, H_s, W_s, C_s)}``, the output tokens of every block the
        subnet runs (j: the block's index in the intact stage, so a subnet's names say which
        blocks it kept), then ``"norm"``: the final-norm tokens (``norm_3``; their mean is the
        ``pooled`` feature). The same computation as the call; the default call is unchanged."""
        with self.quantization(None, False):
            spec = self.resolve_subnet(subnet)
            grid_h, grid_w = self._check_images(images)
            elastic = spec is not None and spec.width != self.embed_dim
            width = spec.width if elastic else self.embed_dim
            active = width if elastic else None
            x = self.patch_embed(images, active=active)
            x = self.patch_norm(ops.reshape(x, (-1, grid_h, grid_w, width)), active=active)
            found = {}
            last = self.num_stages - 1
            for s, stage in enumerate(self.stages):
                active = self.stage_width(s, width) if elastic else None
                for j, _ in self.run_block_ids(spec, None)[s]:
                    x = stage[j](x, active=active, training=False)
                    found[f"stage_{s}_block_{j}"] = x
                if s < last:
                    x = self.downsamples[s](x, active=active)
            found["norm"] = self.norms[last](x, active=active)
            return found

    # -- extraction ----------------------------------------------------------------------------
    def extract(self, subnet):
        """A new ElasticSwin of exactly this size, alpha folded into its kernels.

        ``extract(s)(x)`` equals ``self(x, subnet=s)``. The kept stage-3 blocks keep their
        window shifts (``shifts``); drop-path rates follow the new network's own depths."""
        spec = self.resolve_subnet(subnet) or self.full_subnet
        w, d = spec.width, spec.depth
        ids = self.block_ids(spec)
        config = self.get_config()
        config.update(
            embed_dim=w, depths=list(self.subnet_depths(spec)),
            min_width=min(self.min_width, w), min_depth=min(self.min_depth, d),
            shifts=[[self.shifts[s][j] for j in stage_ids] for s, stage_ids in enumerate(ids)],
            name=f"{self.name}_w{w}_d{d}",
            named_subnets={},  # the teacher's names mean other blocks in a smaller grid
        )
        with HostInitializer.skipped():  # every weight is overwritten below
            sub = ElasticSwin.from_config(config)

        def put(variable, value):
            variable.assign(value)

        def copy_norm(src, dst, active):
            gamma, beta = src.sliced_weights(active, on_host=True)
            put(dst.norm.gamma, gamma)
            put(dst.norm.beta, beta)

        def copy_dense(src, dst, active_in, active_out):
            kernel, bias = src.sliced_weights(active_in, active_out, on_host=True)
            put(dst.dense.kernel, kernel)
            if bias is not None:
                put(dst.dense.bias, bias)

        kernel, bias = self.patch_embed.sliced_weights(w, on_host=True)
        put(sub.patch_embed.proj.kernel, kernel)
        put(sub.patch_embed.proj.bias, bias)
        copy_norm(self.patch_norm, sub.patch_norm, w)
        for s in range(self.num_stages):
            c = self.stage_width(s, w)
            hidden = int(c * self.mlp_ratio)
            for j_new, j in enumerate(ids[s]):
                src, dst = self.stages[s][j], sub.stages[s][j_new]
                copy_norm(src.norm1, dst.norm1, c)
                copy_norm(src.norm2, dst.norm2, c)
                copy_dense(src.attn.qkv, dst.attn.qkv, c, c)
                copy_dense(src.attn.proj, dst.attn.proj, c, c)
                put(dst.attn.relative_position_bias_table,
                    src.attn.sliced_bias_table(c // self.head_dim, on_host=True))
                copy_dense(src.mlp.fc1, dst.mlp.fc1, c, hidden)
                copy_dense(src.mlp.fc2, dst.mlp.fc2, hidden, c)
            copy_norm(self.norms[s], sub.norms[s], c)
            if s < self.num_stages - 1:
                gamma, beta, kernel = self.downsamples[s].sliced_weights(c, on_host=True)
                dst = sub.downsamples[s]
                put(dst.norm.gamma, gamma)
                put(dst.norm.beta, beta)
                put(dst.reduction.kernel, kernel)
        return sub

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
            depths=list(self.depths), head_dim=self.head_dim, window_size=self.window_size,
            min_width=self.min_width, min_depth=self.min_depth, mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias, drop_path_rate=self.drop_path_rate,
            drop_path_uniform=self.drop_path_uniform, norm_epsilon=self.norm_epsilon,
            in_channels=self.in_channels, shifts=[list(stage) for stage in self.shifts],
            net_select_scale=self.net_select_scale,
            named_subnets={k: [s.width, s.depth] for k, s in self._named.items()},
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

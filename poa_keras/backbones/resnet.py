"""ElasticResNet: a GroupNorm bottleneck ResNet whose every (mid width, stage depths)
sub-network can be run by slicing (``model(x, subnet=spec)``) or extracted as a standalone
ResNet (``model.extract(spec)``) -- POA's elastic ResNet (REFERENCE.md §1 "Elastic ResNet";
alipay/POA poa/models/resnet.py, poa/layers/block.py).

Layout (channels-last): stem = 7 x 7/2 conv (padding 3) -> GroupNorm -> ReLU -> 3 x 3/2 max pool
(padding 1); then stages of bottleneck blocks (``ElasticBottleneck``: 1 x 1 -> 3 x 3/s -> 1 x 1,
GroupNorm after every conv, the stride on the 3 x 3 conv, a 1 x 1/s conv + GroupNorm shortcut on
each stage's first block); the feature is the global average of the last stage. No final norm.

Elasticity (the reference's, "order" mode):

* width: the bottleneck MID width only. ``width`` (the spec) is the mid width of stage 1;
  stage i uses ``width * 2**i``. The reference teacher offers 64, 96 and 128 (twice the standard
  ResNet's 64 at most). Stem and block output channels (``expansion * base_channels * 2**i``,
  256 .. 2048) are fixed, so every subnet's feature has the same width.
* depths: blocks per stage, each between its min and max (reference: 3, 4..8, 6..36, 3); a
  stage of depth d of D keeps blocks floor((D - 1) j / (d - 1)) (``elastic.spec.block_ids``,
  the ViT's rule; block 0, which holds the shortcut conv, is always kept).
* GroupNorm over a sliced mid width keeps its number of groups and shrinks the group size
  (``elastic/conv.py``), as the reference does. BatchNorm is not offered: sliced running
  statistics are not a sub-network's statistics.
"""
from __future__ import annotations

import itertools
import re

import keras
import numpy as np
from keras import ops

from poa_keras.backbones.base import Backbone
from poa_keras.elastic.conv import (ElasticBottleneck, ElasticConv2D, ElasticGroupNorm,
                                    conv_output_size)
from poa_keras.elastic.layers import HostInitializer, read_weight
from poa_keras.elastic.spec import ResNetSubnet, block_ids
from poa_keras.quantization.observer import ActivationQuantizer, current_quant

_STANDARD_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
                    "resnet152": (3, 8, 36, 3)}
CONFIGS = {
    # Plain (non-elastic) GroupNorm ResNets of the standard width.
    **{name: dict(image_size=224, widths=(64,), max_depths=depths)
       for name, depths in _STANDARD_DEPTHS.items()},
    # The POA teacher: mid widths 64 / 96 / 128 (stage 1), depths [3, 4..8, 6..36, 3]:
    # 3 x 155 = 465 subnets; R50 / R101 / R152 at the narrowest width.
    "resnet_elastic": dict(
        image_size=224, stem_channels=64, base_channels=64, widths=(64, 96, 128),
        max_depths=(3, 8, 36, 3), min_depths=(3, 4, 6, 3), num_groups=32, net_select_scale=2,
        named_subnets={"r50": (64, (3, 4, 6, 3)), "r101": (64, (3, 4, 23, 3)),
                       "r152": (64, (3, 8, 36, 3))}),
    # Tiny elastic ResNet for tests: outputs 32..256, mid widths 8 / 12 (groups of 2 / 3
    # channels), depths (1, 1..2, 2..3, 1): 2 x 4 = 8 subnets.
    "resnet_elastic_test": dict(
        image_size=32, stem_channels=8, base_channels=8, widths=(8, 12),
        max_depths=(1, 2, 3, 1), min_depths=(1, 1, 2, 1), num_groups=4, net_select_scale=2,
        named_subnets={"small": (8, (1, 1, 2, 1)), "large": (12, (1, 2, 3, 1))}),
    # Small elastic ResNet for CPU demos: outputs 64..512, mid widths 16 / 24 / 32 (groups of
    # 2 / 3 / 4 channels as in the teacher), depths (2, 2..3, 2..4, 2): 3 x 6 = 18 subnets.
    "resnet_elastic_demo": dict(
        image_size=64, stem_channels=16, base_channels=16, widths=(16, 24, 32),
        max_depths=(2, 3, 4, 2), min_depths=(2, 2, 2, 2), num_groups=8, net_select_scale=2,
        named_subnets={"small": (16, (2, 2, 2, 2)), "base": (16, (2, 3, 4, 2)),
                       "large": (32, (2, 3, 4, 2))}),
}

_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")
_STEM_PARTS = ("stem_conv", "stem_norm")


def resnet_layer_id(path, depths, stem_parts, name):
    """The ResNet families' layer id of a variable path: 0 for a part in ``stem_parts``,
    ``sum(depths[:s]) + j + 1`` under ``stage{s+1}_block{j}``, ``sum(depths)`` otherwise."""
    parts = str(path).split("/")
    if any(part in stem_parts for part in parts):
        return 0
    for part in parts:
        match = _BLOCK.match(part)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            if not (0 <= stage < len(depths) and block < depths[stage]):
                raise ValueError(f"{path}: no block {block} in stage {stage + 1} of "
                                 f"{name} (depths {tuple(depths)})")
            return sum(depths[:stage]) + block + 1
    return sum(depths)


@keras.saving.register_keras_serializable(package="poa_keras")
class ElasticResNet(Backbone):
    """Bottleneck ResNet with GroupNorm, an elastic mid width and elastic stage depths.

    Args:
        image_size: the training resolution (default size of ``subnet_flops``); any input size
            works.
        in_channels: image channels.
        stem_channels: channels of the stem conv (fixed).
        base_channels: stage i's blocks output ``expansion * base_channels * 2**i`` channels
            (fixed).
        expansion: output / standard mid width (4).
        widths: the mid-width choices of stage 1, ascending (stage i: ``w * 2**i``); the last
            one is the full network's. Each must be a multiple of `num_groups`.
        max_depths: blocks per stage of the full network.
        min_depths: smallest depth per stage (default: no depth elasticity).
        strides: stride of each stage's first block.
        num_groups: GroupNorm groups (fixed; group size = channels / groups).
        norm_epsilon: GroupNorm epsilon (PyTorch's 1e-5, as the reference).
        drop_path_rate: stochastic depth rate of the residual branches (the reference: 0),
            the same for every block if `drop_path_uniform`, else increasing linearly from 0
            over all blocks.
        zero_init_residual: initialise every block's last GroupNorm gain to 0 (Goyal et al.;
            the reference has the flag but never applies it: default False).
        net_select_scale: sampling weight of the shallowest depth combination (reference 2;
            see ``sampling_counts``).
        named_subnets: {name: (width, depths)} of well-known sizes.

    Call: ``model(images, subnet=None, training=None, return_feature_maps=False)`` with images
    (B, H, W, in_channels). Returns ``{"cls": (B, C), "pooled": (B, C)}`` (the global average of
    the last stage, C = ``feature_dim()``, the same for every subnet: a convolutional backbone
    gives its pooled feature as "cls" so that trainers and k-NN work unchanged) and, with
    ``return_feature_maps=True``, ``"feature_maps"``: the output of every stage, a list of
    (B, H_i, W_i, C_i). (Per-stage maps come on request only: trainers detach every output
    with ``ops.stop_gradient``, which takes tensors, not lists, on TensorFlow and PyTorch.)
    """

    subnet_class = ResNetSubnet
    supports_masks = False
    configs = CONFIGS
    family = "ResNet"

    def __init__(self, image_size=224, in_channels=3, stem_channels=64, base_channels=64,
                 expansion=4, widths=(64,), max_depths=(3, 4, 6, 3), min_depths=None,
                 strides=(1, 2, 2, 2), num_groups=32, norm_epsilon=1e-5, drop_path_rate=0.0,
                 drop_path_uniform=True, zero_init_residual=False, net_select_scale=2,
                 named_subnets=None, **kwargs):
        super().__init__(**kwargs)
        max_depths = tuple(int(d) for d in max_depths)
        min_depths = max_depths if min_depths is None else tuple(int(d) for d in min_depths)
        strides = tuple(int(s) for s in strides)
        widths = [int(w) for w in widths]
        if not len(max_depths) == len(min_depths) == len(strides) >= 1:
            raise ValueError(f"max_depths {max_depths}, min_depths {min_depths} and strides "
                             f"{strides} must have one entry per stage")
        for stage, (lo, hi) in enumerate(zip(min_depths, max_depths)):
            if not 1 <= lo <= hi:
                raise ValueError(f"stage {stage + 1}: min depth {lo} must lie in [1, {hi}] "
                                 f"(max_depths {max_depths}, min_depths {min_depths})")
        if not widths or widths != sorted(set(widths)) or widths[0] <= 0:
            raise ValueError(f"widths must be distinct positive mid widths in ascending order, "
                             f"got {widths}")
        num_stages = len(max_depths)
        outs = [int(expansion) * int(base_channels) * 2 ** i for i in range(num_stages)]
        for what, value in ([("stem_channels", int(stem_channels))]
                            + [(f"width {w}", w) for w in widths]
                            + [(f"stage {i + 1} output channels", c) for i, c in enumerate(outs)]):
            if value % int(num_groups):
                raise ValueError(f"{what} = {value} is not a multiple of num_groups="
                                 f"{num_groups} (GroupNorm)")
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.stem_channels = int(stem_channels)
        self.base_channels = int(base_channels)
        self.expansion = int(expansion)
        self._widths = tuple(widths)   # tuples: Keras would wrap a list attribute
        self.max_depths = max_depths
        self.min_depths = min_depths
        self.strides = strides
        self.num_groups = int(num_groups)
        self.norm_epsilon = float(norm_epsilon)
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_uniform = bool(drop_path_uniform)
        self.zero_init_residual = bool(zero_init_residual)
        self.net_select_scale = float(net_select_scale)
        self.num_stages = num_stages
        self.stage_out_channels = tuple(outs)
        self._named = {k: ResNetSubnet(int(v[0]), tuple(v[1]))
                       for k, v in (named_subnets or {}).items()}
        for spec in self._named.values():
            self.validate_subnet(spec)

        policy = self.dtype_policy
        # SSQL keeps the stem at 8 bits (weights and its output activation)
        self.stem_conv = ElasticConv2D(self.in_channels, self.stem_channels, 7, strides=2,
                                       padding=3, weight_bits=8, dtype=policy, name="stem_conv")
        self.stem_quant = ActivationQuantizer(8, dtype=policy, name="stem_quant")
        self.stem_norm = ElasticGroupNorm(self.stem_channels, self.num_groups,
                                          self.norm_epsilon, dtype=policy, name="stem_norm")
        total = sum(max_depths)
        rates = ([self.drop_path_rate] * total if self.drop_path_uniform
                 else [float(r) for r in np.linspace(0.0, self.drop_path_rate, total)])
        self.blocks = []
        offsets = []   # index in self.blocks of each stage's first block
        in_ch = self.stem_channels
        for s in range(num_stages):
            offsets.append(len(self.blocks))
            for j in range(max_depths[s]):
                self.blocks.append(ElasticBottleneck(
                    in_ch if j == 0 else outs[s], self.max_width * 2 ** s, outs[s],
                    strides=strides[s] if j == 0 else 1, groups=self.num_groups,
                    epsilon=self.norm_epsilon, drop_path=rates[len(self.blocks)],
                    zero_init_residual=self.zero_init_residual, dtype=policy,
                    name=f"stage{s + 1}_block{j}"))
            in_ch = outs[s]
        self.stage_offsets = tuple(offsets)
        self.build()

    def build(self, input_shape=None):
        self.stem_conv.build()
        self.stem_norm.build()
        self.stem_quant.build()
        for block in self.blocks:
            block.build()
        self.built = True

    # -- the grid ------------------------------------------------------------------------------
    @property
    def widths(self):
        """The mid-width choices of stage 1, ascending."""
        return list(self._widths)

    @property
    def max_width(self):
        return self._widths[-1]

    @property
    def stage_depths(self):
        """[[min .. max] of every stage]."""
        return [list(range(lo, hi + 1)) for lo, hi in zip(self.min_depths, self.max_depths)]

    def depth_combinations(self):
        """Every per-stage depth tuple, ordered by total depth (ties in lexicographic order):
        the order of the reference's ``create_dynamic_networks``."""
        return sorted(itertools.product(*self.stage_depths), key=sum)

    @property
    def full_subnet(self):
        return ResNetSubnet(self.max_width, self.max_depths)

    @property
    def named_subnets(self):
        return dict(self._named)

    def subnets(self):
        """The whole grid, width-major, then depth combinations by total depth: smallest first,
        the intact network last (reference teacher: 3 widths x 155 depth combinations = 465
        specs; a list of small tuples, cheap to enumerate)."""
        depths = self.depth_combinations()
        return [ResNetSubnet(w, d) for w in self.widths for d in depths]

    def sampling_counts(self, net_select_scale=None):
        """Repeats of each ``subnets()`` entry in the sampling list: the reference's ResNet rule
        (poa/models/resnet.py ``create_dynamic_networks``) weights DEPTH combinations only:
        ``round(ds_k)`` with ds running linearly from `net_select_scale` (2) down to 1 over the
        depth combinations ordered by total depth, the same for every width. (Unlike the ViT and
        Swin, whose counts are round(ws * ds) with a width factor too.) With scale 2, the
        shallower half of the combinations (ds >= 1.5; numpy rounds 1.5 to 2) appears twice."""
        scale = self.net_select_scale if net_select_scale is None else float(net_select_scale)
        n = len(self.depth_combinations())
        per_depth = np.round(np.linspace(scale, 1, n)).astype(np.int64).tolist()
        return per_depth * len(self.widths)

    def validate_subnet(self, spec):
        if spec.width not in self.widths:
            raise ValueError(f"width={spec.width} is not a mid-width choice of {self.name}; "
                             f"valid widths: {self.widths}")
        depths = tuple(spec.depths)
        ranges = ", ".join(f"{lo}..{hi}" if lo != hi else f"{lo}"
                           for lo, hi in zip(self.min_depths, self.max_depths))
        if len(depths) != self.num_stages:
            raise ValueError(f"depths={depths} must give one depth per stage "
                             f"({self.num_stages}); valid depths per stage: [{ranges}]")
        for s, (d, lo, hi) in enumerate(zip(depths, self.min_depths, self.max_depths)):
            if not lo <= d <= hi:
                raise ValueError(f"depths={depths}: stage {s + 1} depth {d} is out of range for "
                                 f"{self.name}; valid depths per stage: [{ranges}]")

    def subnet_from_kwargs(self, width=None, depths=None, **unknown):
        if unknown:
            raise ValueError(f"unknown subnet keyword(s) {sorted(unknown)} for "
                             f"{type(self).__name__}; valid: width=, depths=(one per stage)")
        if depths is not None and np.ndim(depths) == 0:
            raise ValueError(f"depths={depths!r} must give one depth per stage, e.g. "
                             f"{self.max_depths}")
        spec = ResNetSubnet(self.max_width if width is None else width,   # refuses 8.5
                            self.max_depths if depths is None else tuple(depths))
        self.validate_subnet(spec)
        return spec

    def feature_dim(self, subnet=None):
        """Channels of ``cls`` / ``pooled``: the last stage's output, the same for every subnet
        (so ``head_active_in`` is always None)."""
        self.resolve_subnet(subnet)
        return self.stage_out_channels[-1]

    def subnet_log_values(self, subnet):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        values = {"width": float(spec.width)}
        values.update({f"depth_{s + 1}": float(d) for s, d in enumerate(spec.depths)})
        return values

    def full_depth_subnet(self, subnet):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return ResNetSubnet(spec.width, tuple(self.max_depths))

    def block_ids(self, subnet=None):
        """Per stage, the indices of the blocks a subnet runs (all for the full network)."""
        spec = self.resolve_subnet(subnet)
        if spec is None:
            return [list(range(d)) for d in self.max_depths]
        return [block_ids(hi, d) for hi, d in zip(self.max_depths, spec.depths)]

    def layer_id(self, path):
        """Layer id of a variable (the reference's ``get_resnet_lr_decay_rate``): 0 = stem,
        ``sum(max_depths[:s]) + j + 1`` = block j of stage s (its shortcut included),
        ``sum(max_depths)`` for anything else (there is nothing else in the backbone)."""
        return resnet_layer_id(path, self.max_depths, _STEM_PARTS, self.name)

    @property
    def max_layer_id(self):
        """``sum(max_depths)``: the reference's ResNet rule (poa/utils/param_groups.py)
        ``layer_decay ** (sum(max_depths) - layer_id)`` gives the LAST block 1.0 (there is no
        final norm; the ViT's last block gets ``layer_decay``). Reference recipe: 0.95.
        ``patch_embed_lr_mult`` has no effect (``is_patch_embedding`` is False everywhere): the
        reference multiplies parameters named "patch_embed", and a ResNet has none (its stem
        trains at the layer-decayed rate)."""
        return sum(self.max_depths)

    def subnet_params(self, subnet=None):
        """Parameter count of a subnet (equals ``extract(subnet).count_params()``)."""
        spec = self.resolve_subnet(subnet) or self.full_subnet
        total = 49 * self.in_channels * self.stem_channels + 2 * self.stem_channels
        in_ch = self.stem_channels
        for s, depth in enumerate(spec.depths):
            mid, out = spec.width * 2 ** s, self.stage_out_channels[s]
            for j in range(depth):
                c_in = in_ch if j == 0 else out
                total += c_in * mid + 9 * mid * mid + mid * out + 2 * (mid + mid + out)
                if j == 0 and (self.strides[s] != 1 or c_in != out):
                    total += c_in * out + 2 * out
            in_ch = out
        return int(total)

    def subnet_flops(self, spec=None, image_size=None, include_norms=False, breakdown=False):
        """Analytic forward FLOPs of one image through a subnet (None: the intact network).

        Convention: a multiply-add counts as 2 FLOPs; a k x k conv from C_in to C_out channels
        with an H' x W' output costs 2 H' W' k^2 C_in C_out. Terms: ``stem`` (7 x 7/2 conv),
        and summed over the blocks a subnet runs, ``conv1`` (1 x 1, at the block's input
        resolution), ``conv2`` (3 x 3/s), ``conv3`` (1 x 1), ``downsample`` (the 1 x 1/s
        shortcut conv of each stage's first block). Sizes follow floor((H + 2p - k) / s) + 1.
        With ``include_norms``, ``norms``: 7 FLOPs per normalised element (as
        ``ElasticViT.subnet_flops``) for every GroupNorm. Not counted: ReLU, max pool, residual
        adds, the global average pool. (Standard ResNet-50 at 224: 4.09 G multiply-adds.)

        Args:
            spec: a subnet (spec, name or tuple) or None for the intact network.
            image_size: an int or (height, width); default the configuration's ``image_size``.
            include_norms: also count the GroupNorms.
            breakdown: return a dict of the terms and their ``total`` instead of an int.
        """
        spec = self.resolve_subnet(spec) or self.full_subnet
        h, w = self.flops_image_hw(image_size)
        terms = dict(stem=0, conv1=0, conv2=0, conv3=0, downsample=0, norms=0)
        h, w = conv_output_size(h, 7, 2, 3), conv_output_size(w, 7, 2, 3)
        terms["stem"] = 2 * h * w * 49 * self.in_channels * self.stem_channels
        terms["norms"] += 7 * h * w * self.stem_channels
        h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        in_ch = self.stem_channels
        for s, depth in enumerate(spec.depths):
            mid, out = spec.width * 2 ** s, self.stage_out_channels[s]
            for j in range(depth):
                c_in = in_ch if j == 0 else out
                stride = self.strides[s] if j == 0 else 1
                ho, wo = conv_output_size(h, 3, stride, 1), conv_output_size(w, 3, stride, 1)
                terms["conv1"] += 2 * h * w * c_in * mid
                terms["conv2"] += 2 * ho * wo * 9 * mid * mid
                terms["conv3"] += 2 * ho * wo * mid * out
                terms["norms"] += 7 * (h * w * mid + ho * wo * (mid + out))
                if j == 0 and (stride != 1 or c_in != out):
                    terms["downsample"] += 2 * ho * wo * c_in * out
                    terms["norms"] += 7 * ho * wo * out
                h, w = ho, wo
            in_ch = out
        if not include_norms:
            del terms["norms"]
        return self._flops_total(terms, breakdown)

    # -- forward -------------------------------------------------------------------------------
    def _check_images(self, images):
        self._check_image_sizes(images)

    def stem(self, images):
        """7 x 7/2 conv (padding 3) -> GroupNorm -> ReLU -> 3 x 3/2 max pool (padding 1):
        (B, H, W, in_channels) -> (B, H / 4, W / 4, stem_channels) (sizes rounded up). Never
        elastic."""
        x = ops.relu(self.stem_norm(self.stem_conv(images)))
        if current_quant() is not None:
            x = self.stem_quant(x)
        # zero padding equals PyTorch's -inf padding here: the input is >= 0 after the ReLU
        x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        return ops.max_pool(x, pool_size=3, strides=2, padding="valid")

    def call(self, images, subnet=None, training=None, masks=None, return_feature_maps=False,
             keep=None, quant=None):
        with self.quantization(quant, training):
            return self._forward(images, subnet, training, masks, return_feature_maps, keep)

    def _forward(self, images, subnet, training, masks, return_feature_maps, keep):
        self.reject_masks(masks)
        spec = self.resolve_subnet(subnet)
        self._check_images(images)
        # None: the intact mid width, no slicing at all (fewer blocks need no slicing either)
        active = None if spec is None or spec.width == self.max_width else spec.width
        x = self.stem(images)
        maps = []
        for s, ids in enumerate(self.run_block_ids(spec, keep)):
            stage_active = None if active is None else active * 2 ** s
            for i, flat in ids:
                x = self.blocks[self.stage_offsets[s] + i](x, active=stage_active,
                                                           training=training,
                                                           keep=self.keep_flag(keep, flat))
            maps.append(x)
        pooled = ops.mean(x, axis=(1, 2))
        return self.feature_outputs(pooled, maps, return_feature_maps)

    def layer_representations(self, images, subnet=None):
        """The tensors the layer-wise analysis (``eval/analysis.py``, CKA) compares, in depth
        order, run in inference mode and in float (outside any fake quantization):
        ``{"stem": (B, H / 4, W / 4, stem_channels)}``, the stem's output (after its max pool),
        then ``{"stage_{s}_block_{j}": (B, H_s, W_s, C_s)}``, the output map of every block the
        subnet runs (j: the block's index in the intact stage, so a subnet's names say which
        blocks it kept; the last one's mean is the ``pooled`` feature). The same computation
        as the call; the default call is unchanged."""
        with self.quantization(None, False):
            spec = self.resolve_subnet(subnet)
            self._check_images(images)
            active = None if spec is None or spec.width == self.max_width else spec.width
            x = self.stem(images)
            found = {"stem": x}
            for s, ids in enumerate(self.run_block_ids(spec, None)):
                stage_active = None if active is None else active * 2 ** s
                for j, _ in ids:
                    x = self.blocks[self.stage_offsets[s] + j](x, active=stage_active,
                                                               training=False)
                    found[f"stage_{s}_block_{j}"] = x
            return found

    # -- extraction ----------------------------------------------------------------------------
    def extract(self, subnet):
        """A new ElasticResNet of exactly this size (mid width and stage depths), alpha folded
        into its kernels: ``extract(s)(x)`` equals ``self(x, subnet=s)``. Its own grid holds
        the teacher's width choices up to ``s.width`` and depths from the teacher's minima up
        to ``s.depths``."""
        spec = self.resolve_subnet(subnet) or self.full_subnet
        w, depths = spec.width, tuple(spec.depths)
        config = self.get_config()
        config.update(
            widths=[x for x in self.widths if x <= w], max_depths=list(depths),
            min_depths=[min(lo, d) for lo, d in zip(self.min_depths, depths)],
            name=f"{self.name}_w{w}_d{'-'.join(map(str, depths))}",
            named_subnets={},  # the teacher's names mean other blocks in a smaller grid
        )
        with HostInitializer.skipped():  # every weight is overwritten below
            sub = ElasticResNet.from_config(config)
        sub.stem_conv.conv.kernel.assign(read_weight(self.stem_conv.conv.kernel, True))
        sub.stem_norm.norm.gamma.assign(read_weight(self.stem_norm.norm.gamma, True))
        sub.stem_norm.norm.beta.assign(read_weight(self.stem_norm.norm.beta, True))
        for s, ids in enumerate(self.block_ids(spec)):
            mid = w * 2 ** s
            for j, i in enumerate(ids):
                src = self.blocks[self.stage_offsets[s] + i]
                dst = sub.blocks[sub.stage_offsets[s] + j]
                dst.load_sliced_weights(src.sliced_weights(mid, on_host=True))
        return sub

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, in_channels=self.in_channels,
            stem_channels=self.stem_channels, base_channels=self.base_channels,
            expansion=self.expansion, widths=list(self.widths),
            max_depths=list(self.max_depths), min_depths=list(self.min_depths),
            strides=list(self.strides), num_groups=self.num_groups,
            norm_epsilon=self.norm_epsilon, drop_path_rate=self.drop_path_rate,
            drop_path_uniform=self.drop_path_uniform,
            zero_init_residual=self.zero_init_residual, net_select_scale=self.net_select_scale,
            named_subnets={k: [s.width, list(s.depths)] for k, s in self._named.items()},
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

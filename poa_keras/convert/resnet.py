"""torchvision's ResNet state dict (DINO's ``dino_resnet50_pretrain.pth``: torchvision's
``resnet50`` without ``fc``) -> our BatchNorm ``ResNet`` (``backbones/resnet_bn.py``), one
weight per key::

    conv1.weight, bn1.*                                     -> stem_conv, stem_norm
    layer{s}.{j}.conv{k}.weight, layer{s}.{j}.bn{k}.*       -> stage{s}_block{j}/conv{k}, norm{k}
    layer{s}.{j}.downsample.0.weight, downsample.1.*        -> downsample, downsample_norm
    (bn: weight, bias, running_mean, running_var; num_batches_tracked is dropped)

1 x 1 convs are dense kernels here ((out, in, 1, 1) -> (in, out)); k x k convs (out, in, k, k)
-> (k, k, in, out).
"""
from __future__ import annotations

import re

from poa_keras.convert.state import NORM_KEYS, RECOMPUTED_BUFFERS, assign_state
from poa_keras.elastic import weights_by_path

_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")


def official_key(path, ndim):
    """(torchvision key, layout) of a ResNet variable from its path below the model's name:
    ``stage2_block0/downsample_norm/moving_mean`` -> ("layer2.0.downsample.1.running_mean",
    "same")."""
    parts = [p for p in path.split("/") if p not in ("conv", "dense")]
    leaf, layers = parts[-1], parts[:-1]
    names = []
    for part in layers:
        block = _BLOCK.match(part)
        if block:
            names.append(f"layer{block.group(1)}.{block.group(2)}")
        elif part == "stem_conv":
            names.append("conv1")
        elif part == "stem_norm":
            names.append("bn1")
        elif part == "downsample":
            names.append("downsample.0")
        elif part == "downsample_norm":
            names.append("downsample.1")
        elif re.fullmatch(r"norm\d", part):
            names.append("bn" + part[4:])
        else:
            names.append(part)
    if leaf == "kernel":
        return ".".join(names + ["weight"]), "conv" if ndim == 4 else "conv1x1"
    return ".".join(names + [NORM_KEYS.get(leaf, leaf)]), "same"


def load_resnet_state(model, state, what):
    """Writes a torchvision ResNet state dict into ``model`` (a ``ResNet`` of the same
    architecture). Every key is used exactly once (``num_batches_tracked`` dropped)."""
    plan = []
    for path, variable in weights_by_path(model).items():
        if path.endswith("/range"):   # fake-quantizer ranges: ours, not the checkpoint's
            continue
        plan.append((variable, *official_key(path, len(variable.shape))))
    ignored = [k for k in state if RECOMPUTED_BUFFERS.search(k)]
    return assign_state(plan, state, what, ignored=ignored)


__all__ = ["load_resnet_state", "official_key"]

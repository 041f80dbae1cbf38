"""Backbone families: the elastic ViT, Swin and ResNet, the BatchNorm ResNet and TinyViT (one
size each), and the base classes of every family (``Backbone``; ``NonElasticBackbone`` for
families of one size)."""
from poa_keras.backbones.base import Backbone, NonElasticBackbone
from poa_keras.backbones.resnet import CONFIGS as RESNET_CONFIGS
from poa_keras.backbones.resnet import ElasticResNet
from poa_keras.backbones.resnet_bn import CONFIGS as RESNET_BN_CONFIGS
from poa_keras.backbones.resnet_bn import ResNet
from poa_keras.backbones.swin import CONFIGS as SWIN_CONFIGS
from poa_keras.backbones.swin import ElasticSwin
from poa_keras.backbones.tinyvit import CONFIGS as TINYVIT_CONFIGS
from poa_keras.backbones.tinyvit import TinyViT
from poa_keras.backbones.vit import CONFIGS as VIT_CONFIGS
from poa_keras.backbones.vit import ElasticViT

BACKBONE_CLASSES = {"ElasticViT": ElasticViT, "ElasticSwin": ElasticSwin,
                    "ElasticResNet": ElasticResNet, "ResNet": ResNet, "TinyViT": TinyViT}


def config_names():
    """{configuration name: backbone class name} over every family."""
    return {name: cls_name for cls_name, cls in BACKBONE_CLASSES.items()
            for name in cls.configs}


def from_config_name(config_name, **overrides):
    """Builds a named configuration of any family (e.g. "vit_elastic_demo"); keywords
    override its entries (see each family's ``from_config_name``)."""
    for cls in BACKBONE_CLASSES.values():
        if config_name in cls.configs:
            return cls.from_config_name(config_name, **overrides)
    raise ValueError(f"unknown backbone configuration {config_name!r}; known: "
                     f"{sorted(config_names())}")


__all__ = ["BACKBONE_CLASSES", "Backbone", "ElasticResNet", "ElasticSwin", "ElasticViT",
           "NonElasticBackbone", "RESNET_BN_CONFIGS", "RESNET_CONFIGS", "ResNet", "SWIN_CONFIGS",
           "TINYVIT_CONFIGS", "TinyViT", "VIT_CONFIGS", "config_names", "from_config_name"]

"""Elastic backbone families."""
from poa_keras.backbones.base import Backbone
from poa_keras.backbones.vit import CONFIGS as VIT_CONFIGS
from poa_keras.backbones.vit import ElasticViT

BACKBONE_CLASSES = {"ElasticViT": ElasticViT}

__all__ = ["Backbone", "ElasticViT", "VIT_CONFIGS", "BACKBONE_CLASSES"]

"""poa_keras: pretrain elastic vision backbones once, deploy every size (Keras 3: JAX,
TensorFlow, PyTorch)."""
from poa_keras.version import __version__
from poa_keras import elastic, preprocessing, presets, quantization
from poa_keras.backbones import (Backbone, ElasticResNet, ElasticSwin, ElasticViT, ResNet,
                                 TinyViT)
from poa_keras.elastic import ResNetSubnet, SubnetSampler, SwinSubnet, ViTSubnet
from poa_keras.classifier import ImageClassifier
from poa_keras import convert   # registers the converters of the zoo's checkpoint formats
from poa_keras.preprocessing import ImagePreprocessing

__all__ = ["Backbone", "ElasticResNet", "ElasticSwin", "ElasticViT", "ImageClassifier",
           "ImagePreprocessing", "ResNet", "convert", "ResNetSubnet", "SubnetSampler", "SwinSubnet",
           "TinyViT", "ViTSubnet", "elastic", "preprocessing", "presets", "quantization",
           "__version__"]

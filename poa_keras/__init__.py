"""poa_keras: pretrain elastic vision backbones once, deploy every size (Keras 3: JAX,
TensorFlow, PyTorch)."""
__version__ = "0.1.0"

from poa_keras import elastic, presets, quantization  # noqa: E402
from poa_keras.backbones import Backbone, ElasticResNet, ElasticSwin, ElasticViT  # noqa: E402
from poa_keras.elastic import SubnetSampler, SwinSubnet, ViTSubnet  # noqa: E402
from poa_keras.elastic.spec import ResNetSubnet  # noqa: E402
from poa_keras.classifier import ImageClassifier  # noqa: E402

__all__ = ["Backbone", "ElasticResNet", "ElasticSwin", "ElasticViT", "ImageClassifier",
           "ResNetSubnet", "SubnetSampler", "SwinSubnet", "ViTSubnet", "elastic", "presets",
           "quantization", "__version__"]

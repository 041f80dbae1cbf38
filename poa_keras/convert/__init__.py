"""Converting released checkpoints into this library's presets (docs/zoo.md): PyTorch ``.pth``
files read into numpy without PyTorch and without running pickled code
(``read_torch_checkpoint``); the state dicts of DINO, DINOv2, MAE, MAE-Lite (``load_vit_state``),
DINO's ResNet-50 (``load_resnet_state``) and TinyViT (``load_tinyvit_state``,
``tinyvit_from_state_dict``), each key used exactly once; and the formats the zoo cards name
(``sources``), registered with ``presets.register_converter`` when this package is imported
(``poa_keras/__init__.py`` imports it).
"""
from poa_keras.convert.resnet import load_resnet_state
from poa_keras.convert.sources import (FORMATS, build_architecture, convert_checkpoint,
                                       convert_file, official_state, register)
from poa_keras.convert.tinyvit import load_tinyvit_state, tinyvit_config, tinyvit_from_state_dict
from poa_keras.convert.torch_checkpoint import read_torch_checkpoint
from poa_keras.convert.vit import load_vit_state

register()

__all__ = ["FORMATS", "build_architecture", "convert_checkpoint", "convert_file",
           "load_resnet_state", "load_tinyvit_state", "load_vit_state", "official_state",
           "read_torch_checkpoint", "register", "tinyvit_config", "tinyvit_from_state_dict"]

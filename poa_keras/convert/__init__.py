"""Converting released checkpoints into this library's models: reading PyTorch ``.pth`` files
into numpy without PyTorch and without running pickled code (``read_torch_checkpoint``), and
TinyViT's official state dict (``tinyvit_from_state_dict``)."""
from poa_keras.convert.tinyvit import tinyvit_config, tinyvit_from_state_dict
from poa_keras.convert.torch_checkpoint import read_torch_checkpoint

__all__ = ["read_torch_checkpoint", "tinyvit_config", "tinyvit_from_state_dict"]

"""Converting released checkpoints into this library's presets. For now: reading PyTorch
``.pth`` files into numpy without PyTorch and without running pickled code
(``torch_checkpoint.read_torch_checkpoint``)."""
from poa_keras.convert.torch_checkpoint import read_torch_checkpoint

__all__ = ["read_torch_checkpoint"]

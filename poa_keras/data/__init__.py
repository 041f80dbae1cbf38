"""poa_keras.data: the embedded shapes data set, DINO multi-crop (tf.data) and patch masks.

  synthetic  make_shapes / load_shapes / train_val_split: procedurally generated, labelled
             images of shapes (numpy, seeded, any size).
  multicrop  multicrop_dataset: {"global": (2, B, H, W, 3), "local": (v, B, h, w, 3)} batches
             with DINO's augmentations, on tf.data for every backend; images_from_directory,
             images_from_dataset adapters.
  masking    block_mask / mask_batch: BEiT / iBOT block-wise patch masks (numpy, seeded).
  softlabels TinyViT's soft-label store: write_store / open_store / replay_augment /
             ReplayAugment / dense_soft_targets (tf.data; the augmentation replays from a seed).

The multicrop and softlabels names are imported lazily (on first use), so that importing
poa_keras.data does not import TensorFlow under the JAX or PyTorch backends.
"""
from poa_keras.data.masking import block_mask, mask_batch
from poa_keras.data.synthetic import (BACKGROUNDS, SHAPE_CLASSES, load_shapes, make_shapes,
                                      train_val_split)

_MULTICROP = ("multicrop_dataset", "images_from_directory", "images_from_dataset",
              "IMAGENET_MEAN", "IMAGENET_STD")
_SOFTLABELS = ("ReplayAugment", "SoftLabelStore", "dense_soft_targets", "open_store",
               "replay_augment", "write_store")

__all__ = ["BACKGROUNDS", "SHAPE_CLASSES", "block_mask", "load_shapes", "make_shapes",
           "mask_batch", "train_val_split", *_MULTICROP, *_SOFTLABELS]


def __getattr__(name):
    if name in _MULTICROP:
        from poa_keras.data import multicrop
        return getattr(multicrop, name)
    if name in _SOFTLABELS:
        from poa_keras.data import softlabels
        return getattr(softlabels, name)
    raise AttributeError(f"module 'poa_keras.data' has no attribute {name!r}")

"""The released checkpoints' formats, and converting one into a preset as its zoo card says.

A zoo card whose weights are an official checkpoint gives their ``format`` (one of
``FORMATS``) and the architecture (``class_name`` + ``config_name``; MAE's full files also a
``decoder``). ``convert_file(path, card, output_dir)`` reads the file without running pickled
code (``read_torch_checkpoint``), finds the state dict the format keeps (``official_state``),
builds the card's architecture, writes every key into it exactly once, records the card's
preprocessing and writes the preset atomically.

Where this plugs into loading: ``poa_keras/__init__.py`` imports ``poa_keras.convert``, whose
``__init__`` calls ``register()``: ``presets.register_converter(format, convert_file)`` for
every format. ``presets`` never imports a converter (or a backbone), so ``presets`` <-
``backbones`` <- ``convert`` stays a chain without a circle; ``presets.resolve`` downloads a
registered name's file and calls the converter registered for its format on first use.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from poa_keras import presets
from poa_keras.convert.resnet import load_resnet_state
from poa_keras.convert.state import check_arrays, model_state, select_prefix, strip_prefix
from poa_keras.convert.tinyvit import load_tinyvit_state
from poa_keras.convert.torch_checkpoint import read_torch_checkpoint
from poa_keras.convert.vit import load_vit_state
from poa_keras.elastic import weights_by_path

#: format -> what files it is (the card's ``weights.format``).
FORMATS = {
    "dino_pth": "DINO (facebookresearch/dino): a backbone state dict (dino_*_pretrain.pth), or "
                "a full training checkpoint (*_full_checkpoint.pth: its teacher's backbone is "
                "converted, the projection head dropped); ViT or torchvision ResNet-50",
    "dinov2_pth": "DINOv2 (facebookresearch/dinov2): a backbone state dict "
                  "(dinov2_vit*14_pretrain.pth), LayerScale and mask token included",
    "mae_pth": "MAE (facebookresearch/mae): {'model': state dict}; the encoder "
               "(mae_pretrain_vit_*.pth) or the encoder and decoder (the full files)",
    "maelite_pth": "MAE-Lite (wangsr126/mae-lite): {'model': state dict} with 'module.model.' "
                   "or 'model.' prefixes; pretrained files (encoder + decoder; a distilled "
                   "file's teacher and attention adapter are dropped)",
    "tinyvit_pth": "TinyViT (microsoft/Cream): a state dict, or {'model': state dict}; the "
                   "classification head, when present, is kept (a task preset)",
}

_DISTILL_PARTS = re.compile(r"^(module\.)?(tch_model|attn_adapter)\.")


def official_state(fmt, checkpoint, where="the checkpoint"):
    """The state dict in the source's own layout (timm ViT / torchvision ResNet / TinyViT key
    names) and the key groups dropped on purpose, from what ``read_torch_checkpoint`` gave."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {sorted(FORMATS)}")
    dropped = []
    if fmt == "dino_pth":
        if isinstance(checkpoint, dict) and "teacher" in checkpoint:   # a full checkpoint
            teacher = check_arrays(checkpoint["teacher"], f"{where}: its 'teacher'")
            state = select_prefix(strip_prefix(teacher, ("module.",)), "backbone.")
            head = [k for k in teacher if not k.split("module.", 1)[-1].startswith("backbone.")]
            if head:
                dropped.append(f"the teacher's projection head ({len(head)} keys)")
            dropped += [repr(key) for key in checkpoint if key != "teacher"]
            if not state:
                raise ValueError(f"{where}: its 'teacher' has no backbone.* keys; DINO's full "
                                 "checkpoints keep the teacher's backbone under 'backbone.'")
        else:
            state = strip_prefix(check_arrays(checkpoint, where), ("module.", "backbone."))
    elif fmt == "dinov2_pth":
        state = strip_prefix(check_arrays(checkpoint, where), ("module.", "backbone."))
    elif fmt == "mae_pth":
        state = model_state(checkpoint, where)
    elif fmt == "maelite_pth":
        state = model_state(checkpoint, where)
        extra = [k for k in state if _DISTILL_PARTS.match(k)]
        if extra:
            dropped.append(f"the distillation teacher and attention adapter ({len(extra)} "
                           "keys)")
        state = strip_prefix({k: v for k, v in state.items() if k not in extra},
                             ("module.model.", "model."))
        if "fc_norm.weight" in state:
            raise ValueError(
                f"{where} is a fine-tuned MAE-Lite file (fc_norm.* and head.*, no final norm): "
                "its blocks feed the average pool directly, which our ViT (always final-normed) "
                "cannot reproduce exactly; convert the pretrained file instead and fine-tune it "
                "here (pooling='avg_norm')")
    else:   # tinyvit_pth
        state = model_state(checkpoint, where)
    return state, dropped


def _card_class(card):
    arch = card["architecture"]
    klass = presets.registered_class(presets.registered_name_of(arch["class_name"]))
    if klass is None:
        raise ValueError(f"zoo card {card['name']!r}: unknown architecture class "
                         f"{arch['class_name']!r}")
    return klass


def build_architecture(card, **overrides):
    """The card's backbone, random weights, named after the card (and its MAE decoder when the
    card's architecture gives one); ``overrides`` change entries of its configuration (tests
    convert 2-block files with ``depth=2``)."""
    from poa_keras.heads.mae import MAEDecoder

    arch = card["architecture"]
    backbone = _card_class(card).from_config_name(arch["config_name"], name=card["name"],
                                                       **overrides)
    decoder = None
    if arch.get("decoder"):
        decoder = MAEDecoder(in_dim=backbone.embed_dim, patch_size=backbone.patch_size,
                             in_channels=backbone.in_channels, name="decoder",
                             **arch["decoder"])
        decoder.build()
    record = presets.read_preprocessing(card.get("preprocessing"),
                                        f"zoo card {card['name']!r}")
    if record is not None:
        backbone.preprocessing = record
    return backbone, decoder


def convert_checkpoint(checkpoint, card, where="the checkpoint", **overrides):
    """(model, decoder, dropped) of a checkpoint read by ``read_torch_checkpoint``, as the card
    says: ``model`` is the card's backbone with the weights, or an ``ImageClassifier`` on it
    when the file holds a classification head (TinyViT); ``decoder`` is MAE's decoder (or
    None); ``dropped`` names the key groups left out on purpose. ``overrides``: see
    ``build_architecture``."""
    fmt = card["weights"]["format"]
    state, dropped = official_state(fmt, checkpoint, where)
    backbone, decoder = build_architecture(card, **overrides)
    what = f"{card['name']} ({card['architecture']['config_name']})"
    model = backbone
    if fmt == "tinyvit_pth":
        model = load_tinyvit_state(backbone, state, what)
    elif backbone.family == "ResNet-BN":
        load_resnet_state(backbone, state, what)
    else:
        load_vit_state(backbone, state, what, decoder=decoder)
    return model, decoder, dropped


def _decoder_writer(decoder):
    def write(directory):
        import json

        import keras

        arrays = {path: np.asarray(keras.ops.convert_to_numpy(v))
                  for path, v in weights_by_path(decoder).items()}
        presets.save_variables(arrays, directory / presets.DECODER_WEIGHTS_FILE)
        (directory / presets.DECODER_FILE).write_text(json.dumps(
            {"class_name": type(decoder).__name__, "config": decoder.get_config()}, indent=2))
        return {"decoder": {"weights_sha256": presets.sha256_of(
            directory / presets.DECODER_WEIGHTS_FILE)}}
    return write


def convert_file(path, card, output_dir, sha256=None):
    """Converts the official checkpoint at ``path`` into the preset of ``card`` at
    ``output_dir`` (atomically; an existing preset there is replaced). Returns the directory.
    ``sha256``: the file's digest when the caller computed it already (else it is hashed).
    Registered for every format of ``FORMATS`` (``register``)."""
    path = Path(path)
    checkpoint = read_torch_checkpoint(path)
    model, decoder, dropped = convert_checkpoint(checkpoint, card, where=str(path))
    metadata = {"converted_from": {
        "preset": card["name"], "format": card["weights"]["format"],
        "url": card["weights"].get("url"), "file": path.name,
        "sha256": sha256 or presets.sha256_of(path), "dropped": dropped}}
    if getattr(model, "backbone", None) is not None:   # a classifier: backbone + task files
        model.save_to_preset(output_dir, metadata=metadata)
        return Path(output_dir)
    write = _decoder_writer(decoder) if decoder is not None else None
    return presets.save_preset(model, output_dir, metadata=dict(model.preset_metadata(),
                                                                **metadata), write_extra=write)


def register():
    """Registers ``convert_file`` for every format with ``presets.register_converter``."""
    for fmt in FORMATS:
        presets.register_converter(fmt, convert_file)


__all__ = ["FORMATS", "build_architecture", "convert_checkpoint", "convert_file",
           "official_state", "register"]

"""ImageClassifier: any backbone (or extracted subnet) plus a linear head, for fine-tuning.

    backbone = poa_keras.Backbone.from_preset("poa_vit_l", width=384, depth=12)
    clf = poa_keras.ImageClassifier(backbone, num_classes=10, pooling="avg")
    clf.fit(images, labels, epochs=5)      # compiled with defaults: AdamW, softmax CE, accuracy
    clf.compile(optimizer=clf.layer_decay_optimizer(                  # MAE-Lite fine-tuning
        keras.optimizers.AdamW(1e-3, weight_decay=0.05), layer_decay=0.85))
    clf.predict(images)                    # logits (B, num_classes), float32
    clf.save_to_preset("runs/clf")         # backbone, head and preprocessing: one preset
    clf = poa_keras.ImageClassifier.from_preset("runs/clf")          # the fine-tuned model
    clf = poa_keras.ImageClassifier.from_preset("poa_vit_l", num_classes=10, width=384,
                                                depth=12)            # a new head on a size

Images: uint8 images (0..255) go through the backbone's ``preprocessing`` (the record of its
preset: resized to the input size if needed, normalised as in training) inside ``call``, so
``fit`` / ``predict`` take raw images; float images are taken as already preprocessed.

MAE-Lite's fine-tuning head (REFERENCE.md §3): ``pooling="avg_norm"``, the mean of the patch
tokens followed by a LayerNorm (``fc_norm``, epsilon 1e-6, saved with the head).
poa_keras/finetune.py runs the whole recipe (checkpoints, resume, augmentation).

Layer-wise lr decay (BEiT / MAE / MAE-Lite fine-tuning, REFERENCE.md §3: layer decay 0.85):
``layer_decay_optimizer`` wraps any optimizer in ``poa_keras.optimizers.LRMultiplierOptimizer``
(Keras 3 optimizers have no parameter groups; see that module for when its rule equals a
PyTorch parameter group with lr ``m * lr``).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os

import keras
from keras import ops

from poa_keras import presets
from poa_keras.backbones.base import Backbone
from poa_keras.optimizers import LRMultiplierOptimizer
from poa_keras.quantization import FrozenGCQuantize, quantization_mode
from poa_keras.validation import check_multiplier

POOLINGS = ("cls", "avg", "avg_norm")
FC_NORM_EPSILON = 1e-6   # MAE-Lite's LayerNorm(eps=1e-6)
_HALF_DTYPES = ("float16", "bfloat16")


@keras.saving.register_keras_serializable(package="poa_keras")
class ImageClassifier(FrozenGCQuantize, keras.Model):
    """A backbone (elastic teacher, sliced subnet or extracted subnet) and a Dense head.

    Args:
        backbone: a ``poa_keras.Backbone`` (its call returns a dict with ``cls`` and/or
            ``pooled``, and ``patch_tokens`` for ViTs).
        num_classes: number of output logits (int >= 1).
        pooling: ``"cls"``: the head reads the ``cls`` output; ``"avg"``: the mean of the
            ``patch_tokens`` (MAE-Lite's "global pooling"; the tokens are final-normed);
            ``"avg_norm"``: that mean, then a LayerNorm of its own (``fc_norm``, MAE-Lite's
            fine-tuning head; unlike MAE-Lite, whose encoder drops its final norm when it
            pools, the backbone's final norm stays). A backbone without that output (no cls
            token, no patch tokens: ResNet, Swin) uses its ``pooled`` output for any choice
            (``"avg_norm"``: then normed).
        dropout: dropout rate on the pooled features before the head, in [0, 1).
        subnet: None (the backbone as it is), or a spec / tuple / size name: the classifier
            runs ``backbone(x, subnet=subnet)`` (weights sliced at run time). To deploy or
            fine-tune one size, ``backbone.extract(subnet)`` first is usually what you want.
        **kwargs: ``keras.Model`` arguments (``name``, ``dtype``).

    Call: ``clf(images, training=None)`` -> logits (B, num_classes). uint8 images (B, H, W, C)
    go through ``backbone.preprocessing`` first (resize to its input size if needed,
    normalisation as in training; in the compiled step, so ``fit``, ``evaluate`` and
    ``predict`` take raw images); float images are taken as already preprocessed, as the
    backbone takes them. Under a mixed policy (``"mixed_bfloat16"``, ``"mixed_float16"``) the
    head computes in float32, so the logits are float32.

    The head is ``Dense(num_classes)`` with truncated-normal (std 0.02) kernel and zero bias
    (timm's classifier initialisation), named ``head``; with ``pooling="avg_norm"`` a
    ``LayerNorm`` (epsilon 1e-6, gain 1, bias 0) named ``fc_norm`` comes before it. Both
    compute in float32 under a mixed policy. The classifier is compiled at
    construction with ``compile()``'s defaults (keras-hub's convention), so ``fit`` works
    right away; ``compile`` again to choose otherwise.
    """

    def __init__(self, backbone, num_classes, pooling="cls", dropout=0.0, subnet=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(f"backbone must be a Keras backbone (e.g. poa_keras.ElasticViT), got "
                            f"{type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int, got {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
                or not 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.backbone = backbone
        resolve = getattr(backbone, "resolve_subnet", None)
        if subnet is not None and resolve is None:
            raise ValueError(f"subnet={subnet!r} needs an elastic backbone; "
                             f"{type(backbone).__name__} has no resolve_subnet")
        self.subnet = None if resolve is None else resolve(subnet)
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self.dropout = float(dropout)

        if not hasattr(backbone, "feature_dim"):
            raise TypeError(f"{type(backbone).__name__} has no feature_dim(); ImageClassifier "
                            "needs it to build its head")
        self._feature_dim = int(backbone.feature_dim(self.subnet))
        compute = self.dtype_policy.compute_dtype
        head_dtype = "float32" if compute in _HALF_DTYPES else self.dtype_policy
        self.dropout_layer = (keras.layers.Dropout(self.dropout, dtype=self.dtype_policy,
                                                   name="dropout")
                              if self.dropout > 0 else None)
        self.fc_norm = (keras.layers.LayerNormalization(epsilon=FC_NORM_EPSILON,
                                                        dtype=head_dtype, name="fc_norm")
                        if pooling == "avg_norm" else None)
        self.head = keras.layers.Dense(
            self.num_classes, dtype=head_dtype, name="head",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            bias_initializer="zeros")
        self.build()
        self.compile()

    def build(self, input_shape=None):
        # Built at construction (in this layer's name scope: head paths "<name>/head/..."), so
        # that weights exist for loading and for an optimizer before the first call.
        if self.fc_norm is not None and not self.fc_norm.built:
            self.fc_norm.build((None, self._feature_dim))
        if not self.head.built:
            self.head.build((None, self._feature_dim))
        self.built = True

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """``keras.Model.compile`` with defaults for "auto": ``AdamW(1e-4, weight_decay=0.05)``
        (a conservative fine-tuning lr; see `layer_decay_optimizer` for the MAE-Lite recipe),
        sparse softmax cross-entropy on the logits, and sparse categorical accuracy
        ("accuracy")."""
        if isinstance(optimizer, str) and optimizer == "auto":
            optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.05)
        if isinstance(loss, str) and loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if isinstance(metrics, str) and metrics == "auto":
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``, with the optimizer's variables created first: without a
        tf.distribute strategy, Keras' TensorFlow trainer leaves them to the step, and
        variables created in the first trace make TensorFlow trace the step twice (a fine-tuning
        run on TensorFlow compiled for twice as long). Not done in ``compile``: a classifier
        used only for inference keeps no optimizer state."""
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        return super().fit(*args, **kwargs)

    def compile_from_config(self, config):
        # compile() takes keras.Model.compile's arguments ("auto" defaults only added), so the
        # saved ones replay unchanged; Keras skips an overridden compile() unless told so.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)   # variables to load the state into

    def _pool(self, outputs):
        if not isinstance(outputs, dict):
            raise TypeError(f"the backbone must return a dict of outputs, got "
                            f"{type(outputs).__name__}")
        if self.pooling != "cls" and "patch_tokens" in outputs:
            tokens = outputs["patch_tokens"]
            features = ops.mean(ops.cast(tokens, self.head.compute_dtype), axis=1)
        else:
            key = "cls" if "cls" in outputs else "pooled"
            if key not in outputs:
                raise ValueError(f"the backbone's outputs have neither 'cls' nor 'pooled' (got "
                                 f"{sorted(outputs)})")
            features = outputs[key]
        if self.fc_norm is not None:
            features = self.fc_norm(ops.cast(features, self.fc_norm.compute_dtype))
        return features

    @property
    def preprocessing(self):
        """The backbone's ``ImagePreprocessing`` (None for a backbone without one): what uint8
        images get on their way in."""
        return getattr(self.backbone, "preprocessing", None)

    def call(self, images, training=None):
        kwargs = {} if self.subnet is None else {"subnet": self.subnet}
        preprocessing = self.preprocessing
        if preprocessing is not None and \
                keras.backend.standardize_dtype(images.dtype) == "uint8":
            images = preprocessing(images)
        features = self._pool(self.backbone(images, training=training, **kwargs))
        if self.dropout_layer is not None:
            features = self.dropout_layer(features, training=training)
        return self.head(ops.cast(features, self.head.compute_dtype))

    # -- layer-wise lr decay -------------------------------------------------------------------
    def lr_multipliers(self, layer_decay=1.0, patch_embed_lr_mult=1.0):
        """{variable path: lr multiplier} of every trainable variable: the backbone's come from
        ``backbone.lr_multiplier(path, layer_decay, patch_embed_lr_mult)`` (ViT: layer id 0
        for the embeddings, i + 1 for block i, depth + 1 for the final norm; multiplier
        ``layer_decay ** (depth + 1 - id)``), the head's are 1.

        With ``subnet`` set, the layer ids are those of the full backbone (its ``depth``); extract
        the subnet first for the ids of its own depth."""
        check_multiplier(layer_decay, "layer_decay")
        check_multiplier(patch_embed_lr_mult, "patch_embed_lr_mult")
        rule = getattr(self.backbone, "lr_multiplier", None)
        if rule is None:   # not a poa_keras Backbone: no layer ids
            if (layer_decay, patch_embed_lr_mult) != (1.0, 1.0):
                raise ValueError(f"{type(self.backbone).__name__} defines no lr_multiplier "
                                 "(no layer ids); layer_decay and patch_embed_lr_mult must be 1")
            rule = lambda path, *_: 1.0  # noqa: E731
        backbone_ids = {id(v) for v in self.backbone.trainable_variables}
        multipliers = {}
        for variable in self.trainable_variables:
            if id(variable) in backbone_ids:
                m = rule(variable.path, layer_decay, patch_embed_lr_mult)
            else:
                m = 1.0
            multipliers[variable.path] = float(m)
        return multipliers

    def layer_decay_optimizer(self, optimizer="adamw", layer_decay=0.75, patch_embed_lr_mult=1.0):
        """``optimizer`` (an unbuilt Keras optimizer, or a name / config ``keras.optimizers.get``
        takes) wrapped in an `LRMultiplierOptimizer` with ``lr_multipliers(layer_decay,
        patch_embed_lr_mult)``: pass it to ``compile``."""
        inner = keras.optimizers.get(optimizer)
        return LRMultiplierOptimizer(inner, self.lr_multipliers(layer_decay, patch_embed_lr_mult))

    # -- presets -------------------------------------------------------------------------------
    def save_to_preset(self, preset_dir, metadata=None):
        """Writes the classifier as one preset, atomically: its (fine-tuned) backbone as a
        backbone preset (config.json with the preprocessing, metadata.json, model.weights.h5;
        ``Backbone.from_preset`` loads it) plus ``task.json`` (this config without the
        backbone) and ``task.weights.h5`` (the head). The optimizer is not saved.
        ``metadata``: more entries of metadata.json (a converted checkpoint's source).
        ``ImageClassifier.from_preset(preset_dir)`` reloads the classifier."""
        if not isinstance(self.backbone, Backbone):
            raise TypeError(f"save_to_preset needs a poa_keras Backbone, got "
                            f"{type(self.backbone).__name__}; save the model with "
                            "model.save(...) instead")
        if quantization_mode(self) is not None or quantization_mode(self.backbone) is not None:
            raise ValueError("a quantized ImageClassifier does not save as a preset: save the "
                             "float classifier, and quantize it after loading")
        task = keras.saving.serialize_keras_object(self)
        for key in ("compile_config", "build_config"):   # training state, not the model
            task.pop(key, None)
        task["config"].pop("backbone")                   # that is config.json
        own = self._own_variables()

        def write_task(directory):
            (directory / presets.TASK_FILE).write_text(json.dumps(task, indent=2))
            presets.save_variables({name: keras.ops.convert_to_numpy(v)
                                    for name, v in own.items()},
                                   directory / presets.TASK_WEIGHTS_FILE)
            return {"task": {
                "class_name": type(self).__name__, "num_classes": self.num_classes,
                "parameter_count": int(self.count_params()),
                "weights_sha256": presets.sha256_of(directory / presets.TASK_WEIGHTS_FILE)}}

        written = dict(self.backbone.preset_metadata(), **(metadata or {}))
        presets.save_preset(self.backbone, preset_dir, metadata=written,
                            write_extra=write_task)

    @classmethod
    def from_preset(cls, preset, num_classes=None, load_weights=True, subnet=None,
                    pooling=None, dropout=None, name=None, **size):
        """A classifier from a preset.

        * A classifier preset (``save_to_preset``): the fine-tuned classifier, head included,
          with the saved ``pooling`` / ``dropout`` / ``subnet`` unless given. With a size
          (``subnet=`` or keywords such as ``width=..., depth=...``) or another
          ``num_classes``, its fine-tuned backbone (that size extracted) gets a NEW head
          (``num_classes`` defaulting to the saved one).
        * A backbone preset (a registered name or a directory): ``num_classes`` is required;
          ``Backbone.from_preset(preset, load_weights, subnet, **size)`` with a new head.

        The backbone's ``preprocessing`` is the preset's, so uint8 images work at once.
        """
        task = presets.read_task(preset, load_weights=load_weights)
        sized = subnet is not None or any(v is not None for v in size.values())
        given = {k: v for k, v in (("pooling", pooling), ("dropout", dropout), ("name", name))
                 if v is not None}
        if task is None:
            if num_classes is None:
                raise ValueError(f"preset {os.fspath(preset)!r} holds a backbone only: give "
                                 "num_classes= for a new classification head")
            backbone = Backbone.from_preset(preset, load_weights=load_weights, subnet=subnet,
                                            **size)
            return cls(backbone, num_classes, **given)
        klass = presets.registered_class(task.registered_name)
        if not (isinstance(klass, type) and issubclass(klass, cls)):
            raise ValueError(f"{task.where} holds a {task.class_name!r} task, not an "
                             f"{cls.__name__}")
        saved = dict(task.config)
        if sized or (num_classes is not None and num_classes != saved["num_classes"]):
            # A new head on the fine-tuned backbone (of the requested size).
            backbone = Backbone.from_preset(preset, load_weights=load_weights, subnet=subnet,
                                            **size)
            args = {k: saved[k] for k in ("pooling", "dropout") if k in saved}
            args.update(given)
            return klass(backbone, saved["num_classes"] if num_classes is None else num_classes,
                         **args)
        backbone = Backbone.from_preset(preset, load_weights=load_weights)
        saved.update(given)
        if saved.get("subnet") is not None:
            saved["subnet"] = _to_tuples(saved["subnet"])
        classifier = klass(backbone=backbone, **saved)
        if task.weights is not None:
            classifier._load_own_variables(presets.load_variables(
                task.weights, task.weights_sha256, task.where))
        return classifier

    def _own_variables(self):
        """{path below this model's name: variable} of the variables outside the backbone."""
        backbone_ids = {id(v) for v in self.backbone.weights}
        prefix = f"{self.name}/"
        return {v.path[len(prefix):] if v.path.startswith(prefix) else v.path: v
                for v in self.weights if id(v) not in backbone_ids}

    def _load_own_variables(self, arrays):
        own = self._own_variables()
        if sorted(arrays) != sorted(own):
            raise ValueError(f"the preset's task weights hold {sorted(arrays)}, but this "
                             f"classifier has {sorted(own)}: the preset is of another head")
        for name, variable in own.items():
            value = arrays[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"the preset's task weight {name!r} has shape "
                                 f"{tuple(value.shape)}, the classifier's "
                                 f"{tuple(variable.shape)}")
            variable.assign(value)

    # -- configuration -------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            num_classes=self.num_classes, pooling=self.pooling, dropout=self.dropout,
            subnet=_to_lists(self.subnet),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("subnet") is not None:
            config["subnet"] = _to_tuples(config["subnet"])
        return cls(**config)


def _to_lists(value):
    """A spec (dataclass) or nested tuples -> nested lists (JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.astuple(value)
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value

"""The Backbone base class: what every family shares (the grid and its sampler, extraction,
presets through ``from_preset``, the layer-decay rule), and ``NonElasticBackbone`` for families
of one size. Families implement the few family-specific hooks; tests/family_contract.py is the
contract they all pass."""
from __future__ import annotations

import os

import keras
import numpy as np

from poa_keras import presets
from poa_keras.elastic.layers import assign_by_path, read_weight, weights_by_path
from poa_keras.elastic.sampler import SubnetSampler
from poa_keras.elastic.spec import IntactSubnet
from poa_keras.preprocessing import ImagePreprocessing
from poa_keras.quantization import FrozenGCQuantize, quantization_mode, quantize
from poa_keras.quantization.observer import (QuantConfig, activation_quantizers,
                                             quantization_scope)
from poa_keras.validation import image_hw


def check_bn_momentum(bn_momentum):
    """The BatchNorm families' check of ``bn_momentum``: in [0, 1), Keras' convention."""
    if not 0.0 <= float(bn_momentum) < 1.0:
        raise ValueError(f"bn_momentum must lie in [0, 1) (Keras' convention: 0.9 is "
                         f"PyTorch's momentum 0.1), got {bn_momentum}")


def check_drop_path_rate(drop_path_rate):
    """A stochastic depth rate in [0, 1)."""
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")


def layer_decay_multiplier(layer_id, max_layer_id, layer_decay):
    """``layer_decay ** (max_layer_id - layer_id)``: the layer-wise lr decay rule of BEiT,
    DINOv2 and POA (the last layer id gets 1, every layer below one more factor of the
    decay)."""
    if not 0 <= int(layer_id) <= int(max_layer_id):
        raise ValueError(f"layer id {layer_id} out of range [0, {max_layer_id}]")
    return float(layer_decay) ** (int(max_layer_id) - int(layer_id))


def backbone_class(registered_name, class_name, where):
    """The Backbone subclass Keras' registry holds under ``registered_name``; a ValueError
    naming the known poa_keras architectures for anything else (nothing is imported)."""
    klass = presets.registered_class(registered_name)
    if not (isinstance(klass, type) and issubclass(klass, Backbone)):
        raise ValueError(f"{where} holds {class_name!r}, which is not a poa_keras backbone; "
                         f"known architectures: {known_architectures()}")
    return klass


def known_architectures():
    """Class names of the backbone families poa_keras registers ("poa_keras>..." names)."""
    return sorted(name.split(">", 1)[1] for name, obj in keras.saving.get_custom_objects().items()
                  if name.startswith("poa_keras>") and isinstance(obj, type)
                  and issubclass(obj, Backbone))


_UNBUILT_CLASSES = {}   # Backbone subclass -> its subclass without weights (Backbone.unbuilt)


class Backbone(FrozenGCQuantize, keras.Model):
    """An elastic backbone: one set of full-size weights, many sub-networks.

    Families define:
      * ``subnet_class``: the spec type (e.g. ``ViTSubnet``);
      * ``full_subnet``: the spec of the intact network;
      * ``subnets()``: the grid, smallest first;
      * ``validate_subnet(spec)``: ValueError naming the valid values;
      * ``subnet_from_kwargs(**kw)``: a spec from user keywords (width=..., depth=...);
      * ``sampling_counts()``: how often each grid entry appears in the sampling list;
      * ``extract(spec)``: a new backbone of the same class with exactly that size;
      * ``feature_dim(spec)``: channels of the ``cls`` / ``pooled`` output of a subnet;
      * ``subnet_log_values(spec)``: a few numbers that describe a spec in training logs;
      * ``layer_id(path)``, ``max_layer_id``, ``is_patch_embedding(path)`` (optional): the
        layer ids of layer-wise lr decay (``lr_multiplier`` applies the one rule);
      * ``supports_masks``: whether ``call`` takes iBOT ``masks`` (and returns patch tokens);
      * ``block_ids(spec)`` and ``full_depth_subnet(spec)`` (families of elastic depth): the
        blocks a spec runs (a list, or one list per stage) and the spec with its width and the
        intact depth; ``call`` then takes ``keep=`` (see ``block_keep``).

    Trainers, heads and evaluation only talk to these hooks, so a new family works with them
    without family-specific code there.

    Every backbone carries ``preprocessing``, the ``ImagePreprocessing`` that turns raw images
    into its input (size rule, interpolation, mean / std); a constructor keyword of every
    family (``preprocessing=``, an ``ImagePreprocessing`` or its config), recorded in
    ``get_config`` and so in presets and extracted subnets. Without one (and in presets saved
    before it was recorded) it is ``default_preprocessing()``: the ``image_size`` of the
    configuration, ImageNet mean / std (the training pipeline's default).
    """

    supports_masks = False

    subnet_class = None
    configs: dict = {}   # named configurations of the family (see ``from_config_name``)
    family: str = "backbone"   # the family's name in messages ("ViT", "Swin", "ResNet")

    def __init__(self, *args, preprocessing=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_preprocessing_record"] = ImagePreprocessing.coerce(preprocessing)

    # -- how images enter the network ----------------------------------------------------------
    @property
    def preprocessing(self):
        """The ``ImagePreprocessing`` raw (uint8) images need: ``backbone.preprocessing(images)``
        gives this network's float input. Assign an ``ImagePreprocessing`` (or its config) to
        record another one; None restores ``default_preprocessing()``."""
        recorded = self.__dict__.get("_preprocessing_record")
        return recorded if recorded is not None else self.default_preprocessing()

    @preprocessing.setter
    def preprocessing(self, value):
        self.__dict__["_preprocessing_record"] = ImagePreprocessing.coerce(value)

    def default_preprocessing(self):
        """What a backbone with no recorded preprocessing gets (and presets saved before the
        record existed): resize to the configuration's ``image_size`` (images already that size
        are used as they are), ImageNet mean / std."""
        return ImagePreprocessing(image_size=getattr(self, "image_size", None))

    def get_config(self):
        config = super().get_config()
        config["preprocessing"] = self.preprocessing.get_config()
        return config

    @classmethod
    def unbuilt(cls, config=None, config_name=None, **overrides):
        """An instance of a configuration (a config dict, or a named configuration and
        overrides) WITHOUT weights: its ``build`` is skipped, so it costs no memory and a
        fraction of a second even for a ViT-L. Only its grid answers (``subnets``,
        ``named_subnets``, ``resolve_subnet``, ``subnet_from_kwargs``, ``validate_subnet``):
        ``from_preset`` checks a size with it before building the network."""
        probe = _UNBUILT_CLASSES.get(cls)
        if probe is None:
            def build(self, input_shape=None):
                pass   # no weights

            probe = type(cls.__name__, (cls,), {"build": build, "__qualname__": cls.__qualname__,
                                                "__module__": cls.__module__})
            _UNBUILT_CLASSES[cls] = probe
        if config is not None:
            return probe.from_config(dict(config, **overrides))
        return probe.from_config_name(config_name, **overrides)

    @classmethod
    def from_config_name(cls, config_name, **overrides):
        """Builds a named configuration of this family (see ``cls.configs``); keywords
        override its entries (and may set the Keras ``name`` or ``dtype``)."""
        if config_name not in cls.configs:
            raise ValueError(f"unknown {cls.family} configuration {config_name!r}; known: "
                             f"{sorted(cls.configs)}")
        config = dict(cls.configs[config_name])
        config.update(overrides)
        config.setdefault("name", config_name)
        return cls(**config)

    def _check_rank_and_channels(self, images):
        """The image checks every family shares: rank 4, channels-last with ``in_channels``
        channels. Returns the shape as a tuple (the family checks its sizes)."""
        shape = tuple(images.shape)
        dtype = keras.backend.standardize_dtype(images.dtype)
        if "int" in dtype or dtype == "bool":
            raise ValueError(
                f"{self.name} ({type(self).__name__}) takes float images, already "
                f"preprocessed; got {dtype} images of shape {shape}. Its preprocessing: "
                f"{self.preprocessing.describe()}. Apply it with "
                "`backbone.preprocessing(images)`, or give the uint8 images to "
                "ImageClassifier, poa_keras.eval.extract_features, the sweep or the export, "
                "which apply it.")
        if len(shape) != 4:
            raise ValueError(f"{self.name} expects images of rank 4 (batch, height, width, "
                             f"channels), got shape {shape}")
        if shape[-1] != self.in_channels:
            raise ValueError(f"{self.name} expects {self.in_channels} channels (channels-last), "
                             f"got shape {shape} with {shape[-1]} channels")
        return shape

    def _check_image_sizes(self, images, multiple=None, hint=""):
        """Rank, channels and sizes: with ``multiple`` (a patch size) the height and width must
        be static multiples of it and the token grid ``(H / multiple, W / multiple)`` is
        returned; without, any size of at least 1 passes (convolutional stems) and None is
        returned. ``hint`` ends the not-a-multiple message."""
        shape = self._check_rank_and_channels(images)
        for what, size in (("height", shape[1]), ("width", shape[2])):
            if multiple is None:
                if size is not None and size < 1:
                    raise ValueError(f"image {what} {size} must be at least 1; got shape {shape}")
                continue
            if size is None:
                raise ValueError(f"{self.name} needs a static image {what}; got shape {shape}")
            if size % multiple:
                raise ValueError(f"image {what} {size} is not a multiple of the patch size "
                                 f"{multiple}{hint}")
        if multiple is None:
            return None
        return shape[1] // multiple, shape[2] // multiple

    def flops_image_hw(self, image_size=None):
        """The (height, width) ``subnet_flops`` counts at: ``image_size`` (an int or a pair),
        default the configuration's ``image_size``; both must be positive."""
        h, w = image_hw(self.image_size if image_size is None else image_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"image size {(h, w)} must be positive")
        return h, w

    def reject_masks(self, masks):
        """The check of the families without mask tokens (``supports_masks=False``)."""
        if masks is not None:
            raise ValueError(f"{self.name}: {type(self).__name__} takes no masks "
                             "(supports_masks=False; use ibot_weight=0)")

    @staticmethod
    def feature_outputs(pooled, maps, return_feature_maps):
        """The call's output of the convolutional families: ``{"cls": pooled, "pooled":
        pooled}``, plus ``"feature_maps": maps`` with ``return_feature_maps``."""
        out = {"cls": pooled, "pooled": pooled}
        if return_feature_maps:
            out["feature_maps"] = maps
        return out

    @staticmethod
    def _flops_total(terms, breakdown):
        """FLOPs as every family reports them: the total, or with ``breakdown`` the integer
        terms plus ``total``."""
        terms = {name: int(value) for name, value in terms.items()}
        total = sum(terms.values())
        return dict(terms, total=total) if breakdown else total

    # -- fake quantization (SSQL) ----------------------------------------------------------------
    def quantization(self, quant, training=None):
        """The ``quantization_scope`` a call with ``quant=`` runs in (every family's ``call``
        takes ``quant``): None runs in float (also inside an outer scope); a ``QuantConfig``, a
        (weight_bits, activation_bits) pair or a "W/A" string runs fake-quantized, with the
        activation ranges of the current batch when training and the calibrated ones otherwise
        unless ``QuantConfig.ranges`` says which (see ``quantization/observer.py``)."""
        quant = QuantConfig.coerce(quant)
        if quant is not None:
            if quantization_mode(self) is not None:
                raise ValueError(
                    f"{self.name} is already quantized ({quantization_mode(self)}): fake "
                    "quantization (quant=...) needs its float weights; use the float model")
            quant = quant.resolved(bool(training))
        return quantization_scope(quant)

    def count_params(self):
        """The number of weights of the network (trainable and not, e.g. BatchNorm
        statistics), without the activation quantizers' calibrated ranges (two numbers per
        quantizer: calibration state, not parameters)."""
        skip = {id(q.range) for q in activation_quantizers(self)}
        return int(sum(int(np.prod(v.shape)) for v in self.weights if id(v) not in skip))

    # -- the grid ------------------------------------------------------------------------------
    @property
    def named_subnets(self) -> dict:
        """Names of well-known sizes (e.g. 'small') -> spec."""
        return {}

    def resolve_subnet(self, subnet):
        """None -> None (full network); a name, a tuple or a spec -> a validated spec."""
        if subnet is None:
            return None
        if isinstance(subnet, str):
            named = self.named_subnets
            if subnet not in named:
                raise ValueError(
                    f"unknown named size {subnet!r} for {self.name}; known sizes: "
                    f"{sorted(named) or 'none'}")
            subnet = named[subnet]
        if isinstance(subnet, (tuple, list)) and not isinstance(subnet, self.subnet_class):
            subnet = self.subnet_class(*subnet)
        if not isinstance(subnet, self.subnet_class):
            name = self.subnet_class.__name__
            article = "an" if name[0] in "AEIOU" else "a"
            raise TypeError(f"expected {article} {name}, a size name or a tuple, got {subnet!r}")
        self.validate_subnet(subnet)
        return subnet

    def compiled_forward(self, subnet=None, training=False, **options):
        """A compiled callable images -> outputs for one plan (see ``backbones/compiled.py``);
        much faster than eager calls on JAX. ``options``: boolean call flags such as
        ``return_feature_maps=True`` (Swin, ResNet) or ``return_blocks=True`` (ViT)."""
        from poa_keras.backbones.compiled import compiled_forward
        return compiled_forward(self, subnet, training, **options)

    def sampler(self, seed=0, net_select_scale=None) -> SubnetSampler:
        """A sampler over the grid with the reference weighting, excluding the intact net."""
        specs = self.subnets()
        counts = self.sampling_counts(net_select_scale)
        return SubnetSampler(specs, counts, exclude=[self.full_subnet], seed=seed)

    # -- presets -------------------------------------------------------------------------------
    def save_to_preset(self, preset_dir):
        """Writes config.json, metadata.json and model.weights.h5 (keras-hub layout), atomically.
        The config records the ``preprocessing``; the metadata records the grid size and the
        quantization mode (None or "int8"), so ``from_preset`` rebuilds a quantized model
        before loading its weights."""
        presets.save_preset(self, preset_dir, metadata=self.preset_metadata())

    def preset_metadata(self):
        """What metadata.json records of this backbone beside the common entries."""
        return {"num_subnets": len(self.subnets()), "quantization": quantization_mode(self)}

    @classmethod
    def from_preset(cls, preset, load_weights=True, subnet=None, **subnet_kwargs):
        """Builds the full network of a preset, loads it, then extracts the requested size.

        Args:
            preset: a registered name (see ``poa_keras.presets.list_presets()``) or a directory
                holding a preset.
            load_weights: False gives the architecture with random weights.
            subnet: a named size ("small"), a spec or a tuple; or use keywords such as
                ``width=384, depth=12``. Missing keywords default to the full network's value.

        The architecture comes from the preset (a directory's config.json or a card's named
        configuration; its ``preprocessing`` record too, the default one for presets saved
        before it was recorded), quantized first when the preset holds int8 weights; the
        weights are checked against their sha256 before loading; a size is extracted from the
        loaded full network, so weights are never loaded into a network of another shape. A
        task preset (``ImageClassifier.save_to_preset``) loads as its fine-tuned backbone.
        """
        if subnet is not None and subnet_kwargs:
            raise ValueError(f"give either subnet= or {sorted(subnet_kwargs)}, not both")
        source = presets.resolve(preset, load_weights=False)   # files read, nothing downloaded
        klass = backbone_class(source.registered_name, source.class_name, source.where)
        if cls is not Backbone and not issubclass(klass, cls):
            raise ValueError(f"{source.where} holds an {source.class_name}, not an "
                             f"{cls.__name__}: load it with {source.class_name}.from_preset or "
                             "Backbone.from_preset")
        if subnet is not None or any(v is not None for v in subnet_kwargs.values()):
            # The size is checked against the configuration before the weights are fetched
            # and the network is built (a ViT-L teacher: seconds and gigabytes).
            if source.quantization is not None:
                raise ValueError(
                    f"preset {os.fspath(preset)!r} holds {source.quantization} weights: "
                    "sub-networks are extracted from float weights. Load the float teacher, "
                    "extract, then quantize the extracted model (or export it with "
                    "quantize='int8'); or load this preset without a subnet.")
            probe = (klass.unbuilt(source.config) if source.config is not None
                     else klass.unbuilt(config_name=source.config_name, name=source.name))
            if subnet is not None:
                probe.resolve_subnet(subnet)
            else:
                probe.subnet_from_kwargs(**subnet_kwargs)
        if load_weights:
            source = presets.resolve(preset, load_weights=True)
        if source.config is not None:
            backbone = klass.from_config(source.config)
        else:
            backbone = klass.from_config_name(source.config_name, name=source.name)
        if source.preprocessing is not None:   # the preset's record (the config's, a card's)
            backbone.preprocessing = source.preprocessing
        if source.quantization is not None:   # the architecture of the saved int8 weights
            quantize(backbone, source.quantization)
        if source.weights is not None:
            presets.load_weights(backbone, source.weights, source.weights_sha256, source.where)
        if subnet is None and not any(v is not None for v in subnet_kwargs.values()):
            return backbone
        spec = (backbone.resolve_subnet(subnet) if subnet is not None
                else backbone.subnet_from_kwargs(**subnet_kwargs))
        return backbone.extract(spec)

    @classmethod
    def elastify(cls, preset, **config):
        """An elastic network initialised from a preset's weights: typically a released DENSE
        model (``ElasticViT.elastify("dino_vit_b16", min_width=384, min_depth=6)``), whose
        every (width, depth) sub-network then exists by slicing, ready for POA to train them
        all (the recipe key ``backbone.init`` does this for a pretraining run).

        ``config`` overrides entries of the preset's configuration (the grid: ``min_width``,
        ``min_depth``, ``named_subnets``, ``net_select_scale``; ``use_mask_token=True`` for
        iBOT); every weight of the preset is copied (``copy_weights_from``), the new ones
        (a mask token) keep their initialisation. The intact network computes what the
        preset computes."""
        dense = Backbone.from_preset(preset)
        if cls is not Backbone and not isinstance(dense, cls):
            raise ValueError(f"preset {os.fspath(preset)!r} holds a {type(dense).__name__}, "
                             f"not a {cls.__name__}")
        base = dense.get_config()
        unknown = sorted(set(config) - set(base))
        if unknown:
            valid = sorted(k for k in base if k not in ("name", "dtype", "trainable"))
            raise ValueError(f"elastify: {unknown} are not {type(dense).__name__} arguments; "
                             f"valid: {valid}")
        base.update(config)
        elastic = type(dense).from_config(base)
        elastic.copy_weights_from(dense)
        return elastic

    def copy_weights_from(self, source):
        """Copies every weight of ``source`` (a network of this family whose variables are a
        subset of this one's, e.g. the dense model this elastic one was configured from) by
        its path below the model's name; shapes must agree. Returns the paths of this
        network's weights that ``source`` lacks (kept at their initialisation)."""
        return assign_by_path(self, {path: read_weight(v, True) for path, v in
                                     weights_by_path(source).items()},
                              f"copying the weights of {source.name}", partial=True)

    def subnet_from_kwargs(self, **kwargs):
        raise NotImplementedError

    # -- looking inside (eval/analysis.py) -------------------------------------------------------
    def layer_representations(self, images, subnet=None):
        """{layer name: (B, ...) tensor}, in the order of depth: what the layer-wise analysis
        (CKA) compares. Every family answers (its docstring says which tensors); the
        intermediate tensors are computed only when asked."""
        raise NotImplementedError(f"{type(self).__name__} does not give layer representations")

    def attention_logits(self, images, subnet=None, blocks="all"):
        """[(B, heads, T, T)] pre-softmax attention logits (q kᵀ / sqrt(head_dim)) of the
        chosen blocks, for the attention analysis and distillation. Only families with global
        token attention answer; the others refuse with the reason."""
        raise ValueError(f"{self.name} ({type(self).__name__}, the {self.family} family) has "
                         "no global attention maps; attention logits exist for the ViT family "
                         "(ElasticViT) only")

    def feature_dim(self, subnet=None):
        """Channels of the ``cls`` / ``pooled`` features of a subnet (None: the intact net)."""
        raise NotImplementedError

    def head_active_in(self, subnet=None):
        """What a shared projection head's elastic first linear takes for this subnet: None
        when the subnet's features are as wide as the intact network's, else their width."""
        spec = self.resolve_subnet(subnet)
        if spec is None:
            return None
        dim = self.feature_dim(spec)
        return None if dim == self.feature_dim() else dim

    def subnet_log_values(self, subnet):
        """{name: float} describing a spec in training logs (default: its int fields)."""
        import dataclasses

        spec = self.resolve_subnet(subnet) or self.full_subnet
        return {f.name: float(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                if isinstance(getattr(spec, f.name), int)}

    # -- depth as a run-time block mask (DESIGN contract 6) -------------------------------------
    def full_depth_subnet(self, subnet):
        """The spec with this subnet's width and the intact network's depth(s): what stays
        static (one compiled program) when the depth is a run-time block mask
        (``block_keep``). Families without elastic depth return the spec itself."""
        return self.resolve_subnet(subnet) or self.full_subnet

    def has_elastic_depth(self):
        """Whether specs of the grid differ in depth (some share ``full_depth_subnet``)."""
        specs = self.subnets()
        return len({self.full_depth_subnet(s) for s in specs}) < len(specs)

    def _stage_block_ids(self, subnet):
        ids = list(self.block_ids(subnet))
        return [ids] if not ids or not isinstance(ids[0], (list, tuple)) else ids

    def block_keep(self, subnet=None):
        """Which blocks of the intact network (flat, in call order, stage after stage) the
        subnet runs: float32 0/1 of shape (num_blocks,).

        ``backbone(x, subnet=backbone.full_depth_subnet(s), keep=backbone.block_keep(s))``
        equals ``backbone(x, subnet=s)``, with ``keep`` a run-time tensor: a compiled program
        of one width serves every depth, and a skipped block costs no FLOPs (its body sits in
        a conditional, ``elastic.layers.skippable``)."""
        import numpy as np

        full = self._stage_block_ids(None)
        kept = [set(k) for k in self._stage_block_ids(self.resolve_subnet(subnet)
                                                      or self.full_subnet)]
        return np.array([1.0 if j in k else 0.0 for f, k in zip(full, kept) for j in f],
                        dtype=np.float32)

    def skippable_blocks(self):
        """Flat indices of the blocks that some subnet of the grid skips (only these get a
        conditional under ``keep``; the others run in every subnet)."""
        cached = self.__dict__.get("_skippable_cache")
        if cached is None:
            import numpy as np

            always = np.min([self.block_keep(s) for s in self.subnets()], axis=0)
            cached = frozenset(int(i) for i in np.flatnonzero(always < 1.0))
            self.__dict__["_skippable_cache"] = cached
        return cached

    def run_block_ids(self, subnet, keep):
        """The per-stage block indices a call iterates: the subnet's blocks, or with a
        run-time ``keep`` mask (checked here) every block of the intact depth. Each entry is
        (block index in its stage, flat index)."""
        full = self._stage_block_ids(None)
        if keep is None:
            ids = self._stage_block_ids(subnet)
        else:
            expected = sum(len(f) for f in full)
            shape = tuple(keep.shape)
            if shape != (expected,):
                raise ValueError(f"{self.name}: keep must have shape ({expected},) (one flag "
                                 f"per block of the intact network), got {shape}")
            ids = full
        offsets = [sum(len(f) for f in full[:s]) for s in range(len(full))]
        return [[(j, offsets[s] + j) for j in stage] for s, stage in enumerate(ids)]

    def keep_flag(self, keep, flat_index):
        """The run-time flag of one block (None: it always runs)."""
        if keep is None or flat_index not in self.skippable_blocks():
            return None
        return keep[flat_index]

    # -- layer-wise lr decay ---------------------------------------------------------------------
    def layer_id(self, path):
        """The layer id of the variable at ``path`` for layer-wise lr decay (0 = the embedding,
        ``max_layer_id`` = what comes after the last block), or None for a family that defines
        no layer ids (the default)."""
        return None

    @property
    def max_layer_id(self):
        """The largest layer id (its variables get the multiplier 1)."""
        return None

    def is_patch_embedding(self, path):
        """Whether ``patch_embed_lr_mult`` applies to the variable at ``path`` (default: no)."""
        return False

    def lr_multiplier(self, path, layer_decay=1.0, patch_embed_lr_mult=1.0):
        """The learning-rate factor of the variable at ``path``: ``layer_decay_multiplier``
        of its ``layer_id`` (BEiT/DINOv2/POA), times ``patch_embed_lr_mult`` where
        ``is_patch_embedding``. Families without layer ids accept only 1.0 for both."""
        if layer_decay == 1.0 and patch_embed_lr_mult == 1.0:
            return 1.0
        layer_id = self.layer_id(path)
        if layer_id is None:
            raise ValueError(f"layer_decay={layer_decay} / patch_embed_lr_mult="
                             f"{patch_embed_lr_mult}: {type(self).__name__} defines no layer "
                             "ids; set both to 1.0")
        multiplier = layer_decay_multiplier(layer_id, self.max_layer_id, layer_decay)
        if self.is_patch_embedding(path):
            multiplier *= float(patch_embed_lr_mult)
        return multiplier

    def subnets(self):
        raise NotImplementedError

    def sampling_counts(self, net_select_scale=None):
        raise NotImplementedError

    def validate_subnet(self, spec):
        raise NotImplementedError

    @property
    def full_subnet(self):
        raise NotImplementedError

    def extract(self, subnet):
        raise NotImplementedError


class NonElasticBackbone(Backbone):
    """A backbone of one size (a BatchNorm ResNet, TinyViT): its grid is the one intact spec,
    ``IntactSubnet()``, and ``extract`` returns a copy. Everything that works on a Backbone
    (presets, ``from_preset``, ``ImageClassifier``, export, int8, the sweep, DINO) works on it
    unchanged; POA, whose elastic student needs other sizes, refuses it.

    A family defines ``call(images, subnet=None, training=None, ...)`` (``subnet`` is None or
    the intact spec: ``self.resolve_subnet(subnet)`` checks it), ``feature_dim`` and its
    configuration (``get_config``)."""

    subnet_class = IntactSubnet

    @property
    def full_subnet(self):
        return IntactSubnet()

    def subnets(self):
        return [IntactSubnet()]

    def sampling_counts(self, net_select_scale=None):
        return [1]

    def validate_subnet(self, spec):
        if spec != IntactSubnet():
            raise ValueError(f"{self.name} is not elastic: its only subnet is IntactSubnet(), "
                             f"got {spec!r}")

    def subnet_from_kwargs(self, **kwargs):
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:
            raise ValueError(f"{self.name} ({type(self).__name__}) is not elastic: its one size "
                             f"is the intact network, so it takes no {given}")
        return IntactSubnet()

    def subnet_params(self, subnet=None):
        self.resolve_subnet(subnet)
        return int(self.count_params())

    def extract(self, subnet=None):
        """A copy of the network (the intact spec is the only one): same class,
        configuration and weights."""
        self.resolve_subnet(subnet)
        config = dict(self.get_config(), name=f"{self.name}_intact")
        copy = type(self).from_config(config)
        copy.set_weights(self.get_weights())
        return copy

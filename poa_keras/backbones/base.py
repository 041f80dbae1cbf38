"""The Backbone base class: what every elastic family shares (grid, sampler, extraction,
presets). Families implement the few family-specific hooks."""
from __future__ import annotations

import keras

from poa_keras import presets
from poa_keras.elastic.sampler import SubnetSampler
from poa_keras.quantization import FrozenGCQuantize


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
      * ``lr_multiplier(path, layer_decay, patch_embed_lr_mult)`` (optional): the lr factor of
        one variable under layer-wise lr decay and the patch-embed (stem) multiplier;
      * ``supports_masks``: whether ``call`` takes iBOT ``masks`` (and returns patch tokens).

    Trainers, heads and evaluation only talk to these hooks, so a new family works with them
    without family-specific code there.
    """

    supports_masks = False

    subnet_class = None
    configs: dict = {}   # named configurations of the family (see ``from_config_name``)
    family: str = "backbone"   # the family's name in messages ("ViT", "Swin", "ResNet")

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
        if len(shape) != 4:
            raise ValueError(f"{self.name} expects images of rank 4 (batch, height, width, "
                             f"channels), got shape {shape}")
        if shape[-1] != self.in_channels:
            raise ValueError(f"{self.name} expects {self.in_channels} channels (channels-last), "
                             f"got shape {shape} with {shape[-1]} channels")
        return shape

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
            raise TypeError(f"expected a {self.subnet_class.__name__}, a size name or a tuple, "
                            f"got {subnet!r}")
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
        """Writes config.json, metadata.json and model.weights.h5 (keras-hub layout), atomically."""
        presets.save_preset(self, preset_dir)

    @classmethod
    def from_preset(cls, preset, load_weights=True, subnet=None, **subnet_kwargs):
        """Builds the full network of a preset, loads it, then extracts the requested size.

        Args:
            preset: a registered name (see ``poa_keras.presets.list_presets()``) or a directory
                holding a preset.
            load_weights: False gives the architecture with random weights.
            subnet: a named size ("small"), a spec or a tuple; or use keywords such as
                ``width=384, depth=12``. Missing keywords default to the full network's value.
        """
        return presets.load_preset(cls, preset, load_weights=load_weights, subnet=subnet,
                                   **subnet_kwargs)

    def subnet_from_kwargs(self, **kwargs):
        raise NotImplementedError

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

    def lr_multiplier(self, path, layer_decay=1.0, patch_embed_lr_mult=1.0):
        """The learning-rate factor of the variable at ``path`` under layer-wise lr decay
        (``layer_decay ** (num_layers + 1 - layer_id)``, BEiT/DINOv2) and the patch-embed /
        stem multiplier. Families without layer ids accept only 1.0 for both."""
        if layer_decay == 1.0 and patch_embed_lr_mult == 1.0:
            return 1.0
        raise ValueError(f"layer_decay={layer_decay} / patch_embed_lr_mult={patch_embed_lr_mult}"
                         f": {type(self).__name__} defines no layer ids; set both to 1.0")

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

"""The Backbone base class: what every elastic family shares (grid, sampler, extraction,
presets). Families implement the few family-specific hooks."""
from __future__ import annotations

import keras

from poa_keras import presets
from poa_keras.elastic.sampler import SubnetSampler


class Backbone(keras.Model):
    """An elastic backbone: one set of full-size weights, many sub-networks.

    Families define:
      * ``subnet_class``: the spec type (e.g. ``ViTSubnet``);
      * ``full_subnet``: the spec of the intact network;
      * ``subnets()``: the grid, smallest first;
      * ``validate_subnet(spec)``: ValueError naming the valid values;
      * ``subnet_from_kwargs(**kw)``: a spec from user keywords (width=..., depth=...);
      * ``sampling_counts()``: how often each grid entry appears in the sampling list;
      * ``extract(spec)``: a new backbone of the same class with exactly that size.
    """

    subnet_class = None

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

    def compiled_forward(self, subnet=None, training=False):
        """A compiled callable images -> outputs for one plan (see ``backbones/compiled.py``);
        much faster than eager calls on JAX."""
        from poa_keras.backbones.compiled import compiled_forward
        return compiled_forward(self, subnet, training)

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

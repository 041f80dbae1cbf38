"""Draws one sub-network per training step with the reference weighting.

The list of candidates holds every subnet `count` times (see `selection_weights`), except the
intact (full) network, which the intact student already trains. Each step takes the next entry
of a shuffled copy; when the list is exhausted it is reshuffled. The state (permutation, position,
generator) is plain JSON, so a resumed run draws exactly the subnets an uninterrupted one would.
"""
from __future__ import annotations

import json
from typing import Hashable, Sequence

import numpy as np

from poa_keras.files import atomic_write_json


class SubnetSampler:
    """Shuffled cycling over a weighted list of subnet specs.

    Args:
        specs: the candidate specs (any hashable values).
        counts: how many times each spec appears in the list (same length as `specs`).
        exclude: specs never drawn (the intact network).
        seed: seed of the numpy generator that shuffles the list.
    """

    def __init__(self, specs: Sequence[Hashable], counts: Sequence[int], exclude=(), seed=0):
        if len(specs) != len(counts):
            raise ValueError(f"{len(specs)} specs but {len(counts)} counts")
        exclude = set(exclude)
        self.candidates = []
        for spec, count in zip(specs, counts):
            if int(count) < 0:
                raise ValueError(f"negative count {count} for {spec}")
            if spec not in exclude:
                self.candidates.extend([spec] * int(count))
        if not self.candidates:
            raise ValueError("no subnet left to sample once the excluded ones are removed")
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(self.candidates))
        self._position = 0

    def __len__(self):
        return len(self.candidates)

    def frequencies(self) -> dict:
        """Probability of each spec under the sampling distribution."""
        out = {}
        for spec in self.candidates:
            out[spec] = out.get(spec, 0) + 1
        return {spec: n / len(self.candidates) for spec, n in out.items()}

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def next(self):
        """The spec for the next step."""
        spec = self.candidates[int(self._order[self._position])]
        self._position += 1
        if self._position == len(self._order):
            self._order = self._rng.permutation(len(self.candidates))
            self._position = 0
        return spec

    # -- resumable state ---------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "num_candidates": len(self.candidates),
            "order": [int(i) for i in self._order],
            "position": int(self._position),
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: dict):
        if state.get("num_candidates") != len(self.candidates):
            raise ValueError(
                f"sampler state is for {state.get('num_candidates')} candidates, this sampler "
                f"has {len(self.candidates)}: it belongs to another subnet grid"
            )
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._position = int(state["position"])
        self._rng.bit_generator.state = state["rng"]

    def save(self, path):
        """Writes the state as JSON, atomically (temporary file, then rename)."""
        atomic_write_json(path, self.get_state(), indent=None)

    def restore(self, path):
        with open(path) as f:
            self.set_state(json.load(f))

"""Explicit random streams: one ``torch.Generator`` per substep, keyed by name.

A stream's seed is derived from the run seed and the substep's *name* (not its position),
so adding an intervention substep leaves every other substep's draws unchanged: the
common random numbers that make counterfactual pairs and finite differences sharp.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

__all__ = ["Streams", "derive_seed"]


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from a run seed and a stream name, stable across processes."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Streams:
    """Named generators on one device; state can be saved and restored exactly."""

    def __init__(self, seed: int, names: Iterable[str], device: torch.device | str = "cpu") -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.seed = seed
        self.device = torch.device(device)
        self._gens: dict[str, torch.Generator] = {}
        for name in names:
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed(seed, name))
            self._gens[name] = g

    def __getitem__(self, name: str) -> torch.Generator:
        return self._gens[name]

    def names(self) -> tuple[str, ...]:
        """Stream names."""
        return tuple(self._gens)

    def get_state(self) -> dict[str, torch.Tensor]:
        """Byte tensors of every generator's state, keyed by stream name."""
        return {n: g.get_state() for n, g in self._gens.items()}

    def set_state(self, states: dict[str, torch.Tensor]) -> None:
        """Restore generator states saved by :meth:`get_state`."""
        missing = set(self._gens) - set(states)
        if missing:
            raise ValueError(f"rng state: missing streams {sorted(missing)}")
        for n, g in self._gens.items():
            g.set_state(states[n].cpu())

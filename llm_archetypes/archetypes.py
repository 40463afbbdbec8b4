"""Archetypes: clusters of agents that share the attributes a prompt uses.

K archetypes give K prompts per decision, never N. Grouping is one vectorized
``torch.unique(dim=0, return_inverse=True)`` over the stacked attribute codes, so every
archetype is non-empty by construction; answers ``[K]`` reach the agents by gather::

    arch = Archetypes.from_attributes(state, ["age_band", "sex", "borough"],
                                      codebooks={"age_band": AGE, "sex": SEX, "borough": BORO})
    arch.K, arch.sizes            # number of non-empty archetypes, members per archetype [K]
    arch.labels[0]                # {"age_band": "65+", "sex": "female", "borough": "Bronx"}
    per_agent = arch.broadcast(values)   # [K] -> [N], keeps gradients
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm import CodeBook, StateError, Struct, check_tensor

__all__ = ["Archetypes", "bin_labels"]


def bin_labels(edges: Sequence[float], unit: str = "") -> tuple[str, ...]:
    """Readable labels of the ``len(edges) + 1`` intervals cut by ``edges`` ("under 18", "18-44", "65+")."""
    e = [float(x) for x in edges]
    if any(b <= a for a, b in zip(e, e[1:])):
        raise ConfigError(f"bins: edges must be strictly increasing, got {list(edges)}")
    fmt = lambda x: f"{x:g}"  # noqa: E731
    sfx = f" {unit}" if unit else ""
    labels = [f"under {fmt(e[0])}{sfx}"]
    for a, b in zip(e, e[1:]):
        labels.append(f"{fmt(a)} to under {fmt(b)}{sfx}")
    labels.append(f"{fmt(e[-1])} or more{sfx}")
    return tuple(labels)


@dataclass(frozen=True)
class Archetypes:
    """K non-empty archetypes over named attributes, with each agent's archetype id.

    ``codes [K, A]`` are the attribute codes of each archetype (lexicographically sorted),
    ``archetype_id [N]`` (int64) maps agents to archetypes, ``sizes [K]`` counts members and
    ``labels`` holds each archetype's attributes decoded into words.
    """

    attributes: tuple[str, ...]
    codes: Tensor
    archetype_id: Tensor
    sizes: Tensor
    labels: tuple[dict[str, str], ...]

    @classmethod
    def from_attributes(
        cls,
        source: Struct | Mapping[str, Tensor],
        attributes: Sequence[str],
        codebooks: Mapping[str, CodeBook | Sequence[str]] | None = None,
        bins: Mapping[str, Sequence[float]] | None = None,
    ) -> "Archetypes":
        """Group agents by ``attributes`` (fields of a state or keys of a dict of ``[N]`` tensors).

        ``codebooks[a]`` decodes integer codes of ``a`` into words (default: the code as text);
        ``bins[a]`` cuts a continuous attribute at the given edges first (labels from
        :func:`bin_labels` unless a code book is given for the binned codes).
        """
        if not attributes:
            raise ConfigError("attributes: expected at least one attribute name")
        codebooks = dict(codebooks or {})
        bins = dict(bins or {})
        for name in list(codebooks) + list(bins):
            if name not in attributes:
                raise ConfigError(f"codebooks/bins: {name!r} is not among attributes {list(attributes)}")
        columns: list[Tensor] = []
        decoders: list[tuple[str, ...] | None] = []
        n: int | None = None
        for name in attributes:
            if isinstance(source, Struct):
                if name not in source.field_names():
                    raise ConfigError(f"attribute {name!r}: not a field of {type(source).__name__}; "
                                     f"fields: {list(source.field_names())}")
                value = getattr(source, name)
            else:
                if name not in source:
                    raise ConfigError(f"attribute {name!r}: missing; given: {sorted(source)}")
                value = source[name]
            dims = check_tensor(f"attribute {name}", value, ("N",), dims={"N": n} if n is not None else None)
            n = dims["N"]
            book = codebooks.get(name)
            labels = tuple(book.labels) if isinstance(book, CodeBook) else (tuple(book) if book is not None else None)
            if name in bins:
                edges = torch.as_tensor([float(x) for x in bins[name]], dtype=torch.float64, device=value.device)
                code = torch.bucketize(value.detach().to(torch.float64), edges, right=True)
                if labels is None:
                    labels = bin_labels(bins[name])
            else:
                if value.is_floating_point():
                    raise ConfigError(f"attribute {name!r}: floating values need bins={{{name!r}: [edges]}}")
                code = value.detach().long()
            if labels is not None and code.numel():
                lo, hi = int(code.min()), int(code.max())
                if lo < 0 or hi >= len(labels):
                    raise ConfigError(f"attribute {name!r}: codes must lie in [0, {len(labels) - 1}] for its "
                                     f"code book of {len(labels)} labels, found [{lo}, {hi}]")
            columns.append(code)
            decoders.append(labels)
        stacked = torch.stack(columns, dim=1)
        codes, inverse, counts = torch.unique(stacked, dim=0, return_inverse=True, return_counts=True)
        rows = codes.cpu().tolist()
        decoded = tuple(
            {a: (dec[c] if dec is not None else str(c)) for a, dec, c in zip(attributes, decoders, row)}
            for row in rows
        )
        return cls(tuple(attributes), codes, inverse.long(), counts, decoded)

    @property
    def K(self) -> int:
        """Number of non-empty archetypes."""
        return int(self.codes.shape[0])

    @property
    def N(self) -> int:
        """Number of agents."""
        return int(self.archetype_id.shape[0])

    def __len__(self) -> int:
        return self.K

    def broadcast(self, values: Tensor) -> Tensor:
        """Per-archetype ``values [K, ...]`` gathered to agents ``[N, ...]`` (differentiable)."""
        if values.dim() == 0 or values.shape[0] != self.K:
            raise StateError(f"broadcast: expected values with leading dimension K={self.K}, "
                             f"got shape {tuple(values.shape)}")
        return values[self.archetype_id.to(values.device)]

    def mean(self, values: Tensor) -> Tensor:
        """Per-archetype mean of agent ``values [N]`` (e.g. an attribute's share in each cluster): ``[K]``."""
        check_tensor("values", values, ("N",), dims={"N": self.N})
        idx = self.archetype_id.to(values.device)
        s = values.new_zeros(self.K).index_add(0, idx, values)
        return s / self.sizes.to(values.device, values.dtype)

    def to(self, device: torch.device | str) -> "Archetypes":
        """Copy with tensors on ``device``."""
        return Archetypes(self.attributes, self.codes.to(device), self.archetype_id.to(device),
                          self.sizes.to(device), self.labels)

    def to_pandas(self) -> pd.DataFrame:
        """One row per archetype: id, decoded attributes and size."""
        df = pd.DataFrame(list(self.labels), columns=list(self.attributes))
        df.insert(0, "archetype", range(self.K))
        df["size"] = self.sizes.cpu().numpy()
        return df

    def describe(self, k: int) -> dict[str, Any]:
        """Decoded attributes and size of archetype ``k``."""
        return {**self.labels[k], "size": int(self.sizes[k])}

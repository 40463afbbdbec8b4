"""Layered contact networks: ``edge_index [2, E]`` + ``weight [E]`` + ``layer [E]``.

Edges are directed ``source -> target`` (torch-geometric's convention: row 0 sources,
row 1 targets); an undirected contact is stored as two edges. All layers live in one
edge list sorted by source with a CSR row pointer, so a substep can visit only the edges
of *active* sources (the infectious frontier) and scale each layer per step with a
``[L]`` tensor, without a Python loop over layers, agents or edges.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.state import StateError, Struct, check_tensor, static_field, tensor_field

__all__ = ["Network", "EdgeIndex"]

EdgeIndex = Tensor  # [2, E] source, target

#: id of a network that passed validation -> (weak references to its tensors, their versions, sizes)
_CHECKED: dict[int, tuple] = {}


def _index_dtype(num_nodes: int) -> torch.dtype:
    return torch.int32 if num_nodes < 2**31 - 1 else torch.int64


@dataclass(frozen=True)
class Network(Struct):
    """A multi-layer directed contact network over ``num_nodes`` agents, CSR by source."""

    edge_index: Tensor = tensor_field((2, "E"), (torch.int32, torch.int64), "source, target agent ids; sorted by source")
    weight: Tensor = tensor_field(("E",), (torch.float32, torch.float64, torch.float16, torch.bfloat16), "contact intensity (contacts per day)")
    layer: Tensor = tensor_field(("E",), torch.int8, "layer code of each edge, see layer_names")
    rowptr: Tensor = tensor_field(("N+1",), torch.int64, "CSR row pointer: edges of source j are rowptr[j]:rowptr[j+1]")
    num_nodes: int = static_field("number of agents N")
    layer_names: tuple[str, ...] = static_field("name of each layer code")

    @staticmethod
    def from_layers(
        layers: Mapping[str, EdgeIndex | tuple[EdgeIndex, Tensor]],
        num_nodes: int,
        *,
        coalesce: bool = True,
    ) -> "Network":
        """Build from ``{name: edge_index}`` or ``{name: (edge_index, weight)}``; validates ids."""
        if not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ConfigError(f"num_nodes: expected a positive int, got {num_nodes!r}")
        if len(layers) > 127:
            raise ConfigError(f"layers: at most 127 layers, got {len(layers)}")
        eis, ws, ls = [], [], []
        for code, (name, spec) in enumerate(layers.items()):
            ei, w = (spec if isinstance(spec, tuple) else (spec, None))
            check_tensor(f"layers[{name!r}].edge_index", ei, (2, "E"), (torch.int32, torch.int64))
            ei = ei.long()
            if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= num_nodes):
                raise StateError(
                    f"layers[{name!r}].edge_index: expected ids in [0, {num_nodes}), "
                    f"got range [{int(ei.min())}, {int(ei.max())}]"
                )
            if w is None:
                w = torch.ones(ei.shape[1], dtype=torch.float32, device=ei.device)
            check_tensor(f"layers[{name!r}].weight", w, (ei.shape[1],), (), low=0.0)
            if coalesce and ei.numel():
                from torch_geometric.utils import coalesce as pyg_coalesce

                # duplicates within a layer are merged by summing their weights
                ei, w = pyg_coalesce(ei, w.float(), num_nodes=num_nodes, reduce="sum")
            eis.append(ei)
            ws.append(w.float())
            ls.append(torch.full((ei.shape[1],), code, dtype=torch.int8, device=ei.device))
        return Network.build(torch.cat(eis, 1), torch.cat(ws), torch.cat(ls), num_nodes, tuple(layers))

    @staticmethod
    def build(edge_index: Tensor, weight: Tensor, layer: Tensor, num_nodes: int, layer_names: Sequence[str]) -> "Network":
        """Sort edges by source, compute the CSR pointer and pick compact index dtypes."""
        from lpm.kernels import compiled_available

        src = edge_index[0]
        if (src.device.type == "cpu" and compiled_available() and src.numel() > 1 << 16 and not weight.requires_grad
                and weight.dtype in (torch.float32, torch.float64) and int(src.min()) >= 0 and int(src.max()) < num_nodes):
            from lpm.compiled import csr_by_source

            # a counting sort: the stable argsort's order, in linear time (minutes -> seconds at 1e8 edges);
            # ids out of range take the torch path, whose validate() names them
            out = torch.empty((2, src.numel()), dtype=_index_dtype(num_nodes))
            w, lay, rowptr = csr_by_source(src.contiguous().numpy(), edge_index[1].contiguous().numpy(),
                                           weight.contiguous().numpy(), layer.contiguous().numpy(), int(num_nodes),
                                           out[0].numpy(), out[1].numpy())
            return Network(out, torch.from_numpy(w), torch.from_numpy(lay), torch.from_numpy(rowptr), int(num_nodes),
                           tuple(layer_names))
        src = src.long()
        order = torch.argsort(src, stable=True)
        edge_index = edge_index[:, order].to(_index_dtype(num_nodes))
        counts = torch.bincount(src, minlength=num_nodes)
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=edge_index.device)
        rowptr[1:] = counts.cumsum(0)
        return Network(edge_index, weight[order].contiguous(), layer[order].contiguous(), rowptr, int(num_nodes), tuple(layer_names))

    def validate(self, dims: dict[str, int] | None = None, prefix: str = "", *, finite: bool = True) -> dict[str, int]:
        """Check shapes and that every edge id lies in ``[0, num_nodes)``."""
        tensors = (self.edge_index, self.weight, self.layer, self.rowptr)
        key = (tuple(t._version for t in tensors), self.num_nodes, len(self.layer_names))
        hit = _CHECKED.get(id(self))
        # the same tensors, unmodified, passed the O(E) checks below before (every simulate validates: at
        # N = 1e5 this saved a tenth of a 50-day run); shapes and dtypes are checked again (the dimensions
        # bind to the other fields'), the weights' finiteness and the id ranges (O(E) passes) are not
        cached = hit is not None and hit[1] == key and all(r() is t for r, t in zip(hit[0], tensors))
        dims = super().validate(dims, prefix, finite=finite and not cached)
        if "N" in dims and dims["N"] != self.num_nodes:
            raise StateError(f"{prefix}num_nodes: expected N = {dims['N']} agents, network has {self.num_nodes}")
        if cached:
            return dims
        if self.rowptr.numel() != self.num_nodes + 1:
            raise StateError(f"{prefix}rowptr: expected {self.num_nodes + 1} entries, got {self.rowptr.numel()}")
        if self.num_edges and (int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= self.num_nodes):
            raise StateError(f"{prefix}edge_index: expected ids in [0, {self.num_nodes}), got range "
                             f"[{int(self.edge_index.min())}, {int(self.edge_index.max())}]")
        if self.num_edges and int(self.layer.max()) >= len(self.layer_names):
            raise StateError(f"{prefix}layer: code {int(self.layer.max())} has no name in {self.layer_names}")
        if self.num_edges and int(self.layer.min()) < 0:
            raise StateError(f"{prefix}layer: expected codes >= 0, found {int(self.layer.min())}")
        self._check_csr(prefix)
        if not finite:  # the weights' finiteness was not checked: nothing to remember
            return dims
        if len(_CHECKED) > 64:
            _CHECKED.clear()
        # weak references: the same tensor objects (not a new network at a reused id), unmodified in place (versions)
        _CHECKED[id(self)] = (tuple(weakref.ref(t) for t in tensors), key)
        return dims

    def _check_csr(self, prefix: str = "") -> None:
        """Edges sorted by source and ``rowptr`` equal to the cumulative out-degree (the kernels rely on both)."""
        src = self.edge_index[0].long()
        if self.num_edges > 1 and bool((src[1:] < src[:-1]).any()):
            at = int((src[1:] < src[:-1]).nonzero()[0, 0]) + 1
            raise StateError(f"{prefix}edge_index: expected edges sorted by source (use Network.build), but edge {at} "
                             f"has source {int(src[at])} after {int(src[at - 1])}")
        expected = torch.zeros(self.num_nodes + 1, dtype=torch.int64, device=self.rowptr.device)
        expected[1:] = torch.bincount(src, minlength=self.num_nodes).cumsum(0).to(expected.device)
        if not torch.equal(self.rowptr.long(), expected):
            bad = int((self.rowptr.long() != expected).nonzero()[0, 0])
            raise StateError(f"{prefix}rowptr: inconsistent with edge_index (rowptr[{bad}] = {int(self.rowptr[bad])}, "
                             f"expected {int(expected[bad])}: the cumulative out-degree); rebuild with Network.build")

    @property
    def num_edges(self) -> int:
        """Number of directed edges E."""
        return int(self.edge_index.shape[1])

    @property
    def num_layers(self) -> int:
        """Number of layers L."""
        return len(self.layer_names)

    def layer_code(self, name: str) -> int:
        """Code of layer ``name``."""
        if name not in self.layer_names:
            raise ConfigError(f"layer {name!r}: unknown; layers are {self.layer_names}")
        return self.layer_names.index(name)

    def out_degree(self) -> Tensor:
        """Number of outgoing edges per agent ``[N]``."""
        return (self.rowptr[1:] - self.rowptr[:-1])

    def in_degree(self) -> Tensor:
        """Number of incoming edges per agent ``[N]``."""
        return torch.bincount(self.edge_index[1].long(), minlength=self.num_nodes)

    def layer_edges(self, name: str) -> tuple[Tensor, Tensor]:
        """``(edge_index, weight)`` of one layer."""
        mask = self.layer == self.layer_code(name)
        return self.edge_index[:, mask].long(), self.weight[mask]

    def push(self, value: Tensor, active: Tensor | None = None, layer_scale: Tensor | None = None) -> Tensor:
        """Sum ``w_e * layer_scale[l_e] * value[source]`` into each target: ``[N]``.

        ``value`` is ``[N]`` or ``[N, L]`` (a per-layer value of each source, e.g. isolation
        removing work contacts). ``active [N] bool`` restricts the visit to edges of active
        sources, which is exact when ``value`` is zero elsewhere and costs O(active edges).
        """
        from lpm.kernels import push_compact

        n = self.num_nodes
        if self.num_edges == 0:
            return value.new_zeros(n)
        if active is None:
            idx = torch.arange(n, device=value.device)
            vals = value
        else:
            idx = active.nonzero().squeeze(1)
            vals = value.index_select(0, idx)
        force, _ = push_compact(self.edge_index[1], self.weight, self.layer, self.rowptr, n, idx, vals, layer_scale)
        return force

    def to_pyg(self) -> "object":
        """A ``torch_geometric.data.Data`` with ``edge_weight`` and ``edge_type`` (layer)."""
        from torch_geometric.data import Data

        return Data(edge_index=self.edge_index.long(), edge_weight=self.weight, edge_type=self.layer.long(), num_nodes=self.num_nodes)

    @staticmethod
    def from_pyg(data: "object", layer_names: Sequence[str] | None = None) -> "Network":
        """Build from a ``torch_geometric.data.Data`` (``edge_weight``/``edge_type`` optional)."""
        ei = data.edge_index
        n = int(data.num_nodes)
        w = getattr(data, "edge_weight", None)
        w = torch.ones(ei.shape[1]) if w is None else w.float()
        lt = getattr(data, "edge_type", None)
        lt = torch.zeros(ei.shape[1], dtype=torch.int8) if lt is None else lt.to(torch.int8)
        names = tuple(layer_names) if layer_names else tuple(f"layer{i}" for i in range(int(lt.max()) + 1 if lt.numel() else 1))
        net = Network.build(ei, w, lt, n, names)
        net.validate()
        return net

    def summary(self) -> dict[str, float]:
        """Edges and mean out-degree per layer (a quick sanity table)."""
        out: dict[str, float] = {"num_nodes": self.num_nodes, "num_edges": self.num_edges}
        counts = torch.bincount(self.layer.long(), minlength=self.num_layers)
        for code, name in enumerate(self.layer_names):
            out[f"mean_degree_{name}"] = float(counts[code]) / self.num_nodes
        return out

"""The same model on many processes: partitioned runs and data-parallel gradients over torch.distributed.

Partitioned simulation. A :class:`Partition` gives every agent an owner rank (contiguous
blocks, or whole groups such as areas). Rank ``r``'s *shard* is an ordinary state of the
model's types (system and state) over its *local rows*: the agents it owns plus *ghost* rows,
the remote sources of the edges that end in its agents, numbered in ascending global id (so
every sum over a target's in-edges runs in the same order as in the whole population's run).
System and state are sliced alike, generically by their declared shapes: ``"N"`` axes take the
local rows, ``"E"`` axes the edges that end in owned agents, integer ``(2, "E")`` fields (the
network's ids, found in the system or the state) are remapped to local rows and ``"N+1"`` row
pointers recomputed; every other field (``"B"``, ``"C+1"``, ``"Tc"``, ...) is kept whole. The
system never changes, so only state rows travel in the halo exchange. Tensors held by the
substeps themselves with a leading dimension of the population size (an intervention's
eligibility, archetype ids) are sliced the same way, on a copy of the substep.

Each step runs the model's own substeps, unchanged, on the shard:

* a substep that reads no edge field (of the system or the state) updates each row from that
  row alone, so ghost rows stay equal to their owners' rows;
* a substep that reads edges (the network) gets complete inputs for owned rows only;
  afterwards the *halo exchange* sends every owned row another rank holds as a ghost
  (one ``all_to_all`` of the changed agent fields, packed as bytes);
* a substep writing a field named in ``sums`` (a sum over agents with no agent axis, e.g. a
  per-area case window) runs on the owned rows and on no rows (of both system and state); the field becomes
  ``f(no rows) + sum_r (f(owned_r) - f(no rows))`` by ``all_reduce``;
* any other written field without an agent axis must come out equal on every rank
  (checked on the first step, or every step with ``check=True``).

Observables are evaluated on the owned rows (of system and state) and summed over ranks by
``all_reduce``; an observable that declares ``reads`` without any field with an agent or edge
axis is agent-independent and taken as is. Counts summed from the gradient carriers (value exactly 1) are integers in float32, so
their sums are exact in any order: the observables are bit-identical for any number of
ranks. Observables that are not sums over agents (means, maxima) cannot be partitioned.

Randomness does not depend on the partition: counter-based draws
(:func:`lpm.kernels.counter_uniform`) are keyed by global agent id
(:func:`lpm.kernels.register_global_ids`), and a ``torch.rand``/``randn`` draw from a substep's
stream with an agent axis is drawn for the whole population (the generator advances as in the
single run) and sliced to the local rows. This costs O(population) per rank and step; a
substep meant for large partitioned runs should draw with ``counter_uniform``. Any other draw
from a stream (``randint``, ``randperm``, ``bernoulli``, edge-sized draws) raises
:class:`DistributedError` naming the substep.

Data-parallel gradients: :func:`data_parallel_gradient` spreads calibration replicates over
ranks, gathers their predictions, and sums per-replicate parameter gradients in replicate
order, so every rank count gives the gradient bit for bit.

Partitioned runs are forward only (``grad=False``): the halo exchange is not differentiable.

Not detected (the substep must not be partitioned, or declare ``partitionable = False``): a
substep that sums over all agents *inside* itself and writes agent fields from that sum, such
as well-mixed transmission (its group prevalence would count only the rank's agents).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import socket
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lpm.errors import LPMError
from lpm.kernels import register_global_ids, unregister_global_ids
from lpm.model import Model, changed_fields
from lpm.params import ParamsLike
from lpm.results import Results
from lpm.rng import Streams
from lpm.state import State, Struct, System

__all__ = ["DistributedError", "Comm", "Partition", "Shard", "PartitionedRun", "data_parallel_gradient", "spawn",
           "init_from_env", "localize"]


class DistributedError(LPMError, ValueError):
    """A partitioned or data-parallel run cannot proceed as asked (partition, draws, checkpoints, ranks)."""


# ----------------------------------------------------------------------------- communication


class Comm:
    """Collectives over a process group, with counters of bytes sent and seconds spent.

    Without an initialised ``torch.distributed`` (or with ``group=None`` and one process) it is
    the trivial one-rank communicator, so single-process code paths need no launcher.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.device = torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            if dist.get_backend(group) == "nccl":  # NCCL moves CUDA tensors only
                self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            if group is not None:
                raise DistributedError("group: torch.distributed is not initialised; call init_from_env or spawn")
            self.rank, self.world = 0, 1
        self.bytes_sent = 0
        self.seconds = 0.0
        self.calls = 0

    def _count(self, start: float, nbytes: int) -> None:
        self.seconds += time.perf_counter() - start
        self.bytes_sent += int(nbytes)
        self.calls += 1

    def reset_counters(self) -> None:
        """Zero the byte, time and call counters."""
        self.bytes_sent, self.seconds, self.calls = 0, 0.0, 0

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks (a new tensor)."""
        out = x.detach().clone()
        if self.world == 1:
            return out
        t0 = time.perf_counter()
        buf = out.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self._count(t0, buf.numel() * buf.element_size())
        return buf.to(x.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        t0 = time.perf_counter()
        dist.all_gather_object(out, obj, group=self.group)
        self._count(t0, 0)
        return out

    def alltoallv(self, send: Sequence[Tensor]) -> list[Tensor]:
        """Send ``send[p]`` (1-D uint8) to rank ``p``; return what each rank sent here, in rank order."""
        if len(send) != self.world:
            raise DistributedError(f"alltoallv: expected {self.world} buffers (one per rank), got {len(send)}")
        if self.world == 1:
            return [send[0]]
        t0 = time.perf_counter()
        dev = self.device
        sizes = torch.tensor([int(b.numel()) for b in send], dtype=torch.int64, device=dev)
        recv_sizes = torch.empty_like(sizes)
        dist.all_to_all_single(recv_sizes, sizes, group=self.group)
        out = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(out, torch.cat([b.to(dev) for b in send]), recv_sizes.tolist(), sizes.tolist(),
                               group=self.group)
        # what leaves this rank for other ranks (its own part stays local)
        self._count(t0, int(sizes.sum()) - int(sizes[self.rank]))
        return list(out.split(recv_sizes.tolist()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(backend: str | None = None) -> Comm:
    """Join the process group a launcher (``torchrun``, Slurm ``srun``) describes in the environment.

    ``RANK``/``WORLD_SIZE`` (or ``SLURM_PROCID``/``SLURM_NTASKS``) and ``MASTER_ADDR``/``MASTER_PORT``;
    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()):
        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env:
            env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
            env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if k not in env:
                raise DistributedError(f"environment: {k} is not set; launch with torchrun (or srun with "
                                       "MASTER_ADDR/MASTER_PORT exported), or use lpm.distributed.spawn")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Comm()


def _spawn_entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(Comm(), *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, start_method: str = "spawn") -> list[Any]:
    """Run ``fn(comm, *args)`` on ``world`` local gloo processes; return each rank's result, in rank order.

    ``fn`` must be importable by name (a module-level function); results travel by ``torch.save``.
    ``start_method="fork"`` (POSIX) skips re-importing torch in every process; safe only when the
    caller has started no threads that the children would need (tests run single-threaded).
    """
    import torch.multiprocessing as mp

    if not isinstance(world, int) or world < 1:
        raise DistributedError(f"world: expected a number of processes >= 1, got {world!r}")
    with tempfile.TemporaryDirectory(prefix="lpm-dist-") as tmp:
        mp.start_processes(_spawn_entry, args=(fn, world, _free_port(), args, tmp), nprocs=world, join=True,
                           start_method=start_method)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """The owner rank of every agent: ``owner [N]`` in ``[0, world)``."""

    owner: Tensor
    world: int

    def __post_init__(self) -> None:
        if self.owner.dim() != 1 or self.owner.dtype not in (torch.int32, torch.int64):
            raise DistributedError(f"owner: expected a 1-D int tensor [N], got {self.owner.dtype} {tuple(self.owner.shape)}")
        if self.owner.numel() and (int(self.owner.min()) < 0 or int(self.owner.max()) >= self.world):
            raise DistributedError(f"owner: expected ranks in [0, {self.world}), got [{int(self.owner.min())}, "
                                   f"{int(self.owner.max())}]")

    @staticmethod
    def blocks(num_agents: int, world: int) -> "Partition":
        """Contiguous blocks of agent ids, sizes differing by at most one."""
        if world < 1 or num_agents < world:
            raise DistributedError(f"world: expected 1 <= world <= N = {num_agents}, got {world}")
        return Partition(torch.arange(num_agents, dtype=torch.int64) * world // num_agents, world)

    @staticmethod
    def by_group(group: Tensor, world: int) -> "Partition":
        """Whole groups (e.g. home areas) per rank, largest first onto the least loaded rank."""
        if not isinstance(group, Tensor) or group.dim() != 1 or group.is_floating_point() or group.is_complex():
            got = f"{group.dtype} {tuple(group.shape)}" if isinstance(group, Tensor) else type(group).__name__
            raise DistributedError(f"group: expected a 1-D integer tensor [N] of group codes, got {got}")
        if group.numel() and int(group.min()) < 0:
            raise DistributedError(f"group: expected codes >= 0, found minimum {int(group.min())}")
        if world < 1:
            raise DistributedError(f"world: expected >= 1, got {world}")
        g = group.long().cpu()
        sizes = torch.bincount(g)
        load = [0] * world
        rank_of = torch.zeros(sizes.numel(), dtype=torch.int64)
        for k in torch.argsort(sizes, descending=True, stable=True).tolist():  # groups, not agents
            r = min(range(world), key=lambda i: (load[i], i))
            rank_of[k] = r
            load[r] += int(sizes[k])
        if min(load) == 0:
            raise DistributedError(f"by_group: {int((sizes > 0).sum())} non-empty groups cannot fill {world} ranks; "
                                   "use Partition.blocks or fewer ranks")
        return Partition(rank_of[g], world)

    def sizes(self) -> list[int]:
        """Agents per rank."""
        return torch.bincount(self.owner.long(), minlength=self.world).tolist()

    def edge_cut(self, edge_index: Tensor) -> tuple[int, float]:
        """Edges whose source and target have different owners: count and share of all edges."""
        o = self.owner.long()
        cut = int((o[edge_index[0].long()] != o[edge_index[1].long()]).sum())
        return cut, cut / max(int(edge_index.shape[1]), 1)


# ----------------------------------------------------------------------------- slicing states and substeps


def _shape(f: dataclasses.Field) -> tuple:
    return tuple(f.metadata.get("shape", ()))


def _has_axis(struct: Struct, sym: str) -> bool:
    """Whether ``struct`` (recursively) has a tensor field with a ``sym`` axis."""
    for f in dataclasses.fields(struct):
        v = getattr(struct, f.name)
        if isinstance(v, Struct) and _has_axis(v, sym):
            return True
        if isinstance(v, Tensor) and sym in _shape(f):
            return True
    return False


def _agent_fields(struct: Struct) -> list[str]:
    """Top-level tensor fields with an ``"N"`` axis first (the rows a shard exchanges or views)."""
    return [f.name for f in dataclasses.fields(struct)
            if isinstance(getattr(struct, f.name), Tensor) and _shape(f)[:1] == ("N",)]


def _axis_fields(struct: Struct, syms: Sequence[str]) -> set[str]:
    """Top-level fields with one of the axes ``syms``, directly or inside a nested struct (e.g. a network)."""
    out = set()
    for f in dataclasses.fields(struct):
        v = getattr(struct, f.name)
        if (isinstance(v, Tensor) and set(_shape(f)) & set(syms)) or (
                isinstance(v, Struct) and any(_has_axis(v, s) for s in syms)):
            out.add(f.name)
    return out


def _slice_state(state: Struct, rows: Tensor, n_global: int, edges: Tensor | None, lut: Tensor | None) -> Struct:
    """``state`` (a state, a system or a nested struct) over the agent rows ``rows`` and, with ``edges``, the
    edges ``edges`` remapped by ``lut``; axes other than ``"N"``, ``"N+1"`` and ``"E"`` are kept whole."""
    changes: dict[str, Any] = {}
    agent_id_field = None
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        shape = _shape(f)
        if isinstance(v, Struct):
            changes[f.name] = _slice_state(v, rows, n_global, edges, lut)
        elif f.metadata.get("static"):
            if isinstance(v, int) and not isinstance(v, bool) and v == n_global and edges is not None:
                changes[f.name] = int(rows.numel())
        elif isinstance(v, Tensor) and "N" in shape:
            ax = shape.index("N")
            if v.shape[ax] == n_global:
                changes[f.name] = v.index_select(ax, rows.to(v.device))
        elif isinstance(v, Tensor) and "E" in shape and edges is not None:
            part = v.index_select(shape.index("E"), edges.to(v.device))
            if shape == (2, "E") and not v.is_floating_point() and v.dtype != torch.bool:
                part = lut.to(v.device)[part.long()].to(v.dtype)
                agent_id_field = f.name
            changes[f.name] = part
    if edges is not None:
        for f in dataclasses.fields(state):
            if _shape(f) == ("N+1",) and isinstance(getattr(state, f.name), Tensor) and agent_id_field is not None:
                src = changes[agent_id_field][0].long()
                ptr = torch.zeros(rows.numel() + 1, dtype=getattr(state, f.name).dtype, device=src.device)
                ptr[1:] = torch.bincount(src, minlength=rows.numel()).cumsum(0)
                changes[f.name] = ptr
    return dataclasses.replace(state, **changes) if changes else state


import numpy as np  # noqa: E402  (arrays are never agent tensors here: substeps hold torch tensors)

_ATOMIC = (np.ndarray, str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Generator, type,
           types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, nn.Module)


def localize(obj: Any, rows: Tensor, n_global: int, _memo: dict[int, Any] | None = None) -> Any:
    """A copy of ``obj`` whose tensors with a leading dimension ``n_global`` keep only ``rows``.

    Walks attributes, dataclass fields, lists, tuples and dicts; copies only what changes, and
    never enters an ``nn.Module`` (parameters stay shared with the caller's).
    """
    memo = {} if _memo is None else _memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, Tensor):
        out = obj.index_select(0, rows.to(obj.device)) if obj.dim() >= 1 and obj.shape[0] == n_global else obj
        memo[key] = out
        return out
    if isinstance(obj, _ATOMIC) or callable(obj) and not hasattr(obj, "__dict__"):
        return obj
    memo[key] = obj  # a cycle back to obj resolves to obj itself
    if isinstance(obj, (list, tuple)):
        items = [localize(v, rows, n_global, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if type(obj) not in (list, tuple):
            raise DistributedError(f"localize: cannot rebuild a {type(obj).__name__} holding agent tensors")
        out = type(obj)(items)
    elif isinstance(obj, dict):
        items = {k: localize(v, rows, n_global, memo) for k, v in obj.items()}
        out = obj if all(items[k] is obj[k] for k in obj) else type(obj)(items)
    elif hasattr(obj, "__dict__"):
        attrs = {k: localize(v, rows, n_global, memo) for k, v in vars(obj).items()}
        if all(attrs[k] is v for k, v in vars(obj).items()):
            return obj
        out = copy.copy(obj)
        for k, v in attrs.items():
            object.__setattr__(out, k, v)
    else:
        return obj
    memo[key] = out
    return out


# ----------------------------------------------------------------------------- random draws by global id


class _GlobalDraws(TorchFunctionMode):
    """While active, a draw from ``rng`` with an agent axis is drawn for all agents and sliced to ``rows``."""

    def __init__(self, owner: str, rng: torch.Generator, rows: Tensor, n_global: int,
                 log: list[tuple[str, str, str, str]] | None = None) -> None:
        super().__init__()
        self.owner, self.rng, self.rows, self.n_global, self.log = owner, rng, rows, n_global, log

    def __enter__(self) -> "_GlobalDraws":
        register_global_ids(self.rng, self.rows)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        unregister_global_ids(self.rng)
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not self.rng:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if func not in (torch.rand, torch.randn):
            raise DistributedError(f"substep {self.owner!r} draws with {name} from its stream, which a partitioned run "
                                   "cannot key by global agent id; draw with lpm.kernels.counter_uniform (or torch.rand)")
        if "size" in kwargs:
            size = list(kwargs.pop("size"))
        elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            size = list(args[0])
        else:
            size = [int(a) for a in args]
        n_local = int(self.rows.numel())
        if n_local not in size:
            if self.log is not None:  # must be the same draw on every rank, or the streams drift apart
                self.log.append((self.owner, f"a {name} draw of size {tuple(size)} (no agent axis)", repr(size),
                                 "its size depends on the rank's agents; draw per agent with counter_uniform"))
            return func(tuple(size), **kwargs)
        ax = size.index(n_local)
        size[ax] = self.n_global
        full = func(tuple(size), **kwargs)
        return full.index_select(ax, self.rows.to(full.device))


# ----------------------------------------------------------------------------- shards


@dataclass
class Shard:
    """Rank ``rank``'s rows: global ids of its local rows, which it owns, and whom it sends ghosts to."""

    rank: int
    world: int
    n_global: int
    ids: Tensor  # [n_local] int64, ascending global ids of the local rows
    owned: Tensor  # [n_owned] int64 local positions of owned rows
    send: list[Tensor]  # per rank: local positions of owned rows that rank holds as ghosts
    recv: list[Tensor]  # per rank: local positions of ghost rows that rank owns, in its send order
    edges: Tensor  # global positions of the edges kept (those ending in owned agents)

    @property
    def num_ghosts(self) -> int:
        """Ghost rows held."""
        return int(self.ids.numel() - self.owned.numel())


def _edge_index(*structs: Struct) -> Tensor | None:
    """The first integer ``(2, "E")`` field found (recursively, in ``structs`` in order): the network's source, target ids."""
    for struct in structs:
        for f in dataclasses.fields(struct):
            v = getattr(struct, f.name)
            if isinstance(v, Struct):
                found = _edge_index(v)
                if found is not None:
                    return found
            elif isinstance(v, Tensor) and _shape(f) == (2, "E") and not v.is_floating_point():
                return v
    return None


def make_shard(system: System, state: State, partition: Partition, comm: Comm) -> tuple[Shard, Tensor]:
    """This rank's rows and halo plan for ``system`` and ``state`` under ``partition``, and the global -> local row map.

    Every rank holds the whole ``system`` and ``state`` here; a loader that reads only a rank's
    rows would build the same shard from its agents and their in-edges (the network is looked
    for in the system first, then in the state).
    """
    if not isinstance(system, System):
        raise DistributedError(f"system: expected a System (what never changes during a run), got {type(system).__name__}")
    dims = system.validate(state.validate())
    n = dims.get("N")
    if n is None:
        raise DistributedError(f"{type(system).__name__} and {type(state).__name__}: no field with an agent axis 'N'; "
                               "nothing to partition")
    if partition.owner.numel() != n:
        raise DistributedError(f"partition: owner covers {partition.owner.numel()} agents, the system and state have N = {n}")
    if partition.world != comm.world:
        raise DistributedError(f"partition: made for {partition.world} ranks, the process group has {comm.world}")
    r = comm.rank
    owner = partition.owner.long().cpu()
    ei = _edge_index(system, state)
    mine = owner == r
    if ei is not None:
        src, dst = ei[0].long().cpu(), ei[1].long().cpu()
        keep = mine[dst]
        edges = keep.nonzero().squeeze(1)
        need = mine.clone()
        need[src[edges]] = True
    else:
        edges = torch.zeros(0, dtype=torch.int64)
        need = mine
    ids = need.nonzero().squeeze(1)
    ghosts = ids[~mine[ids]]
    lut = torch.full((n,), -1, dtype=torch.int64)
    lut[ids] = torch.arange(ids.numel())
    # ghosts this rank needs, grouped by owner; owners learn what to send by one exchange
    want = [ghosts[owner[ghosts] == p] for p in range(comm.world)]
    asked = comm.alltoallv([w.contiguous().view(torch.uint8) for w in want])
    asked_ids = [a.cpu().clone().view(torch.int64) for a in asked]
    send = [lut[a] for a in asked_ids]
    recv = [lut[w] for w in want]
    if any(bool((s < 0).any()) for s in send):
        raise DistributedError("halo: a rank asked for agents this rank does not hold (inconsistent partitions)")
    return Shard(r, comm.world, n, ids, lut[mine.nonzero().squeeze(1)], send, recv, edges), lut


# ----------------------------------------------------------------------------- the partitioned run


def _digest(x: Any) -> str:
    """A content hash of a tensor (or None) for cross-rank equality checks."""
    if not isinstance(x, Tensor):
        return repr(x)
    t = x.detach().cpu().contiguous().reshape(-1)
    return hashlib.blake2b(t.view(torch.uint8).numpy().tobytes() + str((t.dtype, tuple(t.shape))).encode(),
                           digest_size=16).hexdigest()


class PartitionedRun:
    """One rank's part of a partitioned run of ``model`` (see the module doc).

    ``system`` and ``state`` are the whole population's (every rank holds them; only the shard
    of each is kept). ``sums``: state fields without an agent axis that are sums over agents
    (e.g. a case window by area). ``verify``: after every step, check (one gather of hashes)
    that every other field without an agent axis came out equal on all ranks. Every rank calls
    :meth:`simulate` with the same arguments.
    """

    def __init__(self, model: Model, params: ParamsLike, system: System, state: State, partition: Partition,
                 comm: Comm | None = None, *, sums: Sequence[str] = (), verify: bool = True) -> None:
        self.model, self.params = model, params
        self.verify = bool(verify)
        self.comm = comm or Comm()
        model.check(params, system, state)
        self.shard, lut = make_shard(system, state, partition, self.comm)
        sh = self.shard
        self.n_global = sh.n_global
        self.system = _slice_state(system, sh.ids, sh.n_global, sh.edges, lut)
        self.state = _slice_state(state, sh.ids, sh.n_global, sh.edges, lut)
        dev = self.state.device  # index plans live where the state does (CUDA under NCCL)
        sh.ids, sh.owned = sh.ids.to(dev), sh.owned.to(dev)
        sh.send, sh.recv = [x.to(dev) for x in sh.send], [x.to(dev) for x in sh.recv]
        self.sums = tuple(sums)
        names, constant = set(state.field_names()), set(system.field_names())
        for f in self.sums:
            if f in constant:
                raise DistributedError(f"sums: field {f!r} is a field of the system {type(system).__name__} (constant "
                                       f"during a run); sums names fields of the state {type(state).__name__}")
            if f not in names:
                raise DistributedError(f"sums: field {f!r} is not a field of {type(state).__name__}")
        self.agent_fields = _agent_fields(state)  # only state rows change, so only they travel in the halo
        self.system_agent_fields = _agent_fields(system)
        edge_fields = _axis_fields(system, ("E",)) | _axis_fields(state, ("E",))
        # fields whose value depends on which agents (or edges) a rank holds: observables reading them are summed
        self.agent_dependent = _axis_fields(system, ("N", "N+1", "E")) | _axis_fields(state, ("N", "N+1", "E"))
        self.owned_ids = sh.ids.index_select(0, sh.owned)
        # the system never changes: its views on the owned rows and on no rows are made once
        self.system_owned = self._view(self.system, sh.owned, self.system_agent_fields)
        self.system_empty = self._view(self.system, sh.owned[:0], self.system_agent_fields)
        self.neighbour: dict[str, bool] = {}
        self.aggregate: dict[str, bool] = {}
        self.local: dict[str, Any] = {}
        self.owned_sub: dict[str, Any] = {}
        self.empty_sub: dict[str, Any] = {}
        empty = torch.zeros(0, dtype=torch.int64)
        for s in model.substeps:
            reads = set(s.reads) | set(getattr(s, "optional_reads", ()))
            self.neighbour[s.name] = bool(reads & edge_fields)
            self.aggregate[s.name] = bool(set(s.writes) & set(self.sums))
            if getattr(s, "partitionable", True) is False:
                raise DistributedError(f"substep {s.name!r} declares partitionable = False")
            if self.aggregate[s.name] and self.neighbour[s.name]:
                raise DistributedError(f"substep {s.name!r} writes the sum field(s) {sorted(set(s.writes) & set(self.sums))} "
                                       "and reads edges; a partitioned run cannot reduce it")
            self.local[s.name] = localize(s, sh.ids, sh.n_global)
            if self.aggregate[s.name]:
                self.owned_sub[s.name] = localize(s, self.owned_ids, sh.n_global)
                self.empty_sub[s.name] = localize(s, empty, sh.n_global)
        self.halo_bytes = 0
        self.halo_seconds = 0.0
        self._system_digest: str | None = None

    # -- views
    def _view(self, struct: Struct, pos: Tensor, agent_fields: Sequence[str], fields: Sequence[str] | None = None) -> Any:
        """``struct`` (system or state) restricted to the local rows ``pos`` (its ``agent_fields`` only; edges untouched)."""
        if pos.numel() == self.shard.ids.numel():  # no ghost rows: the owned rows are all rows, in order
            return struct
        changes = {}
        for f in dataclasses.fields(struct):
            if f.name not in agent_fields or (fields is not None and f.name not in fields):
                continue
            v = getattr(struct, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v.index_select(0, pos.to(v.device))
        return dataclasses.replace(struct, **changes) if changes else struct

    # -- halo
    def _exchange(self, state: State, names: Sequence[str]) -> State:
        """Refresh the ghost rows of the agent fields ``names`` from their owners (one all-to-all)."""
        sh, comm = self.shard, self.comm
        if comm.world == 1 or not names:
            return state
        vals = [getattr(state, n) for n in names]
        widths = [v[0:1].contiguous().view(torch.uint8).numel() if v.numel() else 0 for v in vals]
        row_bytes = sum(widths)
        send = []
        for p in range(comm.world):
            pos = sh.send[p]
            if pos.numel() == 0 or p == comm.rank:
                send.append(torch.zeros(0, dtype=torch.uint8, device=vals[0].device))
                continue
            parts = [v.index_select(0, pos).contiguous().view(torch.uint8).reshape(pos.numel(), -1) for v in vals]
            send.append(torch.cat(parts, 1).reshape(-1))
        t0 = time.perf_counter()
        got = comm.alltoallv(send)
        self.halo_seconds += time.perf_counter() - t0
        self.halo_bytes += sum(int(b.numel()) for p, b in enumerate(send) if p != comm.rank)
        rows = [g.reshape(-1, row_bytes) for p, g in enumerate(got) if sh.recv[p].numel() and p != comm.rank]
        if not rows:
            return state
        pos = torch.cat([sh.recv[p] for p, g in enumerate(got) if sh.recv[p].numel() and p != comm.rank])
        block = torch.cat(rows, 0)
        changes, col = {}, 0
        for n, v, w in zip(names, vals, widths):
            part = block[:, col:col + w].contiguous().view(v.dtype).reshape(-1, *v.shape[1:]).to(v.device)
            changes[n] = v.clone().index_copy_(0, pos.to(v.device), part)
            col += w
        return dataclasses.replace(state, **changes)

    # -- one substep
    def _call(self, sub: Any, name: str, system: System, state: State, t: int, rng: torch.Generator,
              rows: Tensor) -> State:
        log = self._pending if self.comm.world > 1 and self._checking else None
        with _GlobalDraws(name, rng, rows, self.n_global, log):
            return sub(self.params, system, state, t, rng)

    def _substep(self, s: Any, state: State, t: int, streams: Streams, check: bool) -> State:
        rng = streams[s.name]
        sh = self.shard
        if self.aggregate[s.name]:
            # runs on the owned rows (a sum over agents must not count ghosts) and on no rows (the agent-free part)
            g_state = rng.get_state()
            base = self._call(self.empty_sub[s.name], s.name, self.system_empty,
                              self._view(state, sh.owned[:0], self.agent_fields), t, rng, sh.ids[:0])
            rng.set_state(g_state)
            out = self._call(self.owned_sub[s.name], s.name, self.system_owned,
                             self._view(state, sh.owned, self.agent_fields), t, rng, self.owned_ids)
            changes = {}
            for f in s.writes:
                new = getattr(out, f)
                if f in self.sums:
                    b = getattr(base, f)
                    changes[f] = b + self.comm.all_reduce_sum(new - b).to(b.device)
                elif f in self.agent_fields:
                    old = getattr(state, f)
                    changes[f] = old.clone().index_copy_(0, sh.owned.to(old.device), new) if new is not old else old
                else:
                    changes[f] = new
            result = dataclasses.replace(state, **changes)
            moved = [f for f in s.writes if f in self.agent_fields and changes[f] is not getattr(state, f)]
            return self._exchange(result, moved)
        out = self._call(self.local[s.name], s.name, self.system, state, t, rng, sh.ids)
        written = changed_fields(state, out)
        if self.neighbour[s.name]:
            out = self._exchange(out, [f for f in self.agent_fields if f in written])
        if self.comm.world > 1 and self._checking:
            for f in written:
                if f not in self.agent_fields and not isinstance(getattr(out, f), Struct):
                    self._pending.append((s.name, f"field {f!r} (no agent axis)", _digest(getattr(out, f)),
                                          f"it depends on the agents; declare it in sums=({f!r},) if it is a sum "
                                          "over agents"))
        return out

    def _check_replicated(self, t: int) -> None:
        """All ranks wrote the same fields without an agent axis and made the same such draws this step (one gather)."""
        mine, self._pending = self._pending, []
        if self.comm.world == 1 or not self._checking:
            return
        for r, theirs in enumerate(self.comm.all_gather_object(mine)):
            for (name, what, a, hint), (_, _, b, _) in zip(mine, theirs):
                if a != b:
                    raise DistributedError(f"substep {name!r}: {what} differs between rank {self.comm.rank} and rank "
                                           f"{r} at step {t}: {hint}")
            if len(theirs) != len(mine):
                extra = (mine if len(mine) > len(theirs) else theirs)[min(len(mine), len(theirs))]
                raise DistributedError(f"substep {extra[0]!r}: {extra[1]} happens on rank {self.comm.rank} or rank {r} "
                                       f"only, at step {t}: {extra[3]}")

    # -- observables
    def _observe(self, state: State) -> dict[str, Tensor]:
        obs = self.model.observables
        agent = self.agent_dependent
        reads = set().union(*(o.reads for o in obs.values())) if all(o.reads for o in obs.values()) else None
        view = self._view(state, self.shard.owned, self.agent_fields, sorted(reads) if reads is not None else None)
        vals = {k: o.fn(self.system_owned, view) for k, o in obs.items()}
        summed = [k for k, o in obs.items() if not (o.reads and not (set(o.reads) & agent))]
        if self.comm.world > 1 and summed:
            flat = torch.cat([vals[k].reshape(-1).to(torch.float64) for k in summed])
            total = self.comm.all_reduce_sum(flat)
            at = 0
            for k in summed:
                n = vals[k].numel()
                vals[k] = total[at:at + n].to(vals[k].dtype).reshape(vals[k].shape)
                at += n
        return vals

    # -- the loop
    def simulate(self, steps: int, *, seed: int = 0, check: bool = False, checkpoint: str | Path | None = None,
                 every: int = 0, stop_after: int | None = None) -> Results:
        """Run ``steps`` steps; every rank gets the same (all-reduced) observables ``[T, ...]``.

        ``check=True`` verifies replicated fields even when the run was built with ``verify=False``.
        ``checkpoint``: a directory holding one file per rank, written every ``every`` steps and
        resumed from when present (a different rank count is an error). ``stop_after``: stop
        after that many steps of this call (to test resuming).
        """
        if not isinstance(steps, int) or steps < 0:
            raise DistributedError(f"steps: expected a non-negative int, got {steps!r}")
        ctx = torch.no_grad()  # forward only: the halo exchange carries no gradient
        streams = Streams(seed, [s.name for s in self.model.substeps], self.state.device)
        state, start = self.state, 0
        records: dict[str, list[Tensor]] = {k: [] for k in self.model.observables}
        path = None
        if checkpoint is not None:
            path = Path(checkpoint)
            path.mkdir(parents=True, exist_ok=True)
            loaded = self._load(path, seed)
            if loaded is not None:
                state, start, records, rng_state = loaded
                streams.set_state(rng_state)
        self._pending: list[tuple[str, str, str, str]] = []
        self._checking = self.verify or check  # the same on every rank: every rank joins the per-step gather
        self.halo_bytes, self.halo_seconds = 0, 0.0
        self.comm.reset_counters()
        t_start = time.perf_counter()
        done = 0
        with ctx:
            t = start
            while t < steps and (stop_after is None or done < stop_after):
                for s in self.model.substeps:
                    state = self._substep(s, state, t, streams, check)
                self._check_replicated(t)
                for k, v in self._observe(state).items():
                    records[k].append(v)
                t += 1
                done += 1
                if path is not None and every and (t % every == 0 or t == steps):
                    self._save(path, seed, state, t, records, streams)
        wall = time.perf_counter() - t_start
        obs = {k: (torch.stack(v) if v else torch.empty(0)) for k, v in records.items()}
        labels = {k: (tuple(o.labels) if o.labels is not None else None) for k, o in self.model.observables.items()}
        meta = {"seed": seed, "steps": t, "resumed_from": start, "world": self.comm.world, "rank": self.comm.rank,
                "halo_bytes": self.halo_bytes, "comm_bytes": self.comm.bytes_sent, "comm_seconds": self.comm.seconds,
                "halo_seconds": self.halo_seconds, "wall_seconds": wall, "steps_run": done,
                "owned": int(self.shard.owned.numel()), "ghosts": self.shard.num_ghosts}
        self.final_state = state
        return Results(obs, labels, self.model.dt, 0, state, meta)

    # -- checkpoints
    def _file(self, path: Path) -> Path:
        return path / f"rank{self.comm.rank}-of-{self.comm.world}.pt"

    def _system_fingerprint(self) -> str:
        """Content hash of this rank's shard of the system (never checkpointed, so a resume must find the same one)."""
        if self._system_digest is None:
            flat = self.system.flat_tensors()
            parts = [type(self.system).__name__] + [f"{k}={_digest(flat[k])}" for k in sorted(flat)]
            self._system_digest = hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()
        return self._system_digest

    def _save(self, path: Path, seed: int, state: State, t: int, records: dict[str, list[Tensor]], streams: Streams) -> None:
        blob = {"world": self.comm.world, "rank": self.comm.rank, "seed": seed, "step": t,
                "owned_ids": _digest(self.owned_ids.cpu()), "ids": _digest(self.shard.ids),
                "system": self._system_fingerprint(),
                "state": {k: v.detach().cpu() for k, v in state.flat_tensors().items()},
                "records": {k: [x.cpu() for x in v] for k, v in records.items()}, "rng": streams.get_state()}
        tmp = self._file(path).with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self._file(path))

    def _load(self, path: Path, seed: int) -> tuple[State, int, dict[str, list[Tensor]], dict] | None:
        found = sorted(path.glob("rank*-of-*.pt"))
        if not found:
            return None
        worlds = {int(p.stem.split("-of-")[1]) for p in found}
        if worlds != {self.comm.world}:
            raise DistributedError(f"checkpoint {path}: written by {sorted(worlds)} rank(s), resumed with "
                                   f"{self.comm.world}; resume with the same number of ranks (resharding a "
                                   "checkpoint is not supported)")
        mine = self._file(path)
        blob, problem = None, None
        if not mine.exists():
            problem = f"checkpoint {path}: no file for rank {self.comm.rank} ({mine.name})"
        else:
            blob = torch.load(mine, weights_only=False)
            # owned rows depend on the partition only; ghost rows and the shard's system also on the system
            if blob.get("owned_ids") != _digest(self.owned_ids.cpu()):
                problem = f"checkpoint {mine}: saved for other agents on this rank (a different partition)"
            elif blob.get("system") != self._system_fingerprint() or blob["ids"] != _digest(self.shard.ids):
                problem = (f"checkpoint {mine}: saved with a different system (network, agent attributes, schedules "
                           "or tables); the system is not checkpointed, so resume with the one the run started with")
            elif blob["seed"] != seed:
                problem = f"checkpoint {mine}: saved with seed {blob['seed']}, resumed with {seed}"
        # one gather: a problem found on any rank stops every rank (none waits in a collective for it)
        verdicts = self.comm.all_gather_object((problem, None if blob is None else int(blob["step"])))
        for r, (msg, _) in enumerate(verdicts):
            if msg is not None:
                raise DistributedError(msg if r == self.comm.rank else f"rank {r}: {msg}")
        steps = [step for _, step in verdicts]
        if len(set(steps)) != 1:
            raise DistributedError(f"checkpoint {path}: ranks saved at different steps {steps}")
        state = self.state.with_flat_tensors(blob["state"])
        return state, int(blob["step"]), blob["records"], blob["rng"]


# ----------------------------------------------------------------------------- data-parallel gradients


def data_parallel_gradient(predict: Callable[[int], Mapping[str, Tensor]],
                           loss: Callable[[Mapping[str, Tensor]], Tensor],
                           params: nn.Module, seeds: Sequence[int], comm: Comm | None = None) -> tuple[Tensor, Tensor]:
    """Loss of the replicate-mean prediction and its gradient, with replicates spread over ranks.

    ``predict(seed)`` simulates one replicate (with autograd) and returns its predictions;
    ``loss(mean)`` scores their mean over ``seeds``. Rank ``r`` runs the seeds ``r, r + W, ...``;
    the predictions are gathered, every rank evaluates the loss of the mean in seed order, and
    each replicate's parameter gradient (the chain rule through its own rollout) is gathered and
    summed in seed order. Result: ``(loss, grad)`` with ``grad`` flat over the trainable parameters,
    bit-identical for any number of ranks; ``.grad`` of the parameters is set to it.
    """
    comm = comm or Comm()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise DistributedError("seeds: expected at least one replicate seed")
    trainable = [p for p in params.parameters() if p.requires_grad]
    if not trainable:
        raise DistributedError("params: no trainable parameter to differentiate")
    mine = list(range(comm.rank, len(seeds), comm.world))
    live: dict[int, dict[str, Tensor]] = {}
    with torch.enable_grad():
        for i in mine:
            live[i] = dict(predict(seeds[i]))
    values = {i: {k: v.detach().cpu() for k, v in p.items()} for i, p in live.items()}
    every: dict[int, dict[str, Tensor]] = {}
    for part in comm.all_gather_object(values):
        every.update(part)
    keys = list(every[0])
    leaves = [{k: every[i][k].clone().requires_grad_(True) for k in keys} for i in range(len(seeds))]
    with torch.enable_grad():
        mean = {k: sum(leaves[i][k] for i in range(len(seeds))) / len(seeds) for k in keys}
        value = loss(mean)
        flat_leaves = [leaves[i][k] for i in range(len(seeds)) for k in keys]
        grads = torch.autograd.grad(value, flat_leaves + trainable, allow_unused=True)
    upstream = grads[:len(flat_leaves)]
    direct = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads[len(flat_leaves):], trainable)])
    per_seed: dict[int, Tensor] = {}
    for i in mine:
        outs = [live[i][k] for k in keys]
        ups = [upstream[i * len(keys) + j] for j in range(len(keys))]
        pairs = [(o, u.to(o.device)) for o, u in zip(outs, ups) if u is not None and o.requires_grad]
        g = torch.autograd.grad([o for o, _ in pairs], trainable, [u for _, u in pairs], allow_unused=True) if pairs \
            else [None] * len(trainable)
        per_seed[i] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).detach().cpu()
                                 for x, p in zip(g, trainable)])
    gathered: dict[int, Tensor] = {}
    for part in comm.all_gather_object(per_seed):
        gathered.update(part)
    total = direct.detach().cpu().clone()
    for i in range(len(seeds)):  # fixed order: the same float sum on every rank count
        total = total + gathered[i]
    at = 0
    for p in trainable:
        n = p.numel()
        p.grad = total[at:at + n].reshape(p.shape).to(p.device, p.dtype).clone()
        at += n
    return value.detach(), total

"""Named, constrained model parameters as one ``nn.Module``.

Each parameter is stored unconstrained and read through a differentiable transform, so
that a plain torch optimizer can step it without leaving its domain::

    params = Params(beta=Positive(0.3), p_symptomatic=Interval(0.6, 0.0, 1.0),
                    gamma=Fixed(0.1))
    params.beta           # tensor(0.3000, grad_fn=...)
    torch.optim.Adam(params.parameters(), lr=0.05)

``Fixed`` values are buffers: they move with ``.to(device)`` but are not fitted.
``params.freeze("ifr")`` holds a fitted parameter at its value for a while (a staged fit)
and ``unfreeze`` releases it; ``params.raw("beta")`` is the unconstrained tensor an
optimizer steps (never address storage by name prefix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Self, runtime_checkable

import torch
from torch import Tensor, nn

from lpm.errors import ParamError

__all__ = ["ParamError", "Params", "ParamsLike", "Positive", "Interval", "Real", "Fixed", "ParamSpec", "check_params"]


def check_params(params: nn.Module, where: str = "") -> None:
    """Raise naming the first parameter or buffer of ``params`` that holds NaN/inf, or a value outside its domain."""
    at = f" ({where})" if where else ""
    for kind, items in (("parameter", params.named_parameters()), ("buffer", params.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
                bad = int((~torch.isfinite(t.detach())).sum())
                raise ParamError(f"{kind} {name}: {bad} of {t.numel()} values are NaN/inf{at}; "
                                 f"values: {t.detach().flatten()[:5].tolist()}")
    for module_name, m in params.named_modules():
        if isinstance(m, Params):
            m.check_domains(where, prefix=f"{module_name}." if module_name else "")


def _as_tensor(name: str, value: Any) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if not bool(torch.isfinite(t).all()):
        raise ParamError(f"parameter {name}: expected finite values, got {value!r}")
    return t


@dataclass(frozen=True)
class ParamSpec:
    """Initial value and domain of one parameter (scalar or tensor)."""

    value: Any
    low: float = -math.inf
    high: float = math.inf
    trainable: bool = True

    def check(self, name: str, t: Tensor) -> None:
        """Raise if ``t`` lies outside the declared open domain."""
        lo_ok = bool((t > self.low).all()) if self.low > -math.inf else True
        hi_ok = bool((t < self.high).all()) if self.high < math.inf else True
        if not (lo_ok and hi_ok):
            raise ParamError(
                f"parameter {name}: expected values in ({self.low}, {self.high}), got {t.tolist()}"
            )

    def to_raw(self, t: Tensor) -> Tensor:
        """Inverse transform: constrained value to unconstrained storage."""
        if self.low > -math.inf and self.high < math.inf:
            z = (t - self.low) / (self.high - self.low)
            return torch.log(z) - torch.log1p(-z)
        if self.low > -math.inf:
            x = t - self.low
            # inverse softplus, stable for large x
            return x + torch.log(-torch.expm1(-x))
        if self.high < math.inf:
            x = self.high - t
            return -(x + torch.log(-torch.expm1(-x)))
        return t

    def from_raw(self, raw: Tensor) -> Tensor:
        """Forward transform: unconstrained storage to constrained value."""
        if self.low > -math.inf and self.high < math.inf:
            return self.low + (self.high - self.low) * torch.sigmoid(raw)
        if self.low > -math.inf:
            return self.low + nn.functional.softplus(raw)
        if self.high < math.inf:
            return self.high - nn.functional.softplus(-raw)
        return raw


def Positive(value: Any) -> ParamSpec:
    """A parameter constrained to (0, inf) by a softplus."""
    return ParamSpec(value, 0.0, math.inf)


def Interval(value: Any, low: float, high: float) -> ParamSpec:
    """A parameter constrained to (low, high) by a scaled sigmoid."""
    if not low < high:
        raise ParamError(f"Interval: expected low < high, got ({low}, {high})")
    return ParamSpec(value, low, high)


def Real(value: Any) -> ParamSpec:
    """An unconstrained parameter."""
    return ParamSpec(value)


def Fixed(value: Any) -> ParamSpec:
    """A constant stored as a buffer: moves with the module, never fitted."""
    return ParamSpec(value, trainable=False)


@runtime_checkable
class ParamsLike(Protocol):
    """What substeps, models and calibration need of parameters: named values read as attributes.

    :class:`Params` implements it; so does a module that computes some values (e.g. a
    covariate network giving a time-varying parameter) on top of a ``Params``.
    """

    def __getattr__(self, name: str) -> Any: ...

    def names(self) -> tuple[str, ...]: ...

    def require(self, *names: str, owner: str = "model") -> None: ...

    def fitted(self) -> Iterator[str]: ...

    def values(self) -> dict[str, Tensor]: ...

    def set(self, **values: Any) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


class Params(nn.Module):
    """One module of named, constrained parameters, read as attributes."""

    def __init__(self, **specs: ParamSpec | float | Tensor) -> None:
        super().__init__()
        self._specs: dict[str, ParamSpec] = {}
        for name, spec in specs.items():
            self.add(name, spec)

    def add(self, name: str, spec: ParamSpec | float | Tensor) -> None:
        """Register parameter ``name``; plain numbers and tensors become ``Fixed``."""
        if not isinstance(spec, ParamSpec):
            spec = Fixed(spec)
        if name in self._specs:
            raise ParamError(f"parameter {name}: already defined")
        t = _as_tensor(name, spec.value)
        if spec.trainable:
            spec.check(name, t)
            self.register_parameter("raw_" + name, nn.Parameter(spec.to_raw(t)))
        else:
            self.register_buffer("fixed_" + name, t)
        self._specs[name] = spec

    def __getattr__(self, name: str) -> Any:
        specs = self.__dict__.get("_specs")
        if specs is not None and name in specs:
            spec = specs[name]
            if spec.trainable:
                raw = self._parameters["raw_" + name]
                if torch.is_grad_enabled() and raw.requires_grad:
                    return spec.from_raw(raw)  # a fresh graph node per read: one run's backward must not free another's
                if torch.is_inference_mode_enabled():
                    return spec.from_raw(raw)  # inference tensors carry no version counter to key a cache on
                # without a graph the value is cached (each step reads it): per raw tensor, storage (``.to`` swaps
                # a parameter's data in place) and version, and only while the cached tensor itself is unmodified
                # (an in-place write to a returned value is seen)
                cache = self.__dict__.setdefault("_value_cache", {})
                hit = cache.get(name)
                key = (raw._version, raw.data_ptr(), raw.dtype, raw.device)
                if hit is not None and hit[0] is raw and hit[1] == key and hit[3] == hit[2]._version:
                    return hit[2]
                value = spec.from_raw(raw)
                cache[name] = (raw, key, value, value._version)
                return value
            return self._buffers["fixed_" + name]
        return super().__getattr__(name)

    def check_domains(self, where: str = "", prefix: str = "") -> None:
        """Raise if a trainable parameter's value left its declared (closed) domain, e.g. a saturated transform."""
        for n, spec in self._specs.items():
            if not spec.trainable:
                continue
            v = getattr(self, n).detach()
            if bool((v < spec.low).any()) or bool((v > spec.high).any()) or not bool(torch.isfinite(v).all()):
                raise ParamError(f"parameter {prefix}{n}: expected values in [{spec.low}, {spec.high}], got "
                                 f"{v.flatten()[:5].tolist()}" + (f" ({where})" if where else ""))

    def names(self) -> tuple[str, ...]:
        """Names of all parameters, fitted and fixed."""
        return tuple(self._specs)

    def raw(self, name: str) -> nn.Parameter:
        """The unconstrained tensor the optimizer steps for fitted parameter ``name``."""
        self.require(name, owner="Params.raw")
        if not self._specs[name].trainable:
            raise ParamError(f"parameter {name}: Fixed (a buffer), has no unconstrained storage")
        return self._parameters["raw_" + name]

    def freeze(self, *names: str) -> Self:
        """Hold fitted parameters at their current values (no gradient) until :meth:`unfreeze`."""
        for n in names:
            self.raw(n).requires_grad_(False)
        return self

    def unfreeze(self, *names: str) -> Self:
        """Fit frozen parameters again."""
        for n in names:
            self.raw(n).requires_grad_(True)
        return self

    def frozen(self) -> tuple[str, ...]:
        """Names of fitted parameters currently frozen."""
        return tuple(n for n, s in self._specs.items() if s.trainable and not self._parameters["raw_" + n].requires_grad)

    def require(self, *names: str, owner: str = "model") -> None:
        """Raise if any of ``names`` is not defined, naming the one missing and its user."""
        for n in names:
            if n not in self._specs:
                raise ParamError(f"{owner}: needs parameter {n!r}; defined: {sorted(self._specs)}")

    def values(self) -> dict[str, Tensor]:
        """Constrained values, detached, keyed by name."""
        return {n: getattr(self, n).detach().clone() for n in self._specs}

    def set(self, **values: Any) -> None:
        """Set constrained values in place (for tests, grids and finite differences)."""
        with torch.no_grad():
            for name, value in values.items():
                if name not in self._specs:
                    raise ParamError(f"parameter {name}: unknown; defined: {sorted(self._specs)}")
                spec = self._specs[name]
                current = getattr(self, name)
                t = _as_tensor(name, value).to(current.device).expand_as(current).clone()
                if spec.trainable:
                    spec.check(name, t)
                    self._parameters["raw_" + name].copy_(spec.to_raw(t))
                else:
                    self._buffers["fixed_" + name].copy_(t)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: value (list or float), bounds and whether fitted."""
        out = {}
        for n, spec in self._specs.items():
            v = getattr(self, n).detach().cpu()
            out[n] = {
                "value": v.tolist(),
                "low": spec.low if math.isfinite(spec.low) else None,
                "high": spec.high if math.isfinite(spec.high) else None,
                "fitted": spec.trainable,
            }
        return out

    def fitted(self) -> Iterator[str]:
        """Names of the trainable (non-``Fixed``) parameters, frozen ones included."""
        return (n for n, s in self._specs.items() if s.trainable)

    def extra_repr(self) -> str:
        parts = []
        for n, s in self._specs.items():
            v = getattr(self, n).detach()
            val = f"{float(v):.4g}" if v.numel() == 1 else f"[{v.numel()} values]"
            parts.append(f"{n}={val}{'' if s.trainable else ' (fixed)'}")
        return ", ".join(parts)

"""The only place that chooses an implementation.

A backend is a module (or namespace) with

- ``status() -> BackendStatus``: whether it can run here, and why not;
- ``supports(device: torch.device) -> bool``: whether it runs on tensors of that device;
- ``match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize) -> (values, indices)``:
  the matching of :mod:`salign_kernels.reference` with the same semantics, differentiable in values;
- optionally ``match_symmetric(...)`` with the same arguments, returning the matches of both
  directions ``[(values_ab, indices_ab), (values_ba, indices_ba)]`` from one fused pass.

``backend="auto"`` takes the first available backend of :data:`AUTO_ORDER` for the tensors' device.
An explicitly named backend that is unavailable, or that does not run on that device, raises.
Backends load lazily: importing :mod:`salign_kernels` never compiles or probes anything.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch

from . import reference
from ._validation import BACKEND_NAMES, check_choice

#: Fastest first, per device type; ``"reference"`` runs everywhere and ends every list.
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}

#: Where each compiled backend lives; each module defines ``status``, ``supports`` and ``match``.
_BACKEND_MODULES = {"cpp": "salign_kernels.ops.cpu", "triton": "salign_kernels.ops.triton"}


@dataclass(frozen=True, eq=False)
class BackendStatus:
    """Whether a backend can run here; truthy when it can, with ``reason`` saying why not.

    Compares equal to a bool, so ``backends()["reference"] == True`` reads as expected.
    """

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available

    def __eq__(self, other) -> bool:
        if isinstance(other, bool):
            return self.available == other
        if isinstance(other, BackendStatus):
            return (self.available, self.reason) == (other.available, other.reason)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.available)

    def __repr__(self) -> str:
        return "True" if self.available else f"False ({self.reason})"


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here or on the given device."""


_REFERENCE = types.SimpleNamespace(
    name="reference",
    status=lambda: BackendStatus(True),
    supports=lambda device: True,
    match=reference.match,
)


#: name -> (module or None, status), filled on first use of each backend.
_LOADED: Dict[str, Tuple[object, BackendStatus]] = {}


def _load(name: str):
    """The backend's module (or namespace) and its status; never raises."""
    if name not in _LOADED:
        if name == "reference":
            _LOADED[name] = (_REFERENCE, _REFERENCE.status())
        else:
            try:
                module = importlib.import_module(_BACKEND_MODULES[name])
            except Exception as exc:  # a missing extension or package makes the backend unavailable
                _LOADED[name] = (None, BackendStatus(False, f"{type(exc).__name__}: {exc}"))
            else:
                _LOADED[name] = (module, module.status())
    return _LOADED[name]


def backends() -> Dict[str, BackendStatus]:
    """Every backend and whether it is available here, with the reason when it is not.

    Example:
        >>> salign_kernels.backends()
        {'reference': True, 'cpp': True, 'triton': False (no CUDA device: ...)}
    """
    return {name: _load(name)[1] for name in ("reference", "cpp", "triton")}


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    """The name of the backend that runs for ``backend`` on ``device_type`` tensors, loaded.

    A constant for ``torch.compile``: it runs once, at trace time, so compiled code neither traces
    the imports nor breaks its graph here.
    """
    device = torch.device(device_type)
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            module, status = _load(name)
            if status and module.supports(device):
                return name
        return "reference"  # unreachable while "reference" ends every order; kept for new devices
    module, status = _load(backend)
    if not status:
        raise BackendUnavailableError(f"backend={backend!r} is not available: {status.reason}")
    if not module.supports(device):
        raise BackendUnavailableError(f"backend={backend!r} does not run on {device_type} tensors")
    return backend


def select(backend: str, device: Union[torch.device, str]):
    """The backend object that will run for ``backend`` on tensors of ``device``.

    Raises:
        ValueError: ``backend`` is not a known name.
        BackendUnavailableError: ``backend`` was named explicitly and cannot run here or on ``device``.
    """
    check_choice(backend, "backend", BACKEND_NAMES)
    return _LOADED[_resolve(backend, torch.device(device).type)][0]


def match_directions(impl, feat_a, feat_b, window, mode, mask_a, mask_b, normalize, symmetric):
    """The matches a -> b (and b -> a when ``symmetric``), fused when the backend can."""
    if not symmetric:
        return [impl.match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)]
    fused = getattr(impl, "match_symmetric", None)
    if fused is not None:
        return fused(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)
    return [
        impl.match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize),
        impl.match(feat_b, feat_a, window, mode, mask_b, mask_a, normalize),
    ]


def resolve_backend(backend: str = "auto", device: Union[torch.device, str] = "cpu") -> str:
    """The name of the backend that ``backend`` selects for tensors on ``device``.

    Example:
        >>> salign_kernels.resolve_backend("auto", "cpu")
        'cpp'
    """
    return select(backend, device).name

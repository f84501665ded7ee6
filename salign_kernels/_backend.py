"""The only place that chooses an implementation.

:data:`BACKENDS` is the table of backends, one row each: its name, the device types on which
``backend="auto"`` considers it, and the module that implements it. The names the API accepts, the
order ``auto`` tries and :func:`backends` all derive from it. A backend module provides

- ``status() -> BackendStatus``: whether it can run here at all, and why not;
- ``supports(device) -> bool``: whether it runs on tensors of that device when named explicitly
  (e.g. the Triton backend runs on CPU tensors under Triton's interpreter, for tests);
- ``unsupported(feat_a, matching) -> Optional[str]``: the capability check on the actual inputs,
  the reason this problem is beyond it, or None;
- ``match(feat_a, feat_b, matching) -> (values, indices)``: the matching of
  :mod:`salign_kernels.reference`, same semantics, differentiable in values;
- ``fuses_symmetric(feat_a, matching) -> bool`` and ``match_symmetric(feat_a, feat_b, matching)
  -> [(values_ab, indices_ab), (values_ba, indices_ba)]``: both directions from one pass, where
  the backend can. Otherwise :func:`match_directions` runs two one-way passes.
- optionally ``fused_alignment_loss(feat_a, feat_b, matching, symmetric, reduction) -> Tensor``: the
  ``"mean"``/``"sum"`` loss from one fused op (reduction and gradient in the kernels). Without it,
  and for ``"none"``, :func:`alignment_loss` reduces the matches in PyTorch.

``matching`` is the :class:`~salign_kernels._matching.Matching` of the call (spatial shape,
per-axis window, mode, normalisation, masks). Backends load lazily: importing
:mod:`salign_kernels` never compiles or probes anything. The first use of the cpp backend may
compile its extension (once per torch and machine, see :mod:`salign_kernels.ops._extension`);
when that cannot work its status says why, and ``auto`` warns once and falls back.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

import torch

from ._matching import Matching
from ._reduction import alignment_loss as reduce_matches
from ._validation import check_choice


@dataclass(frozen=True)
class BackendEntry:
    """One row of :data:`BACKENDS`."""

    name: str
    #: Device types on which ``auto`` considers this backend; ``("*",)``: every device.
    auto_devices: Tuple[str, ...]
    #: The module implementing the backend protocol (see this module's docstring).
    module: str
    #: The backend ``auto`` ends with: it runs everywhere, slowly.
    fallback: bool = False


BACKENDS = (
    BackendEntry("reference", ("*",), "salign_kernels.reference", fallback=True),
    BackendEntry("cpp", ("cpu",), "salign_kernels.ops.cpp"),
    BackendEntry("triton", ("cuda",), "salign_kernels.ops.triton"),
)

#: The backends by name, in table order.
NAMES = tuple(entry.name for entry in BACKENDS)
#: What ``backend=`` accepts.
BACKEND_NAMES = ("auto",) + NAMES
_ENTRIES = {entry.name: entry for entry in BACKENDS}
_FALLBACK = next(entry.name for entry in BACKENDS if entry.fallback)


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
    """An explicitly requested backend cannot run here, on the given device, or on these inputs."""


#: name -> (module or None, status), filled on first use of each backend.
_LOADED: Dict[str, Tuple[object, BackendStatus]] = {}
#: The fallbacks ``auto`` has already warned about: each is said once per process.
_WARNED: set = set()


def _load(name: str):
    """The backend's module and its status; never raises."""
    if name not in _LOADED:
        try:
            module = importlib.import_module(_ENTRIES[name].module)
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
    return {name: _load(name)[1] for name in NAMES}


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _auto_order(device_type: str) -> Tuple[str, ...]:
    """The backends ``auto`` considers for ``device_type`` tensors, fastest first, fallback last."""
    compiled = [e.name for e in BACKENDS if not e.fallback and device_type in e.auto_devices]
    return tuple(compiled) + (_FALLBACK,)


@torch.compiler.assume_constant_result
def _candidates(backend: str, device_type: str) -> Tuple[str, ...]:
    """The loaded backends that may run for ``backend`` on ``device_type`` tensors, in the order to
    try them; raises for an explicit backend that cannot run there.

    A constant for ``torch.compile``: it runs once, at trace time, so compiled code neither traces
    the imports nor breaks its graph here.
    """
    device = torch.device(device_type)
    if backend != "auto":
        module, status = _load(backend)
        if not status:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {status.reason}")
        if not module.supports(device):
            raise BackendUnavailableError(f"backend={backend!r} does not run on {device_type} tensors")
        return (backend,)
    usable = []
    for name in _auto_order(device_type):
        module, status = _load(name)
        if status and module.supports(device):
            usable.append(name)
        elif name != _FALLBACK:
            reason = status.reason if not status else f"it does not run on {device_type} tensors here"
            _warn_once(("missing", name, device_type),
                       f"salign_kernels: backend='auto' on {device_type} tensors cannot use {name!r}: "
                       f"{reason}. The next backend runs instead (the last, 'reference', is the plain "
                       "PyTorch formulation: slow, O(N^2) memory for dense matching).")
    return tuple(usable)


def select(backend: str, feat_a: torch.Tensor, matching: Matching):
    """The backend module that will run ``matching`` for ``backend`` on ``feat_a``'s device.

    ``auto`` takes the first backend of its order that is available, runs on the device and can
    run this problem (its ``unsupported`` check), warning once when it has to pass one over.

    Raises:
        ValueError: ``backend`` is not a known name.
        BackendUnavailableError: ``backend`` was named explicitly and cannot run here, on this
            device, or this problem.
    """
    check_choice(backend, "backend", BACKEND_NAMES)
    names = _candidates(backend, feat_a.device.type)
    for name in names:
        module = _LOADED[name][0]
        reason = module.unsupported(feat_a, matching)
        if reason is None:
            return module
        if backend != "auto":
            raise BackendUnavailableError(f"backend={backend!r} cannot run this problem: {reason}")
        _warn_once(("unsupported", name, reason),
                   f"salign_kernels: backend='auto' passes over {name!r} for this problem: {reason}")
    return _LOADED[_FALLBACK][0]  # unreachable while the fallback runs everything; kept for safety


def match_directions(impl, feat_a: torch.Tensor, feat_b: torch.Tensor, matching: Matching,
                     symmetric: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The matches a -> b (and b -> a when ``symmetric``), from one fused pass when the backend can."""
    if not symmetric:
        return [impl.match(feat_a, feat_b, matching)]
    if impl.fuses_symmetric(feat_a, matching):
        return impl.match_symmetric(feat_a, feat_b, matching)
    return [impl.match(feat_a, feat_b, matching), impl.match(feat_b, feat_a, matching.swapped())]


def alignment_loss(impl, feat_a: torch.Tensor, feat_b: torch.Tensor, matching: Matching, symmetric: bool,
                   reduction: str) -> torch.Tensor:
    """The LA/WLA loss: the backend's fused op where it has one, else :func:`composed_alignment_loss`."""
    fused = getattr(impl, "fused_alignment_loss", None)
    if fused is not None and reduction != "none":
        return fused(feat_a, feat_b, matching, symmetric, reduction)
    return composed_alignment_loss(impl, feat_a, feat_b, matching, symmetric, reduction)


def composed_alignment_loss(impl, feat_a: torch.Tensor, feat_b: torch.Tensor, matching: Matching,
                            symmetric: bool, reduction: str) -> torch.Tensor:
    """The LA/WLA loss from the backend's matches, reduced in PyTorch (:mod:`._reduction`)."""
    return reduce_matches(match_directions(impl, feat_a, feat_b, matching, symmetric), reduction)


def resolve_backend(backend: str = "auto", device: Union[torch.device, str] = "cpu") -> str:
    """The name of the backend that ``backend`` selects for tensors on ``device`` (before any
    capability check on actual inputs).

    Example:
        >>> salign_kernels.resolve_backend("auto", "cpu")
        'cpp'
    """
    check_choice(backend, "backend", BACKEND_NAMES)
    return _candidates(backend, torch.device(device).type)[0]

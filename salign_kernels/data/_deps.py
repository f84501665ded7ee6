"""Optional dependencies of :mod:`salign_kernels.data`, imported only when a function needs them.

``import salign_kernels`` and ``import salign_kernels.data`` work without them; the first call that
reads a NIfTI file raises an ``ImportError`` that says what to install.
"""

from __future__ import annotations

import importlib

_INSTALL_HINT = 'pip install "salign-kernels[data]"  (or: pip install {package})'


def require(package: str):
    """The imported module ``package``, or an ``ImportError`` naming the install command."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"salign_kernels.data needs the optional package {package!r}, which is not installed: "
            + _INSTALL_HINT.format(package=package)
        ) from exc

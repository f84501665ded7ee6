"""Loading the C++ extension: the prebuilt ``salign_kernels._C``, else a build at first use.

``pip install --no-build-isolation .`` (and the Makefile) compile ``salign_kernels._C`` ahead of
time. ``pip install .`` builds in an isolated environment without torch, so its wheel carries only
the C++ sources; then, and whenever the prebuilt extension does not load (built for another torch,
or a source tree that was never built), the sources are compiled here against the running torch
with ``torch.utils.cpp_extension.load`` (ninja), for the one CPU variant this machine runs, and
cached: the first use of the cpp backend pays a few minutes once, later processes load the cached
library in milliseconds.

The cache is one directory per build: under ``$TORCH_EXTENSIONS_DIR`` if set, else
``$XDG_CACHE_HOME/salign_kernels`` (``~/.cache/salign_kernels``), named after the torch and Python
versions, the CPU variant and a digest of the sources and flags, so a new torch, another machine's
capability (``ATEN_CPU_CAPABILITY``) or edited sources get their own build and never a stale one.
Concurrent first uses (DDP workers) build once: ``cpp_extension`` locks the directory.

Nothing here raises: a failure (no compiler, no ninja, a compile error, an unwritable cache) comes
back as the reason in :class:`Extension`, which the cpp backend reports through its status, so
``backend="auto"`` falls back to the reference with its warning. ``SALIGN_KERNELS_JIT=0`` switches
the build at first use off (a prebuilt extension still loads).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _build

#: The name of the library the build at first use produces (``<name>.so`` in its cache directory).
JIT_NAME = "salign_kernels_cpu"


@dataclass(frozen=True)
class Extension:
    """Where the kernels came from: ``origin`` is ``"prebuilt"`` (``salign_kernels._C``),
    ``"jit"`` (compiled at first use, ``path`` in the cache) or None (not loaded: ``reason``)."""

    origin: Optional[str]
    path: Optional[str] = None
    reason: str = ""


def jit_enabled() -> bool:
    return os.environ.get("SALIGN_KERNELS_JIT", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def jit_variant() -> str:
    """The CPU variant to build: torch's capability when this architecture has a variant of that
    name and the CPU executes it, else the next lower one, else ``default`` (the choice the
    dispatcher in match_cpu.cpp makes among the variants of a full build)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    variants = list(_build.cpu_variants())
    if capability not in variants:
        return "default"
    flags = _cpu_flags()
    for variant in reversed(variants[: variants.index(capability) + 1]):  # capability, then lower
        needed = _build.CPUINFO_FLAGS.get(variant, ())
        if flags is None or all(flag in flags for flag in needed):
            return variant
    return "default"


def jit_flags(variant: str):
    """Compiler and linker flags of the single-variant build (probes the compiler for OpenMP).

    ``cpp_extension.load`` gives every source the same flags, so the variant's instruction-set
    flags reach the dispatcher and registration too. That is safe here and only here: the build
    is for the machine that runs it, whose capability includes those instructions, and with one
    variant no inline function can be taken from a unit compiled for a wider instruction set.
    """
    openmp = _build.openmp_flags(torch.backends.openmp.is_available())
    cflags = _build.BASE_FLAGS + openmp + _build.cpu_variants()[variant] + _build.have_flags([variant])
    return cflags, openmp


def cache_root() -> str:
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "salign_kernels")


def build_directory(variant: str, sources) -> str:
    """The cache directory of this build: torch, Python, variant, and a digest of what decides the
    compiled code (sources, flags, compiler, whether torch uses OpenMP).

    The digest names the inputs of the flags rather than the flags themselves so that finding a
    cached build costs no compiler probe and works where no compiler is installed.
    """
    digest = hashlib.sha256()
    for path in sorted(sources) + _build.headers():
        digest.update(os.path.relpath(path, _build.CSRC).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    decisive = [*_build.BASE_FLAGS, *_build.cpu_variants()[variant], f"cxx={_build.cxx()}",
                f"openmp={torch.backends.openmp.is_available()}"]
    digest.update("\0".join(decisive).encode())
    torch_version = torch.__version__.replace("+", "_")
    python = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    name = f"torch{torch_version}-{python}-{variant}-{digest.hexdigest()[:12]}"
    return os.path.join(cache_root(), name)


def _library_path(directory: str) -> str:
    return os.path.join(directory, JIT_NAME + (".pyd" if sys.platform == "win32" else ".so"))


def _ninja_on_path():
    """A PATH on which ``ninja`` runs, or None. ``cpp_extension`` calls plain ``ninja``, which is
    not on PATH when a virtualenv's python runs without the environment activated; the PyPI
    ``ninja`` package says where its binary is."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=path):
        return path
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if shutil.which("ninja", path=directory):
            return os.pathsep.join([directory, path]) if path else directory
    return None


def _summary(error: BaseException) -> str:
    """The line of a failed build that says what failed: the compiler's first error, else the
    step ninja reports as failed, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building extension" not in line
              and not line.startswith("[")]
    failed = [line for line in lines if line.startswith("FAILED:")]
    return ((errors or failed or lines or [type(error).__name__])[0])[:300]


def compile_at_first_use(log=None) -> Extension:
    """Loads the kernels for this torch and CPU from the cache, compiling them first if needed.

    ``log`` receives the one line said before a build that has to compile (default: stderr).
    """
    if not os.path.isdir(_build.CSRC):
        return Extension(None, reason=f"the package has no C++ sources to compile ({_build.CSRC} is missing)")
    variant = jit_variant()
    sources = _build.sources(_build.CSRC, [variant])
    directory = build_directory(variant, sources)
    library = _library_path(directory)
    if os.path.exists(library):
        # The directory's name pins sources, flags, torch, Python and variant, so a library there
        # is the one this build would produce: load it without asking ninja, whose build file names
        # the absolute source paths of whichever copy built it (another checkout, a temporary copy)
        # and would recompile everything for a new copy of the same sources.
        try:
            torch.ops.load_library(library)
        except OSError:
            pass  # interrupted while linking, or being linked by another process: build it below
        else:
            return Extension("jit", path=library)

    compiler = _build.cxx()
    if compiler is None or shutil.which(compiler.split()[0]) is None:  # CXX may carry a wrapper: "ccache g++"
        return Extension(None, reason=f"compiling it needs a C++ compiler, and {compiler or 'c++'} was not found "
                                      "(install one, or set CXX)")
    ninja_path = _ninja_on_path()
    if ninja_path is None:
        return Extension(None, reason="compiling it needs ninja, which was not found (pip install ninja)")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return Extension(None, reason=f"its build cache cannot be written ({exc}); set TORCH_EXTENSIONS_DIR")
    print(f"salign_kernels: compiling the C++ kernels for torch {torch.__version__} ({variant.upper()}) "
          f"into {directory}; this takes a few minutes, once", file=log or sys.stderr, flush=True)
    cflags, ldflags = jit_flags(variant)
    from torch.utils import cpp_extension

    saved_path = os.environ.get("PATH")
    os.environ["PATH"] = ninja_path  # for cpp_extension's `ninja` calls only; restored below
    try:
        cpp_extension.load(
            JIT_NAME, sources, extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[_build.CSRC],
            build_directory=directory, is_python_module=False, verbose=False,
        )
    except Exception as exc:  # a compile error, a library that does not load: reported, never raised
        log_path = os.path.join(directory, "build_error.log")
        try:
            with open(log_path, "w") as f:
                f.write(str(exc))
        except OSError:
            log_path = None
        where = f"; the full output is in {log_path}" if log_path else ""
        return Extension(None, reason=f"compiling it at first use with {compiler} failed: {_summary(exc)}{where}")
    finally:
        if saved_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved_path
    return Extension("jit", path=library)


def _prebuilt():
    """``(path, None)`` after loading this package's own prebuilt ``_C``, else ``(None, why not)``.

    The library must lie in this copy's package directory: with another copy installed in
    editable mode, the import system finds that copy's ``_C`` for this package too (setuptools'
    editable finder answers for the package's submodules wherever the package was imported
    from), and kernels built from other sources than the Python that drives them must not load.
    """
    package = __name__.rsplit(".", 2)[0]
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        spec = importlib.util.find_spec(f"{package}._C")
    except (ImportError, ValueError) as exc:
        return None, f"is not built ({exc})"
    if spec is None or not spec.origin:
        return None, f"is not built (none in {package_dir})"
    if os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(package_dir):
        return None, f"is not built in {package_dir} (the one found, {spec.origin}, belongs to another copy)"
    try:
        module = importlib.import_module(f"{package}._C")
    except ImportError as exc:  # most likely built for another torch
        return None, f"does not load ({exc})"
    return getattr(module, "__file__", spec.origin), None


def load() -> Extension:
    """The kernels' extension: the prebuilt one when it loads, else the build at first use."""
    path, why_not = _prebuilt()
    if why_not is None:
        return Extension("prebuilt", path=path)
    not_built = f"the C++ extension salign_kernels._C {why_not}"
    if not jit_enabled():
        return Extension(None, reason=f"{not_built}, and compiling it at first use is switched off "
                                      "(SALIGN_KERNELS_JIT=0); install with `pip install --no-build-isolation .` "
                                      "after torch, or unset SALIGN_KERNELS_JIT")
    built = compile_at_first_use()
    if built.origin is None:
        return Extension(None, reason=f"{not_built}; {built.reason}")
    return built

"""How the C++ extension is compiled: the one description that both builds read.

``setup.py`` compiles every CPU variant ahead of time when torch is importable at build time
(``pip install --no-build-isolation .``); :mod:`salign_kernels.ops._extension` compiles, at first
use, the one variant the running machine uses when no prebuilt extension loads. Both take the
sources, the variant table and the flags from here, so the two builds cannot drift apart.

This module imports only the standard library: ``setup.py`` loads it by file path, in a build
environment that may have no torch and before the package itself is importable.

Sources follow one rule: every ``csrc/**/*.cpp`` of the package. A file named
``<stem>_<variant>.cpp`` for a CPU capability PyTorch ships kernels for (``default``, ``avx2``,
``avx512``) holds the kernels of that capability and is compiled with its instruction-set flags
(skipped on a machine architecture without it); every variant that is compiled is announced to
the rest of the sources with ``-DSALIGN_HAVE_<VARIANT>``, which the kernel dispatcher
(``csrc/cpu/match_cpu.cpp``) reads. The flags say which instructions a variant may use; they do
not probe the build machine.
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

#: The package's C++ sources, shipped inside the package so that a wheel built without torch can
#: still compile them at first use.
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# Variant -> compiler flags. DEFAULT runs anywhere; the x86 variants mirror PyTorch's own.
_DEFAULT = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
_X86 = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}
#: The /proc/cpuinfo flags a CPU needs to execute each x86 variant (the instructions its flags
#: allow): the build at first use steps down from torch's capability to a variant the CPU runs,
#: since torch reports whatever ATEN_CPU_CAPABILITY asks for.
CPUINFO_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
}
#: Every variant name a source file may carry, on any architecture.
ALL_VARIANTS = tuple(_DEFAULT) + tuple(_X86)


def cpu_variants(machine: Optional[str] = None) -> Dict[str, List[str]]:
    """The variants that can be built for ``machine`` (default: this one), with their flags."""
    machine = (machine or platform.machine()).lower()
    variants = dict(_DEFAULT)
    if machine in ("x86_64", "amd64"):
        variants.update(_X86)
    return variants


#: Flags of every source beyond the variant's. setuptools compiles the ahead-of-time build with
#: Python's own CFLAGS (``-DNDEBUG -fwrapv -O3`` among them) and ``cpp_extension.load`` with none,
#: so the first-use build names them to produce the same code.
BASE_FLAGS = ["-O3", "-DNDEBUG", "-fwrapv"]


def variant_of(source: str) -> Optional[str]:
    """The CPU variant a source file is built for (its name's last ``_<variant>``), or None."""
    stem = os.path.splitext(os.path.basename(source))[0]
    suffix = stem.rsplit("_", 1)[-1] if "_" in stem else None
    return suffix if suffix in ALL_VARIANTS else None


def have_flags(variants) -> List[str]:
    """The macros that tell the dispatcher which variants this build contains."""
    return [f"-DSALIGN_HAVE_{variant.upper()}" for variant in variants]


def sources(root: str = CSRC, variants=None) -> List[str]:
    """The ``.cpp`` files of a build containing ``variants`` (default: every one this machine
    can build), sorted; paths start with ``root`` as given."""
    variants = cpu_variants() if variants is None else variants
    found = sorted(glob.glob(os.path.join(root, "**", "*.cpp"), recursive=True))
    return [s for s in found if variant_of(s) is None or variant_of(s) in variants]


def headers(root: str = CSRC) -> List[str]:
    return sorted(glob.glob(os.path.join(root, "**", "*.h"), recursive=True))


def cxx() -> Optional[str]:
    """The C++ compiler both builds use: ``$CXX``, else ``c++`` (as ``torch.utils.cpp_extension``),
    else ``g++``; None when none is found."""
    compiler = os.environ.get("CXX")
    if compiler:
        return compiler
    return shutil.which("c++") or shutil.which("g++")


def compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler builds and links an OpenMP program with ``flag``."""
    compiler = cxx()
    if compiler is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([*shlex.split(compiler), flag, source, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True)
        except OSError:  # $CXX names something that cannot be run
            return False
    return result.returncode == 0


def openmp_flags(torch_uses_openmp: bool) -> List[str]:
    """``-fopenmp`` where torch parallelises with OpenMP and the compiler supports it.

    ``at::parallel_for`` runs on the thread pool torch was built with; without the flag (a torch
    without OpenMP, or a compiler that lacks it) torch's own pool runs the kernels.
    """
    if not torch_uses_openmp:
        return []
    return ["-fopenmp"] if compiler_accepts("-fopenmp") else []

"""Build script: the Python package plus the C++ extension ``salign_kernels._C`` compiled from csrc/.

torch is needed at build time (``torch.utils.cpp_extension``), so install with
``pip install --no-build-isolation .`` after torch. Without C++ sources the package is pure Python.

Sources are found by one rule: every ``csrc/**/*.cpp``. A file named ``<stem>_<variant>.cpp`` for a
CPU capability PyTorch ships kernels for (``default``, ``avx2``, ``avx512``) is compiled with that
capability's instruction-set flags (and skipped on a machine architecture without it); at run time
the extension uses the variant matching ``torch.backends.cpu.get_cpu_capability()``. The flags say
which instructions a variant may use; they do not probe the build machine.

OpenMP: ``at::parallel_for`` runs on the thread pool torch was built with. The kernels are compiled
with ``-fopenmp`` when torch uses OpenMP and the compiler accepts the flag, else without it (torch's
own pool then runs them).
"""

import glob
import os
import platform
import shutil
import subprocess
import tempfile

from setuptools import setup

# File suffix -> compiler flags. DEFAULT runs anywhere; the x86 variants mirror PyTorch's own.
CPU_VARIANTS = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
X86_VARIANTS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}
ALL_VARIANTS = ("default", *X86_VARIANTS)
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_VARIANTS.update(X86_VARIANTS)


def variant_of(source):
    """The CPU variant a source file is built for (its name's last ``_<variant>``), or None."""
    stem = os.path.splitext(os.path.basename(source))[0]
    suffix = stem.rsplit("_", 1)[-1] if "_" in stem else None
    return suffix if suffix in ALL_VARIANTS else None


def compiler_accepts(flag):
    """Whether the C++ compiler builds and links a program with ``flag``."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        result = subprocess.run([compiler, flag, source, "-o", os.path.join(tmp, "probe")], capture_output=True)
    return result.returncode == 0


def openmp_flags():
    """``-fopenmp`` where torch parallelises with OpenMP and the compiler supports it."""
    import torch

    if not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"] if compiler_accepts("-fopenmp") else []


def cpp_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    sources = [s for s in sources if variant_of(s) is None or variant_of(s) in CPU_VARIANTS]
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildWithCpuVariants(BuildExtension):
        """Compiles each CPU variant with its own flags, then the extension as usual."""

        def build_extension(self, ext):
            variant_objects = []
            for variant, flags in CPU_VARIANTS.items():
                variant_sources = [s for s in ext.sources if variant_of(s) == variant]
                if not variant_sources:
                    continue
                variant_objects += self.compiler.compile(
                    variant_sources,
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": list(ext.extra_compile_args["cxx"]) + flags},
                    depends=ext.depends,
                )
            ext.sources = [s for s in ext.sources if variant_of(s) is None]
            ext.extra_objects = list(ext.extra_objects or []) + variant_objects
            super().build_extension(ext)

    openmp = openmp_flags()
    defines = ["-DSALIGN_HAVE_X86_VARIANTS"] if "avx2" in CPU_VARIANTS else []
    extension = CppExtension(
        "salign_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"] + openmp + defines},
        extra_link_args=openmp,
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    )
    return [extension], {"build_ext": BuildWithCpuVariants.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script: the Python package plus the C++ extension ``salign_kernels._C`` compiled from csrc/.

torch is needed at build time (``torch.utils.cpp_extension``), so install with
``pip install --no-build-isolation .`` after torch. Without C++ sources the package is pure Python.

The matching kernels (``csrc/cpu/match_<variant>.cpp``) are compiled once per CPU capability that
PyTorch itself ships kernels for, each with its own instruction-set flags; at run time the extension
uses the variant matching ``torch.backends.cpu.get_cpu_capability()``. The flags say which
instructions a variant may use; they do not probe the build machine.
"""

import glob
import os
import platform

from setuptools import setup

OPTIMIZE = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for runs on the OpenMP threads torch uses

# File suffix -> compiler flags. DEFAULT runs anywhere; the x86 variants mirror PyTorch's own.
CPU_VARIANTS = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_VARIANTS["avx2"] = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    CPU_VARIANTS["avx512"] = [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ]


def variant_of(source):
    stem = os.path.splitext(os.path.basename(source))[0]
    suffix = stem.rsplit("_", 1)[-1]
    return suffix if stem.startswith("match_") and suffix in ("default", "avx2", "avx512") else None


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

    defines = ["-DSALIGN_HAVE_X86_VARIANTS"] if "avx2" in CPU_VARIANTS else []
    extension = CppExtension(
        "salign_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": OPTIMIZE + defines},
        extra_link_args=["-fopenmp"],
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    )
    return [extension], {"build_ext": BuildWithCpuVariants.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

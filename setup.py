"""Build script: the Python package, with the C++ extension ``salign_kernels._C`` compiled ahead of
time when torch is importable here.

Two ways to install, one package:

- ``pip install .`` builds in an isolated environment, which has no torch (pyproject's build
  requirements leave it out on purpose: listing it made pip fetch a second, multi-GB torch to
  compile against, whose binary interface need not match the user's). setup.py then builds a
  pure-Python wheel that carries the C++ sources (``salign_kernels/csrc``) as package data, and
  the package compiles them against the installed torch at first use
  (:mod:`salign_kernels.ops._extension`).
- ``pip install --no-build-isolation .`` after torch (what the Makefile does) compiles the
  extension here, against that torch, for every CPU variant this machine architecture has.

The sources, the variant table and the flags come from ``salign_kernels/_build.py``, which the
first-use build reads too.
"""

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_description():
    """``salign_kernels/_build.py``, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_salign_build", os.path.join(HERE, "salign_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpp_extensions(build):
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("salign_kernels: torch is not importable in this build environment, so the C++ extension is "
              "not compiled now; the installed package compiles it against the installed torch at first use "
              "(to compile it here instead: pip install --no-build-isolation .)", file=sys.stderr)
        return [], {}

    variants = build.cpu_variants()
    # Relative paths: setuptools places the objects of relative sources under build_temp.
    root = os.path.relpath(build.CSRC, HERE)
    sources = build.sources(root, variants)
    if not sources:
        return [], {}

    class BuildWithCpuVariants(BuildExtension):
        """Compiles each CPU variant with its own flags, then the extension as usual."""

        def build_extension(self, ext):
            variant_objects = []
            for variant, flags in variants.items():
                variant_sources = [s for s in ext.sources if build.variant_of(s) == variant]
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
            ext.sources = [s for s in ext.sources if build.variant_of(s) is None]
            ext.extra_objects = list(ext.extra_objects or []) + variant_objects
            super().build_extension(ext)

    openmp = build.openmp_flags(torch.backends.openmp.is_available())
    built = sorted({build.variant_of(s) for s in sources} - {None})
    extension = CppExtension(
        "salign_kernels._C",
        sources,
        include_dirs=[build.CSRC],
        extra_compile_args={"cxx": build.BASE_FLAGS + openmp + build.have_flags(built)},
        extra_link_args=openmp,
        depends=build.headers(root),
    )
    return [extension], {"build_ext": BuildWithCpuVariants.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions(_build_description())
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script: the Python package plus the C++ extension ``salign_kernels._C`` compiled from csrc/.

torch is needed at build time (``torch.utils.cpp_extension``), so install with
``pip install --no-build-isolation .`` after torch. Without C++ sources the package is pure Python.
"""

import glob
import os

from setuptools import setup


def cpp_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        "salign_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

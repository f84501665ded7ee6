"""Installing and loading the package: a build without torch gives a pure-Python wheel with the C++
sources, the sources compile at first use against the running torch, and whatever the cpp backend
ends up with (prebuilt, compiled at first use, nothing) is said.

The tests that load the package from a copy of its directory stand for a source tree without a
built extension on ``sys.path`` (the repository root after a non-editable install, or an install
from a wheel built without torch): the copy's ``salign_kernels`` shadows any installed one.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from salign_kernels import _build

ROOT = Path(__file__).resolve().parent.parent
#: The first-use build of the JIT tests: kept between runs (the digest in each build's directory
#: name keeps it honest), so only the first run after a change to the C++ sources compiles.
JIT_CACHE = Path(os.environ.get("SALIGN_TEST_JIT_CACHE") or ROOT / "build" / "jit-cache")
COMPILING = "salign_kernels: compiling the C++ kernels"


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0).lower().replace("_", "-")


def test_build_requirements_leave_torch_out():
    """With torch among them, `pip install .` installs a second torch (a multi-GB CUDA build) into the
    isolated build environment and compiles the extension against it, not against the user's."""
    names = [_name(r) for r in _pyproject()["build-system"]["requires"]]
    assert "torch" not in names and "setuptools" in names
    # ... and the build at first use has what it needs at run time.
    assert "ninja" in [_name(r) for r in _pyproject()["project"]["dependencies"]]


def test_package_data_ships_every_cpp_source():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["salign_kernels"]
    files = [p.relative_to(ROOT / "salign_kernels").as_posix() for p in (ROOT / "salign_kernels" / "csrc").rglob("*")
             if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files


def test_single_variant_sources():
    """The build at first use compiles the shared sources and one variant's kernels; the
    ahead-of-time build every variant of the machine's architecture."""
    for variant in _build.cpu_variants():
        names = [os.path.basename(s) for s in _build.sources(variants=[variant])]
        assert [n for n in names if n.startswith("kernels_")] == [f"kernels_{variant}.cpp"]
        assert "ops.cpp" in names and "match_cpu.cpp" in names
    every = {os.path.basename(s) for s in _build.sources(variants=_build.cpu_variants("x86_64"))}
    assert {"kernels_default.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp"} <= every
    assert "avx2" not in _build.cpu_variants("aarch64")


def _copy_package(destination: Path) -> Path:
    """The package's directory without any compiled library: a source tree never built."""
    shutil.copytree(ROOT / "salign_kernels", destination / "salign_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return destination


def test_wheel_built_without_torch_is_pure_python_with_the_sources(tmp_path):
    """What `pip install .` gets: its isolated build environment has no torch."""
    tree = _copy_package(tmp_path / "tree")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    script = ("import sys; sys.modules['torch'] = None\n"  # the isolated build environment: no torch
              "from setuptools import build_meta\n"
              "print(build_meta.build_wheel(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dist")], cwd=tree, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = done.stdout.strip().splitlines()[-1]
    assert wheel.endswith("-py3-none-any.whl"), wheel  # no compiled part, so no platform tag
    assert "compiles it against the installed torch at first use" in done.stderr
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    shipped = {n for n in names if n.startswith("salign_kernels/csrc/")}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "salign_kernels" / "csrc").rglob("*") if p.is_file()}
    assert shipped == wanted
    assert "salign_kernels/_build.py" in names


def _run(tree: Path, args, env_extra, timeout=900):
    """``python *args`` with ``tree`` first on ``sys.path``, as a user in that directory would."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SALIGN_KERNELS_JIT")}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout)


CHECK = ["-m", "salign_kernels.check"]
FALLBACK_SCRIPT = """
import torch, salign_kernels as sk
for _ in range(3):
    loss = sk.local_alignment_loss(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5))
print("auto ->", sk.resolve_backend("auto", "cpu"))
print("reason:", sk.backends()["cpp"].reason)
"""


def test_a_source_tree_whose_build_fails_falls_back_saying_why(tmp_path):
    """The source tree without a built extension shadows the install: it tries to compile (and says
    so, once), cannot (no working compiler), and auto warns once, with the reason, that the
    reference runs; the self-check names the directory it imported and compares nothing."""
    tree = _copy_package(tmp_path / "tree")
    env = {"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    done = _run(tree, ["-c", FALLBACK_SCRIPT], env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(COMPILING) == 1, done.stderr
    assert "auto -> reference" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "backend='auto' on cpu tensors cannot use 'cpp'" in line]
    assert len(warnings) == 1, done.stderr
    assert "salign_kernels._C is not built" in warnings[0]
    assert "compiling it at first use with /bin/false failed" in warnings[0]
    log = re.search(r"the full output is in (\S+build_error\.log)", warnings[0])
    assert log and Path(log.group(1)).is_file() and str(tmp_path / "cache") in log.group(1)

    check = _run(tree, CHECK, env, timeout=300)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"from {tree / 'salign_kernels'}" in check.stdout
    assert "cpp        unavailable: the C++ extension salign_kernels._C is not built" in check.stdout
    assert "auto on cpu -> reference" in check.stdout and "nothing was compared" in check.stdout


def test_a_source_tree_without_a_compiler_says_so(tmp_path):
    tree = _copy_package(tmp_path / "tree")
    done = _run(tree, ["-c", FALLBACK_SCRIPT], {"CXX": str(tmp_path / "no-such-compiler"),
                                        "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert COMPILING not in done.stderr  # nothing to compile with: nothing announced
    assert "compiling it needs a C++ compiler" in done.stdout and "auto -> reference" in done.stdout


@pytest.fixture(scope="module")
def jit_tree(tmp_path_factory):
    return _copy_package(tmp_path_factory.mktemp("jit"))


@pytest.mark.jit
def test_the_sources_compile_at_first_use_and_pass_the_check(jit_tree):
    """The real build at first use (minutes on a cold cache, once): the package without a
    prebuilt extension compiles its kernels against this torch, and they agree with the reference."""
    env = {"TORCH_EXTENSIONS_DIR": str(JIT_CACHE)}
    first = _run(jit_tree, CHECK, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"from {jit_tree / 'salign_kernels'}" in first.stdout
    assert f"cpp extension: compiled at first use, cached in {JIT_CACHE}" in first.stdout
    assert "compared with it: cpp on cpu" in first.stdout
    assert first.stderr.count(COMPILING) <= 1  # said when it compiles; a warm cache compiles nothing

    again = _run(jit_tree, CHECK, env)  # a warm cache: loaded, not compiled
    assert again.returncode == 0, again.stdout + again.stderr
    assert COMPILING not in again.stderr and "compiled at first use, cached in" in again.stdout


@pytest.mark.skipif("avx512" not in _build.cpu_variants(), reason="the x86 variants")
def test_the_build_at_first_use_steps_down_to_a_variant_the_cpu_runs(monkeypatch):
    """torch reports the capability ATEN_CPU_CAPABILITY asks for even where the CPU lacks it;
    building that variant would stop the process with SIGILL at the first kernel."""
    import torch

    from salign_kernels.ops import _extension

    def case(capability, flags):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(_extension, "_cpu_flags", lambda: flags)
        return _extension.jit_variant()

    avx2_cpu = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert case("AVX512", avx2_cpu) == "avx2"
    assert case("AVX512", avx2_cpu | set(_build.CPUINFO_FLAGS["avx512"])) == "avx512"
    assert case("AVX2", {"sse4_2"}) == "default"
    assert case("AVX512", None) == "avx512"  # no /proc/cpuinfo: torch's word
    assert case("SVE256", None) == "default"



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

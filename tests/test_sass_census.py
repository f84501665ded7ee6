"""The SASS census's parsers on small hand-written listings: no compiler, no GPU."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_census as sc  # noqa: E402

HEADER = """
\tcode for sm_90
\t\tFunction : _k
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
"""


def listing(*lines: str) -> str:
    """A cuobjdump -sass listing: one instruction per 16 bytes, each with its encoding comment."""
    body = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;   /* 0x000fe20000000f00 */\n"
                     f"                                                  /* 0x000fe20000000f00 */"
                     for i, line in enumerate(lines))
    return HEADER + body + "\n"


RES = """Resource usage:
 Common:
  GLOBAL:0
 Function _k:
  REG:168 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# A pipelined wgmma loop at 0x20..0x70, then a fenced atomic, EXIT and the trap branch to itself.
WGMMA = listing(
    "LDC R1, c[0x0][0x28]",                                   # 0x00
    "MOV R2, RZ",                                             # 0x10
    "DEPBAR.LE SB0, 0x1",                                     # 0x20  loop
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT",     # 0x30
    "FMNMX.NAN R114, R78, R79, !PT",                          # 0x40
    "LDGSTS.E.BYPASS.128 [R47], desc[UR16][R28.64], P2",      # 0x50
    "ISETP.GE.AND P2, PT, R2, R3, PT",                        # 0x60
    "@!P2 BRA 0x20",                                          # 0x70  back edge
    "STL [R1], R24",                                          # 0x80
    "MEMBAR.ALL.GPU",                                         # 0x90
    "ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, [R4.64], R5",  # 0xa0
    "EXIT",                                                   # 0xb0
    "BRA 0xc0",                                               # 0xc0  trap: not a loop
)


def test_parse_instructions_predicates_and_modifiers():
    ins = sc.parse_sass(WGMMA)
    assert len(ins) == 13 and ins[0].address == 0 and ins[-1].address == 0xC0
    branch = ins[7]
    assert (branch.predicate, branch.opcode, branch.modifiers, branch.operands) == ("@!P2", "BRA", "", "0x20")
    assert ins[5].form == "LDGSTS.E.BYPASS.128" and ins[3].opcode == "HGMMA"


def test_resource_usage():
    assert sc.parse_resource_usage(RES) == dict(regs=168, stack=24, static_shared=0, local=0)
    assert sc.parse_resource_usage("no resources here") == {}


def test_loops_innermost_first_without_self_branches():
    ins = sc.parse_sass(listing("NOP", "NOP", "BRA 0x10", "NOP", "BRA 0x0", "BRA 0x50"))
    assert sc.loops(ins) == [(0x10, 0x20), (0x0, 0x40)]
    assert sc.hot_loop(ins) == (0x0, 0x40)  # no MMA: the largest loop


def test_hot_loop_is_the_first_innermost_mma_loop():
    # A long scan (0x10..0x40) before a short one (0x60..0x80, a rarely taken second walk), and an
    # outer loop around the first: the first innermost loop with MMA is the hot one, not the shortest.
    ins = sc.parse_sass(listing(
        "NOP",                                                  # 0x00
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT",    # 0x10  scan
        "FMNMX.NAN R1, R2, R3, !PT",                            # 0x20
        "FSETP.EQ.AND P0, PT, R1, R2, PT",                      # 0x30
        "BRA 0x10",                                             # 0x40  its back edge
        "BRA 0x0",                                              # 0x50  outer loop
        "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT",    # 0x60  second walk
        "NOP",                                                  # 0x70
        "BRA 0x60",                                             # 0x80
        "EXIT",                                                 # 0x90
    ))
    assert sc.hot_loop(ins) == (0x10, 0x40)


def test_census_of_a_pipelined_wgmma_loop_with_a_fenced_atomic():
    c = sc.census(WGMMA, RES, num_warps=8, shared=131072)
    assert c["mma"] == "wgmma" and c["mma_forms"] == ["HGMMA.64x128x16.F32.BF16"]
    assert c["pipelined"] and c["loop_async_copies"] == 1 and c["loop_async_waits"] == 1
    assert c["loop"] == ["0x20", "0x70"] and c["loop_instrs"] == 6
    assert c["loop_alu"] == 2  # FMNMX, ISETP; not HGMMA, LDGSTS, DEPBAR or BRA
    assert c["regs"] == 168 and c["spill_instrs"] == 1 and sc.spilled(c)
    assert c["fences"] == {"MEMBAR.ALL.GPU": 1} and c["gpu_fences"] == 1
    assert c["atomics"] == {"ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU": 1}
    assert (c["ctas_per_sm"], c["limiter"]) == (1, "regs+smem")


def test_mma_kinds_and_an_unpipelined_loop():
    mma_sync = listing("LDG.E.128 R4, desc[UR4][R2.64]", "HMMA.16816.F32.BF16 R8, R4, R6, R8", "BRA 0x0")
    c = sc.census(mma_sync, "REG:72 STACK:0 SHARED:0 LOCAL:0", num_warps=4, shared=12288)
    assert c["mma"] == "mma.sync" and not c["pipelined"] and not sc.spilled(c)
    assert sc.mma_kind(sc.parse_sass(listing("DMMA.8x8x4 R0, R2, R4, R0"))) == "dmma"
    assert sc.mma_kind(sc.parse_sass(listing("FFMA R0, R1, R2, R0", "EXIT"))) == "none"
    relaxed = sc.census(listing("REDG.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5", "MEMBAR.SC.CTA", "EXIT"),
                        "REG:32 STACK:0 SHARED:0 LOCAL:0", num_warps=4, shared=0)
    assert relaxed["gpu_fences"] == 0 and relaxed["atomics"] == {"REDG.E.ADD.F32.FTZ.RN.STRONG.GPU": 1}
    assert relaxed["loop"] is None and relaxed["loop_instrs"] == 0


def test_occupancy_limits_of_sm90():
    # 198 registers -> 200 per thread after the 256-per-warp rounding: 6400 per warp, 8 warps: 1 CTA.
    assert sc.occupancy(198, 8, 131072) == dict(ctas_per_sm=1, limiter="regs+smem")
    # 80 KiB + the 1 KiB reserved: 2 fit in 228 KiB; 160 registers x 4 warps allow 3.
    assert sc.occupancy(160, 4, 81920) == dict(ctas_per_sm=2, limiter="smem")
    assert sc.occupancy(24, 4, 0) == dict(ctas_per_sm=16, limiter="warps")
    assert sc.occupancy(32, 4, 0) == dict(ctas_per_sm=16, limiter="regs+warps")
    assert sc.occupancy(16, 1, 0) == dict(ctas_per_sm=32, limiter="ctas")


def test_summary_table_rows():
    census = sc.census(WGMMA, RES, num_warps=8, shared=131072)
    rec = dict(kernel="_k", dtype="bf16", config="M128 N128 w8s3", census=census)
    text = sc.table([rec, dict(kernel="_j", dtype="fp32", config="-")])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["kernel", "dtype", "config"] and lines[1].startswith("_j")
    assert "wgmma" in lines[2] and "128" in lines[2] and "1 (24 B)" in lines[2] and "1 (regs+smem)" in lines[2]

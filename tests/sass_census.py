"""Read one compiled Triton kernel for an NVIDIA GPU: what its SASS says it does.

The census answers, from the cubin alone (no GPU), the questions a kernel's speed hinges on:

- which tensor-core instructions it issues (``HGMMA``: Hopper's wgmma; ``HMMA``: mma.sync;
  ``DMMA``: float64), and whether the loop that holds them is software-pipelined (the next tiles'
  operands copied asynchronously, cp.async ``LDGSTS`` or TMA ``UTMALDG``, while this one computes);
- registers, spills (``LDL``/``STL`` to local memory) and shared memory, hence CTAs per SM;
- memory fences (``MEMBAR``; an ``acq_rel`` atomic, ``tl.atomic_add``'s default, brackets every
  atomic with ``MEMBAR.ALL.GPU``) and the forms of the atomics;
- the hot loop's instruction count and how many of them issue on the ALU pipe.

Input is the text of Triton's bundled ``cuobjdump -sass`` and ``-res-usage``; the parsers are plain
functions of that text so they can be tested on small hand-written snippets. The cubin of a Triton
kernel holds one function, so the addresses of one listing are one function's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

#: Per-SM limits of sm_90 (H100/H200), from the CUDA occupancy calculator's tables.
SM90_LIMITS = dict(regs=65536, shared=233472, shared_reserved_per_cta=1024, warps=64, ctas=32,
                   reg_alloc_unit=256)

#: Opcodes that issue on the ALU pipe of an SM sub-partition (16 lanes: a warp instruction holds it
#: two cycles, against one on the 32-lane FMA pipe). Comparisons, selects, min/max, logic, shifts,
#: integer adds and moves: what an argmax epilogue is made of.
ALU_OPS = frozenset({
    "FMNMX", "FMNMX3", "FSETP", "FSET", "FSEL", "FCHK", "SEL", "IMNMX", "VIMNMX", "VIMNMX3", "IABS", "ISETP",
    "ISET", "CSETP", "LOP3", "PLOP3", "P2R", "R2P", "FLO", "POPC", "BMSK", "SGXT", "LEA", "SHF", "PRMT", "IADD3",
    "MOV",
})

#: Tensor-core opcodes, strongest first: the first found names the kernel's MMA kind.
MMA_KINDS = (("HGMMA", "wgmma"), ("HMMA", "mma.sync"), ("DMMA", "dmma"), ("IMMA", "imma"))

#: Asynchronous global-to-shared copies: in the MMA loop they mean the loop is pipelined (the copy
#: lands in a buffer a later iteration reads).
ASYNC_COPIES = frozenset({"LDGSTS", "UTMALDG", "UBLKCP"})
#: Waits on those copies (cp.async groups, mbarriers).
ASYNC_WAITS = frozenset({"DEPBAR", "LDGDEPBAR", "SYNCS"})
ATOMICS = frozenset({"ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDUX"})
SPILLS = frozenset({"LDL", "STL"})


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: address, guard predicate (``@!P0`` or ''), opcode, dotted modifiers
    (``.E.BYPASS.128`` or ''), operand text."""

    address: int
    predicate: str
    opcode: str
    modifiers: str
    operands: str

    @property
    def form(self) -> str:
        return self.opcode + self.modifiers


# /*01f0*/   @!P0 LDGSTS.E.BYPASS.128 [R47], desc[UR16][R28.64], P2 ;
_INSTRUCTION = re.compile(
    r"/\*(?P<addr>[0-9a-fA-F]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_]*)(?P<mods>(?:\.[A-Za-z0-9_]+)*)"
    r"\s*(?P<operands>[^;]*);")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_BRANCH_TARGET = re.compile(r"0x([0-9a-fA-F]+)")


def parse_sass(text: str) -> List[Instruction]:
    """The instructions of a ``cuobjdump -sass`` listing, in address order."""
    return [Instruction(int(m["addr"], 16), (m["pred"] or "").strip(), m["op"], m["mods"], m["operands"].strip())
            for m in _INSTRUCTION.finditer(text)]


def parse_resource_usage(text: str) -> Dict[str, int]:
    """``cuobjdump -res-usage``'s line: registers, stack, static shared and local bytes per thread
    ({} when absent). Triton's shared memory is dynamic: take it from the compile's metadata."""
    m = _RESOURCES.search(text)
    if not m:
        return {}
    return dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))


def loops(instructions: Sequence[Instruction]) -> List[Tuple[int, int]]:
    """Loops as (first, last) address ranges, innermost (smallest) first: every branch back to an
    earlier address closes one; compiled loops have no other backward jumps."""
    found = set()
    for ins in instructions:
        if ins.opcode in ("BRA", "JMP"):
            target = _BRANCH_TARGET.search(ins.operands)
            # a branch to itself is the trap after EXIT, not a loop
            if target and int(target[1], 16) < ins.address:
                found.add((int(target[1], 16), ins.address))
    return sorted(found, key=lambda r: (r[1] - r[0], r[0]))


def within(instructions: Sequence[Instruction], span: Optional[Tuple[int, int]]) -> List[Instruction]:
    return [i for i in instructions if span is None or span[0] <= i.address <= span[1]]


def mma_kind(instructions: Sequence[Instruction]) -> str:
    ops = {i.opcode for i in instructions}
    return next((kind for opcode, kind in MMA_KINDS if opcode in ops), "none")


def hot_loop(instructions: Sequence[Instruction]) -> Optional[Tuple[int, int]]:
    """The loop whose speed is the kernel's: the first, in program order, of the innermost loops
    holding tensor-core instructions (a kernel's main scan comes first; a later one, such as the
    walk that settles a tile's rare rows, runs seldom), else the largest (a CUDA-core kernel's main
    loop; nested loops are inside it); None without loops."""
    spans = loops(instructions)
    mma_ops = {opcode for opcode, _ in MMA_KINDS}
    with_mma = [span for span in spans if any(i.opcode in mma_ops for i in within(instructions, span))]
    innermost = [span for span in with_mma
                 if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in with_mma)]
    if innermost:
        return min(innermost)
    return max(spans, key=lambda r: r[1] - r[0]) if spans else None


def occupancy(regs: int, num_warps: int, shared: int, limits: dict = SM90_LIMITS) -> Dict[str, object]:
    """CTAs per SM and what limits them. Registers are allocated per warp in units of 256;
    every CTA holds 1 KiB of shared memory reserved by the system on top of its own."""
    unit = limits["reg_alloc_unit"]
    regs_per_warp = -(-regs * 32 // unit) * unit
    bounds = {
        "regs": limits["regs"] // (regs_per_warp * num_warps) if regs else limits["ctas"],
        "smem": limits["shared"] // (shared + limits["shared_reserved_per_cta"]),
        "warps": limits["warps"] // num_warps,
        "ctas": limits["ctas"],
    }
    ctas = min(bounds.values())
    limiter = "+".join(k for k, v in bounds.items() if v == ctas)
    return dict(ctas_per_sm=ctas, limiter=limiter)


def census(sass: str, res_usage: str, *, num_warps: int, shared: int, n_spills: Optional[int] = None) -> dict:
    """The census of one kernel from its listing and resource usage (see the module's docstring).

    ``shared``: the compile's shared memory in bytes (Triton's is dynamic, invisible to
    ``-res-usage``); ``n_spills``: the driver's spill count where the compile has one.
    """
    instructions = parse_sass(sass)
    resources = parse_resource_usage(res_usage)
    ops = Counter(i.opcode for i in instructions)
    span = hot_loop(instructions)
    loop = within(instructions, span) if span else []
    loop_ops = Counter(i.opcode for i in loop)
    mma = mma_kind(instructions)
    regs = resources.get("regs", 0)
    fences = Counter(i.form for i in instructions if i.opcode == "MEMBAR")
    return dict(
        mma=mma,
        mma_forms=sorted({i.form for i in instructions if i.opcode in {o for o, _ in MMA_KINDS}}),
        # Pipelined: the MMA loop itself issues asynchronous copies (for the tiles ahead) and waits on them.
        pipelined=mma != "none" and any(loop_ops[o] for o in ASYNC_COPIES),
        loop_async_copies=sum(loop_ops[o] for o in ASYNC_COPIES),
        loop_async_waits=sum(loop_ops[o] for o in ASYNC_WAITS),
        regs=regs,
        stack=resources.get("stack", 0),
        local=resources.get("local", 0),
        spill_instrs=sum(ops[o] for o in SPILLS),
        n_spills=n_spills,
        shared=shared,
        fences=dict(fences),
        gpu_fences=sum(n for form, n in fences.items() if ".GPU" in form or ".SYS" in form),
        atomics=dict(Counter(i.form for i in instructions if i.opcode in ATOMICS)),
        instrs=len(instructions),
        loop=None if span is None else [hex(span[0]), hex(span[1])],
        loop_instrs=len(loop),
        loop_alu=sum(n for o, n in loop_ops.items() if o in ALU_OPS),
        **occupancy(regs, num_warps, shared),
    )


def spilled(c: dict) -> bool:
    """Whether a census shows spills: local-memory traffic, a stack, or the driver's count."""
    return bool(c["spill_instrs"] or c["stack"] or c["local"] or c.get("n_spills"))


def cuobjdump_path() -> str:
    """Triton's bundled cuobjdump (the toolkit it ships with ptxas)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def disassemble(cubin: bytes, cuobjdump: Optional[str] = None) -> Tuple[str, str]:
    """(SASS listing, resource usage) of a cubin."""
    cuobjdump = cuobjdump or cuobjdump_path()
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        sass, res = (subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, check=True).stdout
                     for flag in ("-sass", "-res-usage"))
    finally:
        os.unlink(path)
    return sass, res


def census_of_compiled(compiled) -> dict:
    """The census of a ``triton.compile`` result, from the cubin it holds (nothing is recompiled)."""
    sass, res = disassemble(compiled.asm["cubin"])
    meta = compiled.metadata
    return census(sass, res, num_warps=meta.num_warps, shared=meta.shared, n_spills=getattr(meta, "n_spills", None))


COLUMNS = ("kernel", "dtype", "config", "MMA", "pipe", "regs", "spills", "smem KiB", "fences", "loop", "ALU",
           "CTAs/SM")


def row(record: dict) -> Tuple[str, ...]:
    """One summary row of a compile record (``kernel``, ``dtype``, ``config`` and its ``census``)."""
    c = record.get("census")
    head = (record["kernel"], record.get("dtype", "-"), record.get("config", "-"))
    if not c:
        return head + ("?",) * (len(COLUMNS) - 3)
    spills = c["spill_instrs"] if not c["stack"] else f"{c['spill_instrs']} ({c['stack']} B)"
    return head + (c["mma"], "yes" if c["pipelined"] else "-", str(c["regs"]), str(spills),
                   f"{c['shared'] / 1024:g}", str(c["gpu_fences"]), str(c["loop_instrs"]), str(c["loop_alu"]),
                   f"{c['ctas_per_sm']} ({c['limiter']})")


def table(records: Sequence[dict]) -> str:
    """A fixed-width table, one row per compile, grouped by kernel."""
    rows = [COLUMNS] + sorted((row(r) for r in records), key=lambda r: r[:3])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

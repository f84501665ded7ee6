"""Windowed matching on the GPU: sliding (centred neighbourhood) and partition (same tile), 2D and 3D.

Kernel -> launcher. A program takes a 2-D tile of ``TILE_H x TILE_W`` queries of one depth slice and
keeps their C-vectors resident. Every candidate any of its queries can see lies in a box around the
tile: the ``KD`` depth slices of the window, and ``BOX_H x BOX_W`` rows and columns (the tile plus
the window's reach when sliding, the partitions the tile overlaps otherwise). The program walks the
box ``ROWS x HALO_W`` candidates at a time, each step one ``tl.dot`` of the query tile against those
candidates' rows (tensor cores: most of the box's products are outside any one query's window, but
the tensor cores do them all faster than the CUDA cores would do the useful ones), and a compare on
row and column offsets selects each query's window. Neighbouring tiles share most of their boxes,
so every feature is read from memory about once. A 2D map is a volume of depth 1 with window depth 1.

What a step costs besides its product is its (max, argmax) epilogue, as in the dense scan
(:mod:`.dense`): the scan keeps it lean. Candidates are read at addresses clamped into the map (no
mask on any load without a mask of ``b``), one subtraction and one unsigned compare per axis select
each query's window, and a NaN-keeping row max and one compare-select-min give the step's best. The
rare queries that epilogue cannot answer (NaN similarities, no candidate above ``-inf``, non-finite
queries) are counted per tile, and a second launch of the same kernel, the settle pass, walks only
the tiles that hold any with the exact epilogue of :mod:`._argmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._matching import WINDOW_MODE_CODES
from ._argmax import NO_HIT, block_argmax, fold_best, fold_strict, tile_argmax
from ._loss import store_partial
from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2
from ._tiles import resident_queries, tile_product

# The scan's mark in indices of a query that the settle pass answers (valid indices are >= 0, -1
# is "no match").
NEEDS_EXACT = tl.constexpr(-2)


@triton.jit
def _walk_box(
    a_res, a_rows, row_ok, b_base, sb_ptr, mb_ptr, base, front, top, left, box_top, box_left,
    D, H, W, C, sac, sbp, sbc,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    HAS_MASK_B: tl.constexpr, EXACT: tl.constexpr, Q: tl.constexpr, ROWS: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, EVEN_C: tl.constexpr,
    IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The running ``(best, best_idx, flag)`` of the tile's queries over their windows, the box
    walked ``ROWS x HALO_W`` candidates a step.

    Lean (``EXACT`` False; the scan): ``flag`` (int32) marks the rows that met a NaN; a row whose
    best stays ``-inf`` had no candidate above it; the caller leaves both to the exact walk. Exact:
    every rule of ``torch.max`` (``_argmax.block_argmax``), and ``flag`` is each row's first real
    candidate (``NO_HIT`` if none), the answer of a non-finite query. A query off the map (not in
    ``row_ok``) gets an answer nobody reads.
    """
    HW = H * W
    if IS_F64:
        best = tl.full([Q], float("-inf"), tl.float64)
    else:
        best = tl.full([Q], float("-inf"), tl.float32)
    best_idx = tl.full([Q], -1, tl.int32)
    if EXACT:
        flag = tl.full([Q], NO_HIT, tl.int32)
    else:
        flag = tl.zeros([Q], tl.int32)
    j = tl.arange(0, ROWS * HALO_W)
    j_row = j // HALO_W
    j_col = j % HALO_W
    # One flat loop over the steps (depth, row block, column block): a single long loop that
    # Triton can software-pipeline, the next steps' candidate rows loading under this one's work.
    # The step's position (cd, r0, c0) advances by counters, not divisions.
    plane_steps: tl.constexpr = ((BOX_H + ROWS - 1) // ROWS) * ((BOX_W + HALO_W - 1) // HALO_W)
    cd = tl.maximum(front, 0)  # the window's depths in the map
    r0 = 0
    c0 = 0
    for _ in range(0, (tl.minimum(front + KD, D) - cd) * plane_steps):
        ch = box_top + r0 + j_row  # (J,) the candidates' rows and columns
        cw = box_left + c0 + j_col
        # Each query's window among the box's candidates (Q, J): with the window's sizes known to
        # the compiler, one subtraction and one unsigned compare per axis. A query off the map
        # gets an answer nobody reads.
        dh = ch[None, :] - top[:, None]
        dw = cw[None, :] - left[:, None]
        in_window = (dh >= 0) & (dh < KH) & (dw >= 0) & (dw < KW)
        if EXACT:
            in_box = (r0 + j_row < BOX_H) & (c0 + j_col < BOX_W) & (ch >= 0) & (ch < H) & (cw >= 0) & (cw < W)
            cq = cd * HW + ch * W + cw
            if HAS_MASK_B:
                in_box = in_box & (tl.load(mb_ptr + base + cq, mask=in_box, other=0) != 0)
            cq = tl.where(in_box, cq, 0)  # off-map offsets would give negative keys below
            acc = tile_product(a_res, a_rows, row_ok, b_base + cq.to(tl.int64)[:, None] * sbp, in_box, C,
                               sac, sbc, True, Q, ROWS * HALO_W, BLOCK_C, SINGLE_C, EVEN_C,
                               IS_F64, UPCAST, PRECISION)
            sb = tl.load(sb_ptr + base + cq, mask=in_box, other=0.0)
            ok = in_box[None, :] & in_window
            s = tl.where(ok, acc * sb[None, :], float("-inf"))
            # The lowest q at the step's max (the lowest NaN: NaN wins), merged into the running best.
            top_s, arg, is_nan, first_ok = block_argmax(s, cq[None, :], ok, 1)
            best, best_idx = fold_best(best, best_idx, top_s, arg, is_nan, first_ok)
            flag = tl.minimum(flag, first_ok)
        else:
            # Every candidate is read at an address in the map: an off-map one at the nearest
            # voxel's, so the loads need no mask. One that passes the window test (a window
            # reaching past the map's edge) is then the voxel it was clamped to, which lies in the
            # same window: the same similarity at the same index changes neither the max nor its
            # lowest index. The box's padding lies outside every window.
            cq = cd * HW + tl.minimum(tl.maximum(ch, 0), H - 1) * W + tl.minimum(tl.maximum(cw, 0), W - 1)
            b_rows = b_base + cq.to(tl.int64)[:, None] * sbp
            if HAS_MASK_B:
                # Masked-out candidates load as zeros (no NaN of theirs reaches a product), their
                # scale as 0, and come out -inf through the fused add.
                cand = tl.load(mb_ptr + base + cq) != 0
                acc = tile_product(a_res, a_rows, row_ok, b_rows, cand, C, sac, sbc, True, Q, ROWS * HALO_W,
                                   BLOCK_C, SINGLE_C, EVEN_C, IS_F64, UPCAST, PRECISION)
                sb = tl.load(sb_ptr + base + cq, mask=cand, other=0.0)
                s = acc * sb[None, :] + tl.where(cand, 0.0, float("-inf"))[None, :]
            else:  # every candidate real: no mask (the col_ok argument is not read)
                acc = tile_product(a_res, a_rows, row_ok, b_rows, row_ok, C, sac, sbc, False, Q,
                                   ROWS * HALO_W, BLOCK_C, SINGLE_C, EVEN_C, IS_F64, UPCAST, PRECISION)
                s = acc * tl.load(sb_ptr + base + cq)[None, :]
            top_s, arg = tile_argmax(tl.where(in_window, s, float("-inf")), cq[None, :])
            best, best_idx, flag = fold_strict(best, best_idx, flag, top_s, arg)
        c0 += HALO_W
        next_row = c0 >= BOX_W
        c0 = tl.where(next_row, 0, c0)
        r0 = tl.where(next_row, r0 + ROWS, r0)
        next_depth = r0 >= BOX_H
        r0 = tl.where(next_depth, 0, r0)
        cd = tl.where(next_depth, cd + 1, cd)
    return best, best_idx, flag


@triton.jit
def _query_tile(pid, D, H, W, TILES_W, TILES_HW, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                PARTITION: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The program's tile of queries (depth ``d``, rows from ``h0``, columns from ``w0``): ``(p,
    row_ok, front, top, left, box_top, box_left)``, the queries' voxels, whether each is on the
    map, where each query's window starts (depth, rows, columns) and where the tile's box does."""
    d = pid // TILES_HW
    tile = pid % TILES_HW
    h0 = (tile // TILES_W) * TILE_H
    w0 = (tile % TILES_W) * TILE_W
    q = tl.arange(0, TILE_H * TILE_W)
    h = h0 + q // TILE_W
    w = w0 + q % TILE_W
    row_ok = (h < H) & (w < W)
    p = d * H * W + h * W + w
    if PARTITION:
        front = (d // KD) * KD
        top = (h // KH) * KH
        left = (w // KW) * KW
        box_top = (h0 // KH) * KH
        box_left = (w0 // KW) * KW
    else:
        front = d - KD // 2
        top = h - KH // 2
        left = w - KW // 2
        box_top = h0 - KH // 2
        box_left = w0 - KW // 2
    return p, row_ok, front, top, left, box_top, box_left


@triton.jit
def _window_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr, marks_ptr, sums_ptr, counts_ptr,
    D, H, W, C, TILES_W, TILES_HW,
    sab, sap, sac, sbb, sbp, sbc,  # strides of xa and xb: batch, voxel, channel
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    PARTITION: tl.constexpr, HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, WRITE_LOSS: tl.constexpr,
    EXACT: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, ROWS: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, EVEN_C: tl.constexpr,
    IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Forward of  values[p] = max_{q in Q(p)} sa[p] * sb[q] * <xa_p, xb_q>,  indices[p] = lowest such q,
    # Q(p) = the KD x KH x KW neighbourhood of p clipped to the map (sliding), or p's tile
    # (partition), less the candidates masked out in b.
    # Gradient (backward kernels, through the saved indices): with q = indices[p], d_p = <xa_p, xb_q>,
    #   d values[p] / d xa_p = sa[p] sb[q] xb_q,   d values[p] / d xb_q = sa[p] sb[q] xa_p,
    #   d values[p] / d sa[p] = sb[q] d_p,         d values[p] / d sb[q] = sa[p] d_p;
    # exactly what autograd gives the windowed max of the reference.
    #
    # Q(p) starts at (front, top[p], left[p]) and spans KD x KH x KW; the tile's box starts where
    # its first query's window does (the starts grow with h and w) and spans KD x BOX_H x BOX_W.
    # The box is walked depth by depth, ROWS rows of HALO_W columns at a time, in row-major order:
    # increasing candidate index q for every query. Within a step the lowest q at the max wins, and
    # a later step replaces the best only when strictly greater, so ties keep the lowest index.
    # sa[p] > 0 multiplies once at the end.
    #
    # Two passes of this kernel over the same grid. The scan (EXACT False) walks with the lean
    # epilogue (_argmax.tile_argmax); the queries it cannot answer (a NaN similarity, which wins at
    # its first index as in torch.max; no candidate above -inf; a non-finite query, which takes its
    # first candidate) are rare: the scan counts them per tile in marks[slot], slot = batch *
    # programs + pid, and marks them NEEDS_EXACT in indices. The settle pass (EXACT True) reads
    # each tile's count and stops where it is 0; a tile with marks it walks again with the exact
    # epilogue, whose answers replace the scan's for all its queries. With WRITE_LOSS the pass that
    # writes a tile's final values writes its share of the loss at the same slot (_loss).
    # Grid: (cdiv(H, TILE_H) * cdiv(W, TILE_W) * D, B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    slot = batch * tl.num_programs(0) + pid
    run = True
    if EXACT:
        run = tl.load(marks_ptr + slot) > 0
    if run:
        base = batch * D * H * W
        p, row_ok, front, top, left, box_top, box_left = _query_tile(
            pid, D, H, W, TILES_W, TILES_HW, KD, KH, KW, PARTITION, TILE_H, TILE_W)
        a_rows = xa_ptr + batch * sab + p.to(tl.int64)[:, None] * sap  # (Q, 1)
        a_res = a_rows  # placeholder when the channels come in chunks
        if SINGLE_C:
            a_res = resident_queries(a_rows, row_ok, C, sac, BLOCK_C, UPCAST)
        best, best_idx, flag = _walk_box(
            a_res, a_rows, row_ok, xb_ptr + batch * sbb, sb_ptr, mb_ptr, base, front, top, left, box_top,
            box_left, D, H, W, C, sac, sbp, sbc, KD, KH, KW, BOX_H, BOX_W, HAS_MASK_B, EXACT, TILE_H * TILE_W,
            ROWS, HALO_W, BLOCK_C, SINGLE_C, EVEN_C, IS_F64, UPCAST, PRECISION)
        sa = tl.load(sa_ptr + base + p, mask=row_ok, other=0.0)
        row_in = row_ok
        if HAS_MASK_A:
            row_in = row_in & (tl.load(ma_ptr + base + p, mask=row_ok, other=0) != 0)
        if EXACT:  # flag: each query's first candidate, the answer of a non-finite query
            best_idx = tl.where((sa != sa) & (flag < NO_HIT), flag, best_idx)
            valid = row_in & (best_idx >= 0)
            answer = tl.where(valid, best_idx, -1)
        else:  # flag: the queries that met a NaN
            exact = row_in & ((flag != 0) | (best == float("-inf")) | (sa != sa))
            valid = row_in & (best_idx >= 0) & ~exact
            answer = tl.where(exact, NEEDS_EXACT, tl.where(valid, best_idx, -1))
            tl.store(marks_ptr + slot, tl.sum(exact.to(tl.int32), 0))
        values = tl.where(valid, tl.where(valid, best, 0.0) * sa, 0.0)
        tl.store(values_ptr + base + p, values, mask=row_ok)
        tl.store(indices_ptr + base + p, answer.to(tl.int64), mask=row_ok)
        store_partial(values, valid, sums_ptr, counts_ptr, slot, WRITE_LOSS)


INTERPRETED = is_interpreted(_window_match_fwd_kernel)


def query_tile(H: int, W: int, interpreted: bool, is_f64: bool = False):
    """(TILE_H, TILE_W): a 2-D tile of 64 queries (32 in float64 on a GPU, whose products are
    in registers), up to 8 rows of a map's width, fewer on a map of fewer rows.

    Every map gets the same number of queries, padded with queries past its edge where it is
    small: one tile shape for the tensor cores whatever the map. Wide and short maps (1 x N) get a
    1 x 64 strip, narrow ones (W < 8) a column of 64 / W rows.
    """
    target = 32 if is_f64 and not interpreted else 64
    if next_power_of_2(W) < 8:
        tile_w = next_power_of_2(W)
        return target // tile_w, tile_w
    tile_h = min(next_power_of_2(H), 8)
    return tile_h, target // tile_h


def box_size(tile: int, k: int, partition: bool) -> int:
    """Rows (columns) of the box of a tile of ``tile`` rows (columns) and a window of ``k``: the
    window's reach on both sides (sliding), or every partition the tile can overlap."""
    if partition:
        return (triton.cdiv(tile - 1, k) + 1) * k
    return tile + k - 1


#: Candidates per step of the box walk: on a GPU the N of a ``tl.dot`` whose (queries x candidates)
#: float32 accumulator stays in registers beside the epilogue's temporaries; under the interpreter
#: more (numpy is fast per op, slow per op count).
STEP_CANDIDATES = 64
#: Float32 operands (three TF32 products per step): half the candidates, or the step spills at
#: sm_90: in channel chunks (the queries' chunk reloaded) with Triton 3.9, and with the channels
#: resident too with Triton 3.6 (255 registers at 64 candidates).
STEP_CANDIDATES_FP32 = 32
INTERPRETER_STEP_CANDIDATES = 1024
#: Elements of a float64 (queries x candidates x channels) product (no ``tl.dot``) per chunk: at
#: 2048 (8 candidates a step), ptxas kept a register on the stack in some masked float64 windows
#: (Triton 3.6, and 3.9 with the same source reordered), at 72 to 80 registers.
F64_TILE = 1024
INTERPRETER_TILE = 2**18


def box_chunk(box_h: int, box_w: int, queries: int, block_c: int, interpreted: bool, is_f64: bool = False,
              fp32: bool = False):
    """``(ROWS, HALO_W)``: a step of the box walk takes ``ROWS`` whole box rows of ``HALO_W >=
    box_w`` columns (padded to a power of two), or, for a box wider than a step, ``HALO_W`` columns
    of one row; at least 16 candidates (``tl.dot``'s smallest N)."""
    limit = STEP_CANDIDATES_FP32 if fp32 else STEP_CANDIDATES
    if interpreted:
        limit = INTERPRETER_STEP_CANDIDATES
    if is_f64:
        limit = max(1, (INTERPRETER_TILE if interpreted else F64_TILE) // (queries * block_c))
    halo_w = min(limit, next_power_of_2(box_w))
    rows = min(next_power_of_2(box_h), max(1, limit // halo_w))
    if not is_f64:
        halo_w = max(halo_w, 16 // rows)
    return rows, halo_w


def block_c(C: int, dtype: torch.dtype, interpreted: bool) -> int:
    """Channel chunk: all of C up to 128 (resident; at least 16, ``tl.dot``'s smallest K), else
    32-wide chunks (the queries' chunk is reloaded beside the candidates', in registers). On a GPU
    float32 takes 32-wide chunks (its three TF32 products per step need three times the operand
    registers) and float64 8-wide ones (a broadcast product)."""
    padded = max(16, next_power_of_2(C))
    if not interpreted and dtype == torch.float64:
        return min(next_power_of_2(C), 8)
    if not interpreted and dtype == torch.float32:
        return min(padded, 32)
    return padded if padded <= 128 else (64 if interpreted else 32)


def _grid(spatial, B: int, is_f64: bool):
    D, H, W = (1, *spatial) if len(spatial) == 2 else spatial
    TILE_H, TILE_W = query_tile(H, W, INTERPRETED, is_f64)
    return (triton.cdiv(H, TILE_H) * triton.cdiv(W, TILE_W) * D, B)


def loss_slots(spatial, B: int, dtype: torch.dtype) -> int:
    """Programs of the window kernel for maps of ``spatial``: the loss's partial-sum slots."""
    tiles, batch = _grid(spatial, B, dtype == torch.float64)
    return tiles * batch


def window_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b, spatial, window, mode: int,
                         partials=None, out=None):
    """Launch the window kernel; returns ``(values, indices)``, each (B, N).

    ``xa``, ``xb`` voxel-major (B, N, C) with the channels innermost (candidates are gathered per
    voxel); ``spatial`` is (H, W) or (D, H, W) and ``window`` one size per axis (odd when sliding),
    ``mode`` a value of :data:`WINDOW_MODE_CODES`; checked by the op. ``partials`` and ``out`` as
    for :func:`.dense.dense_match_forward` (slots: :func:`loss_slots`).
    """
    B, N, C = xa.shape
    D, H, W = (1, *spatial) if len(spatial) == 2 else spatial
    KD, KH, KW = (1, *window) if len(window) == 2 else window
    partition = mode == WINDOW_MODE_CODES["partition"]
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    if out is None:
        out = (torch.empty((B, N), dtype=scale_a.dtype, device=xa.device),
               torch.empty((B, N), dtype=torch.int64, device=xa.device))
    values, indices = out
    sums, counts = partials if partials is not None else (values, indices)  # not read without partials
    is_f64 = flags["IS_F64"]
    TILE_H, TILE_W = query_tile(H, W, INTERPRETED, is_f64)
    BLOCK_C = block_c(C, xa.dtype, INTERPRETED)
    box_h, box_w = box_size(TILE_H, KH, partition), box_size(TILE_W, KW, partition)
    ROWS, HALO_W = box_chunk(box_h, box_w, TILE_H * TILE_W, BLOCK_C, INTERPRETED, is_f64,
                             fp32=xa.dtype == torch.float32)
    # Steps must come in increasing candidate index: several rows per step only when a step spans
    # the box's width.
    assert ROWS == 1 or HALO_W >= box_w, (ROWS, HALO_W, box_w)
    tiles_w = triton.cdiv(W, TILE_W)
    tiles_hw = triton.cdiv(H, TILE_H) * tiles_w
    grid = _grid(spatial, B, is_f64)
    arguments = (xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
                 values, indices, torch.empty(grid[0] * grid[1], dtype=torch.int32, device=xa.device),
                 sums, counts, D, H, W, C, tiles_w, tiles_hw, *xa.stride(), *xb.stride())
    constants = dict(KD=KD, KH=KH, KW=KW, BOX_H=box_h, BOX_W=box_w, PARTITION=partition,
                     HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None,
                     WRITE_LOSS=partials is not None,
                     TILE_H=TILE_H, TILE_W=TILE_W, ROWS=ROWS, HALO_W=HALO_W,
                     BLOCK_C=BLOCK_C, SINGLE_C=C <= BLOCK_C, EVEN_C=C == BLOCK_C, **flags)
    _window_match_fwd_kernel[grid](*arguments, EXACT=False, **constants, num_warps=4)
    # The settle pass: the tiles with marked queries (rare: NaN similarities, no candidate above
    # -inf, non-finite queries); a program whose tile holds none reads its count and stops.
    _window_match_fwd_kernel[grid](*arguments, EXACT=True, **constants, num_warps=4, num_stages=2)
    return values, indices

"""Token inputs ``(B, N, C)``: token_match, token_alignment_loss, and the drop-ins for lightly's
``most_similar_index`` / ``select_most_similar``.

Every backend that runs here (the reference, cpp, Triton under the interpreter) is checked against
a token-space oracle written independently of the library (float64: normalise, all products, the
first maximum), the gradients against the reference's autograd, and the lightly drop-ins against a
transcription of lightly 1.6.0's code (and against lightly itself where it is importable).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import salign_kernels as sk
from salign_kernels.tokens import _as_map
from helpers import GRAD_TOLERANCE, assert_same_matches, cpu_backends

BACKENDS = ["reference"] + cpu_backends()
COMPILED = cpu_backends()
B, N, C = 2, 37, 6  # N prime: ragged tiles in every backend


def make_tokens(shape=(B, N, C), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = torch.randn(shape, generator=generator, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def make_token_mask(shape=(B, N), keep=0.7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < keep


def token_oracle(a, b, mask_a=None, mask_b=None, normalize=True):
    """The rule in token space, float64: ``(values, indices)`` ``(B, N)``."""
    a, b = a.double(), b.double()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    sim = torch.einsum("bnc,bmc->bnm", a, b)
    if mask_b is not None:
        sim = sim.masked_fill(~mask_b[:, None, :], float("-inf"))
    values, indices = sim.max(dim=-1)  # torch.max: the first maximum
    valid = torch.ones_like(indices, dtype=torch.bool)
    if mask_b is not None:
        valid = valid & mask_b.any(-1, keepdim=True)
    if mask_a is not None:
        valid = valid & mask_a
    return values.masked_fill(~valid, 0.0), indices.masked_fill(~valid, -1)


def oracle_loss(a, b, mask_a=None, mask_b=None, symmetric=False, reduction="mean"):
    directions = [token_oracle(a, b, mask_a, mask_b)]
    if symmetric:
        directions.append(token_oracle(b, a, mask_b, mask_a))
    per_token = [torch.where(i >= 0, (1 - v).abs(), 0.0) for v, i in directions]
    if reduction == "none":
        return per_token[0] if not symmetric else torch.stack(per_token, 1)
    totals = [l.sum() if reduction == "sum" else l.sum() / max(int((i >= 0).sum()), 1)
              for l, (_, i) in zip(per_token, directions)]
    return sum(totals) / len(totals)


def assert_token_matches(got, want, a, b, normalize=True):
    """Same valid queries and values, same indices but at near-ties (within float32 rounding)."""
    values, indices = got
    assert values.shape == indices.shape == a.shape[:2] and indices.dtype == torch.int64
    want = (want[0].to(values.dtype), want[1])
    assert_same_matches(got, want, _as_map(a), _as_map(b), normalize)


# --- 1. the matching rule, on every backend ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_token_match_follows_the_rule(backend, normalize, masked):
    a, b = make_tokens()
    masks = dict(mask_a=make_token_mask(seed=1), mask_b=make_token_mask(seed=2)) if masked else {}
    got = sk.token_match(a, b, normalize=normalize, backend=backend, **masks)
    assert got[0].dtype == torch.float32
    assert_token_matches(got, token_oracle(a, b, normalize=normalize, **masks), a, b, normalize)
    if masked:
        assert torch.equal(got[1] < 0, ~masks["mask_a"])
        chosen = got[1].clamp_min(0)
        assert masks["mask_b"].gather(1, chosen)[got[1] >= 0].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_match_is_dense_match_of_the_one_row_map(backend):
    a, b = make_tokens(seed=3)
    mask_b = make_token_mask(seed=4)
    got = sk.token_match(a, b, mask_b=mask_b, backend=backend)
    map_a, map_b = (t.transpose(1, 2).unsqueeze(2).contiguous() for t in (a, b))
    values, indices = sk.dense_match(map_a, map_b, mask_b=mask_b[:, None], backend=backend)
    assert_token_matches(got, (values.view(B, N), indices.view(B, N)), a, b)


def _signs(shape, seed):
    """Tokens with entries +-1: with C a power of four their norms are powers of two, so every
    (normalised) similarity is exact in any summation order and ties are real ties on every backend."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=generator).double() * 2 - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_exact_ties_go_to_the_lowest_index(backend, dtype, normalize):
    # C = 4: only 16 distinct tokens among 37, so most queries have several equal best candidates.
    a, b = _signs((B, N, 4), 20), _signs((B, N, 4), 21)
    mask_b = make_token_mask((B, N), 0.8, seed=22)
    for masks in ({}, {"mask_b": mask_b}):
        want = token_oracle(a, b, normalize=normalize, **masks)
        values, indices = sk.token_match(a.to(dtype), b.to(dtype), normalize=normalize, backend=backend, **masks)
        assert torch.equal(indices, want[1])
        assert torch.equal(values.double(), want[0])
    # every candidate the same token: every query picks token 0
    same = _signs((B, 1, 16), 23).expand(B, N, 16)
    queries = _signs((B, N, 16), 24)
    indices = sk.token_match(queries.to(dtype), same.to(dtype), normalize=normalize, backend=backend)[1]
    assert torch.equal(indices, torch.zeros(B, N, dtype=torch.int64))
    # a duplicate of token 4 at 9, and a query along it: 4, or 9 where 4 is masked out
    tokens = _signs((B, N, 16), 25)
    tokens[:, 9] = tokens[:, 4]
    assert ((tokens == tokens[:, 4:5]).all(-1).sum(-1) == 2).all()  # no other copy of token 4
    queries[:, 0] = 2 * tokens[:, 4]
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 4] = False
    indices = sk.token_match(queries.to(dtype), tokens.to(dtype), mask_b=keep, normalize=normalize,
                             backend=backend)[1]
    assert indices[0, 0] == 4 and indices[1, 0] == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token(backend):
    a, b = make_tokens((3, 1, 4), seed=6)
    values, indices = sk.token_match(a, b, backend=backend)
    assert torch.equal(indices, torch.zeros(3, 1, dtype=torch.int64))
    torch.testing.assert_close(values, F.cosine_similarity(a, b, dim=-1), atol=1e-6, rtol=1e-6)


# --- 2. memory layouts: tokens are matched in place ----------------------------------------------


def _layouts(tokens):
    """The same tokens as a slice without a class token, every other token of a longer sequence,
    and a transposed (B, C, N) tensor (channels not innermost)."""
    Bt, Nt, Ct = tokens.shape
    with_cls = torch.cat([torch.randn(Bt, 1, Ct, dtype=tokens.dtype), tokens], dim=1)
    every_other = torch.zeros(Bt, 2 * Nt, Ct, dtype=tokens.dtype)
    every_other[:, ::2] = tokens
    channel_first = tokens.transpose(1, 2).contiguous()
    return {"class_token_dropped": (with_cls, lambda t: t[:, 1:]),
            "strided": (every_other, lambda t: t[:, ::2]),
            "channels_outer": (channel_first, lambda t: t.transpose(1, 2))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["class_token_dropped", "strided", "channels_outer"])
def test_non_contiguous_tokens_give_the_contiguous_result(backend, layout):
    a, b = make_tokens(seed=7)
    base, view = _layouts(a)[layout]
    base.requires_grad_()
    tokens_a = view(base)
    assert torch.equal(tokens_a, a) and not tokens_a.is_contiguous()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = sk.token_alignment_loss(x, y, symmetric=True, backend=backend)
    want_a, want_b = torch.autograd.grad(want, (x, y))
    y2 = b.clone().requires_grad_()
    got = sk.token_alignment_loss(tokens_a, y2, symmetric=True, backend=backend)
    got_base, got_b = torch.autograd.grad(got, (base, y2))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(view(got_base), want_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_b, want_b, atol=1e-6, rtol=1e-5)
    rest = torch.ones_like(got_base, dtype=torch.bool)
    view(rest).fill_(False)  # the entries of the base tensor that are not tokens get no gradient
    assert torch.equal(got_base[rest], torch.zeros_like(got_base[rest]))


class _RecordMatchInputs(TorchDispatchMode):
    """Records the feature tensors every ``match`` op of the library receives."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("salign_kernels"):
            self.inputs.append((func.name(), args[0], args[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("layout", ["contiguous", "class_token_dropped", "strided"])
def test_the_kernels_receive_views_of_the_tokens(backend, layout):
    a, b = make_tokens(seed=8)
    if layout == "contiguous":
        tokens_a = a
    else:
        base, view = _layouts(a)[layout]
        tokens_a = view(base)
    with _RecordMatchInputs() as record:
        sk.token_match(tokens_a, b, backend=backend)
        sk.token_alignment_loss(tokens_a, b, symmetric=True, backend=backend)
    assert len(record.inputs) == 2, record.inputs
    for _, feat_a, feat_b in record.inputs:
        assert feat_a.shape == (B, C, 1, N)
        assert feat_a.data_ptr() == tokens_a.data_ptr() and feat_b.data_ptr() == b.data_ptr()
        assert (feat_a.stride(0), feat_a.stride(1), feat_a.stride(3)) == (
            tokens_a.stride(0), tokens_a.stride(2), tokens_a.stride(1))


@pytest.mark.parametrize("layout", ["contiguous", "class_token_dropped", "strided"])
def test_the_triton_rows_of_a_token_map_are_the_tokens(layout):
    # The Triton kernels read a map as (B, N, C) rows through voxel_major: for the token view this
    # is the token tensor itself, without a copy.
    pytest.importorskip("triton")
    from salign_kernels.ops.triton._runtime import voxel_major

    a, _ = make_tokens(seed=9)
    tokens = a if layout == "contiguous" else _layouts(a)[layout][1](_layouts(a)[layout][0])
    rows = voxel_major(_as_map(tokens))
    assert rows.data_ptr() == tokens.data_ptr() and rows.stride() == tokens.stride()
    assert torch.equal(rows, tokens)


# --- 3. the loss and its gradients ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_alignment_loss_values(backend, symmetric, reduction):
    a, b = make_tokens(seed=10)
    mask_a, mask_b = make_token_mask(seed=11), make_token_mask(seed=12)
    got = sk.token_alignment_loss(a, b, symmetric=symmetric, mask_a=mask_a, mask_b=mask_b, reduction=reduction,
                                  backend=backend)
    want = oracle_loss(a, b, mask_a, mask_b, symmetric, reduction)
    assert got.dtype == torch.float32
    assert got.shape == want.shape == {"none": (B, 2, N) if symmetric else (B, N)}.get(reduction, ())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # ... and exactly what local_alignment_loss gives on the one-row maps
    maps = [t.transpose(1, 2).unsqueeze(2).contiguous() for t in (a, b)]
    on_maps = sk.local_alignment_loss(*maps, symmetric=symmetric, mask_a=mask_a[:, None], mask_b=mask_b[:, None],
                                      reduction=reduction, backend=backend)
    torch.testing.assert_close(got, on_maps.reshape(got.shape), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_masked_out(backend, reduction):
    a, b = make_tokens(seed=13)
    a.requires_grad_()
    nobody = torch.zeros(B, N, dtype=torch.bool)
    loss = sk.token_alignment_loss(a, b, mask_a=nobody, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), a)
    assert torch.equal(grad, torch.zeros_like(grad))
    values, indices = sk.token_match(a, b, mask_b=nobody, backend=backend)
    assert torch.equal(indices, torch.full((B, N), -1)) and torch.equal(values, torch.zeros(B, N))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_agree_with_the_reference(backend, symmetric, dtype):
    a, b = make_tokens(dtype=dtype, seed=14)
    mask_a, mask_b = make_token_mask(seed=15), make_token_mask(seed=16)

    def loss_and_grads(name):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = sk.token_alignment_loss(x, y, symmetric=symmetric, mask_a=mask_a, mask_b=mask_b, reduction="sum",
                                       backend=name)
        return (loss, *torch.autograd.grad(loss, (x, y)))

    got, want = loss_and_grads(backend), loss_and_grads("reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == dtype and g.shape == (B, N, C)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    a, b = make_tokens((1, 5, 3), torch.float64, seed=17)
    a.requires_grad_()
    b.requires_grad_()
    mask_b = torch.tensor([[True, True, False, True, True]])

    def fn(x, y):
        return sk.token_alignment_loss(x, y, symmetric=True, mask_b=mask_b, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_cuda_tokens():
    # The compiled Triton kernels on CUDA tokens (a sliced ViT-like output) against the oracle and
    # the reference's gradients on the CPU.
    a, b = make_tokens(seed=40)
    mask_b = make_token_mask(seed=41)
    base = torch.cat([torch.randn(B, 1, C), a], dim=1).cuda().requires_grad_()
    tokens_a, y = base[:, 1:], b.cuda().requires_grad_()
    got = sk.token_match(tokens_a, y, mask_b=mask_b.cuda(), backend="triton")
    assert_token_matches(tuple(t.cpu() for t in got), token_oracle(a, b, mask_b=mask_b), a, b)
    loss = sk.token_alignment_loss(tokens_a, y, symmetric=True, mask_b=mask_b.cuda(), backend="triton")
    grad_base, grad_b = torch.autograd.grad(loss, (base, y))
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = sk.token_alignment_loss(x2, y2, symmetric=True, mask_b=mask_b, backend="reference")
    want_a, want_b = torch.autograd.grad(want, (x2, y2))
    torch.testing.assert_close(loss.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_base[:, 1:].cpu(), want_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_b.cpu(), want_b, atol=1e-5, rtol=1e-4)
    assert torch.equal(grad_base[:, 0].cpu(), torch.zeros(B, C))
    assert torch.equal(sk.most_similar_index(a.double().cuda(), b.double().cuda(), backend="triton").cpu(),
                       lightly_most_similar_index(a.double(), b.double()))


# --- 4. lightly's most_similar_index / select_most_similar ---------------------------------------
# Transcribed from lightly 1.6.0, lightly/models/utils.py (functional = torch.nn.functional).


def lightly_most_similar_index(x, y):
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)

    similarity = torch.einsum("bnc,bmc->bnm", x, y)
    return similarity.argmax(dim=2)


def lightly_select_most_similar(x, y, y_values):
    y_index = lightly_most_similar_index(x, y)
    y_index = y_index.unsqueeze(-1).expand(y_values.shape)
    return torch.gather(y_values, dim=1, index=y_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(37, 37), (7, 19), (19, 7)])  # (N, M): lightly's einsum takes M != N
def test_most_similar_index_is_lightlys(backend, sizes):
    n, m = sizes
    x = torch.randn(3, n, 10, dtype=torch.float64)
    y = torch.randn(3, m, 10, dtype=torch.float64)
    got = sk.most_similar_index(x, y, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (3, n)
    assert torch.equal(got, lightly_most_similar_index(x, y))
    # float32: the same indices but at near-ties (lightly multiplies in float32, the kernels too)
    x32, y32 = x.float(), y.float()
    want = lightly_most_similar_index(x32, y32)
    got = sk.most_similar_index(x32, y32, backend=backend)
    if not torch.equal(got, want):
        cos = torch.einsum("bnc,bmc->bnm", F.normalize(x, dim=-1), F.normalize(y, dim=-1))
        gap = (cos.gather(2, want[..., None]) - cos.gather(2, got[..., None])).abs()
        assert gap.max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_most_similar_index_ties_and_zero_tokens_as_lightly(backend):
    # +-1 tokens, C = 4: exact cosines, many equal maxima; lightly's argmax takes the first.
    x, y = _signs((2, 12, 4), 30).float(), _signs((2, 12, 4), 31).float()
    x[:, 1] = 3 * y[:, 5]  # cos 1 with token 5 and with every copy of it
    x[:, 3] = 0  # a zero token: every similarity is 0, argmax is the first
    want = lightly_most_similar_index(x, y)
    assert torch.equal(sk.most_similar_index(x, y, backend=backend), want)
    first_copy = (y == y[:, 5:6]).all(-1).int().argmax(-1)
    assert torch.equal(want[:, 1], first_copy) and torch.equal(want[:, 3], torch.zeros(2, dtype=torch.int64))
    cos = torch.einsum("bnc,bmc->bnm", F.normalize(x.double(), dim=-1), F.normalize(y.double(), dim=-1))
    assert ((cos == cos.amax(-1, keepdim=True)).sum(-1) > 1).sum() >= 8  # the tie rule decides often here


@pytest.mark.parametrize("backend", BACKENDS)
def test_most_similar_index_by_hand(backend):
    # Unit vectors worked out by hand: the same, swapped and anti-parallel candidates.
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]] * 3)
    y = torch.tensor([[[0.0, 2.0], [3.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [-1.0, 0.0]]])
    want = torch.tensor([[0, 1], [1, 0], [1, 0]])  # anti-parallel: cos -1 loses to cos 0
    assert torch.equal(sk.most_similar_index(x, y, backend=backend), want)
    assert torch.equal(lightly_most_similar_index(x, y), want)
    values = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)
    picked = sk.select_most_similar(x, y, values, backend=backend)
    assert torch.equal(picked, torch.stack([values[b, want[b]] for b in range(3)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_most_similar_is_lightlys(backend):
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True)
    got = sk.select_most_similar(x, y, values, backend=backend)
    want = lightly_select_most_similar(x, y, values)
    assert got.shape == (2, 11, 4) and torch.equal(got, want)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (x, y, values), allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), (x, y, values), allow_unused=True)
    assert grads[0] is None and grads[1] is None and want_grads[0] is None and want_grads[1] is None
    assert torch.equal(grads[2], want_grads[2])
    ints = torch.arange(2 * 11 * 3).view(2, 11, 3)  # any dtype: gather
    assert torch.equal(sk.select_most_similar(x, y, ints, backend=backend), lightly_select_most_similar(x, y, ints))


def test_select_most_similar_with_fewer_candidates():
    # lightly's expand fails for M != N; this gives the (B, N, D) its docstring describes.
    x, y, values = torch.randn(2, 9, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    index = lightly_most_similar_index(x, y)
    assert index.max() < 4
    want = values.gather(1, index[..., None].expand(-1, -1, 3))
    assert torch.equal(sk.select_most_similar(x, y, values), want)


def test_against_lightly_itself():
    utils = pytest.importorskip("lightly.models.utils", reason="lightly is not installed")
    x, y, values = torch.randn(2, 49, 32), torch.randn(2, 49, 32), torch.randn(2, 49, 8)
    assert torch.equal(sk.most_similar_index(x, y), utils.most_similar_index(x, y))
    assert torch.equal(sk.select_most_similar(x, y, values), utils.select_most_similar(x, y, values))


# --- 5. bad input --------------------------------------------------------------------------------

TOKEN_CALLS = {
    "token_match": lambda a, b, **kw: sk.token_match(a, b, **kw),
    "token_alignment_loss": lambda a, b, **kw: sk.token_alignment_loss(a, b, **kw),
}


@pytest.fixture(params=list(TOKEN_CALLS))
def call(request):
    return TOKEN_CALLS[request.param]


@pytest.fixture
def tokens():
    return make_tokens((2, 5, 3))


def test_tokens_must_be_tensors(call, tokens):
    with pytest.raises(TypeError, match=r"tokens_a must be a torch.Tensor; got \[1, 2\] \(list\)"):
        call([1, 2], tokens[1])
    with pytest.raises(TypeError, match=r"tokens_b must be a torch.Tensor; got None"):
        call(tokens[0], None)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 1, 5), (30,)])
@pytest.mark.parametrize("which", ["tokens_a", "tokens_b"])
def test_wrong_rank(call, tokens, shape, which):
    bad = torch.zeros(shape)
    args = (bad, tokens[1]) if which == "tokens_a" else (tokens[0], bad)
    message = rf"{which} must be a 3-D tensor of tokens \(B, N, C\); got .* of shape " + re.escape(str(shape))
    with pytest.raises(ValueError, match=message):
        call(*args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_dtype(call, dtype):
    x = torch.zeros(2, 5, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"tokens_a must have a floating dtype .*; got {dtype}"):
        call(x, x)
    with pytest.raises(TypeError, match=rf"tokens_b must have a floating dtype .*; got {dtype}"):
        call(torch.zeros(2, 5, 3), x)


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_empty_tokens(call, shape):
    with pytest.raises(ValueError, match=rf"tokens_a must not be empty; got .* of shape {re.escape(str(shape))}"):
        call(torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize("other", [(2, 6, 3), (2, 5, 4), (1, 5, 3)])
def test_shapes_differ(call, tokens, other):
    message = (r"tokens_a and tokens_b must have the same shape \(B, N, C\); got \(2, 5, 3\) and "
               + re.escape(str(other)))
    with pytest.raises(ValueError, match=message):
        call(tokens[0], torch.zeros(other))


def test_dtypes_differ(call, tokens):
    with pytest.raises(TypeError, match=r"same dtype; got torch.float32 and torch.float64"):
        call(tokens[0], tokens[1].double())


def test_devices_differ(call, tokens):
    with pytest.raises(ValueError, match=r"same device; got cpu and meta"):
        call(tokens[0], tokens[1].to("meta"))


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_type(call, tokens, name):
    with pytest.raises(TypeError, match=rf"{name} must be a bool torch.Tensor or None; got True \(bool\)"):
        call(*tokens, **{name: True})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_dtype(call, tokens, name):
    with pytest.raises(TypeError, match=rf"{name} must have dtype torch.bool; got torch.float32"):
        call(*tokens, **{name: torch.ones(2, 5)})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
@pytest.mark.parametrize("shape", [(2, 1, 5), (5, 2), (2, 6), (1, 5), (2, 5, 3)])
def test_mask_wrong_shape(call, tokens, name, shape):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B, N\) = \(2, 5\); got {re.escape(str(shape))}"):
        call(*tokens, **{name: torch.ones(shape, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_device(call, tokens, name):
    with pytest.raises(ValueError, match=rf"{name} must be on the tokens' device cpu; got meta"):
        call(*tokens, **{name: torch.ones(2, 5, dtype=torch.bool, device="meta")})


def test_normalize_must_be_bool(call, tokens):
    with pytest.raises(TypeError, match=r"normalize must be a bool; got 1 \(int\)"):
        call(*tokens, normalize=1)


def test_unknown_backend(call, tokens):
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', .*; got 'cuda'"):
        call(*tokens, backend="cuda")


def test_loss_options(tokens):
    with pytest.raises(TypeError, match=r"symmetric must be a bool; got 'yes' \(str\)"):
        sk.token_alignment_loss(*tokens, symmetric="yes")
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean', 'sum'; got 'avg'"):
        sk.token_alignment_loss(*tokens, reduction="avg")


def test_no_window_option(tokens):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'window'"):
        sk.token_alignment_loss(*tokens, window=3)


LIGHTLY_CALLS = {
    "most_similar_index": lambda x, y, **kw: sk.most_similar_index(x, y, **kw),
    # y_values fits y = (2, 5, 3); x and y are checked first
    "select_most_similar": lambda x, y, **kw: sk.select_most_similar(x, y, torch.zeros(2, 5, 2), **kw),
}


@pytest.fixture(params=list(LIGHTLY_CALLS))
def lightly_call(request):
    return LIGHTLY_CALLS[request.param]


def test_lightly_x_and_y_checked(lightly_call):
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor of tokens \(B, N, C\); got .* of shape \(5, 3\)"):
        lightly_call(x[0], x)
    with pytest.raises(ValueError, match=r"y must be a 3-D tensor of tokens \(B, N, C\); got .* of shape \(2, 5, 3, 1\)"):
        lightly_call(x, x[..., None])
    with pytest.raises(TypeError, match=r"x must have a floating dtype .*; got torch.int64"):
        lightly_call(x.long(), x)
    with pytest.raises(ValueError, match=r"y must not be empty"):
        lightly_call(x, x[:, :0])
    with pytest.raises(TypeError, match=r"x and y must have the same dtype; got torch.float32 and torch.float64"):
        lightly_call(x, x.double())
    with pytest.raises(ValueError, match=r"x and y must be on the same device; got cpu and meta"):
        lightly_call(x, x.to("meta"))
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', .*; got 'gpu'"):
        lightly_call(x, x, backend="gpu")


@pytest.mark.parametrize("other", [(3, 5, 3), (2, 5, 4)])
def test_lightly_batch_and_channels_must_agree(lightly_call, other):
    message = (r"x \(B, N, C\) and y \(B, M, C\) must have the same batch size B and channels C; "
               rf"got \(2, 5, 3\) and {re.escape(str(other))}")
    with pytest.raises(ValueError, match=message):
        lightly_call(torch.randn(2, 5, 3), torch.randn(other))


@pytest.mark.parametrize("shape", [(2, 5), (2, 4, 2), (1, 5, 2), (2, 5, 2, 1)])
def test_y_values_shape(shape):
    x = torch.randn(2, 5, 3)
    message = (r"y_values must have shape \(B, M, D\) with \(B, M\) = \(2, 5\), one row per token of y; got .* "
               rf"of shape {re.escape(str(shape))}")
    with pytest.raises(ValueError, match=message):
        sk.select_most_similar(x, x, torch.zeros(shape))


def test_y_values_type_and_device():
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match=r"y_values must be a torch.Tensor; got \[1\] \(list\)"):
        sk.select_most_similar(x, x, [1])
    with pytest.raises(ValueError, match=r"y_values must be on the tokens' device cpu; got meta"):
        sk.select_most_similar(x, x, torch.zeros(2, 5, 2, device="meta"))


def test_public_names():
    for name in ["token_match", "token_alignment_loss", "most_similar_index", "select_most_similar"]:
        assert name in sk.__all__ and getattr(sk, name) is getattr(sk.tokens, name)
